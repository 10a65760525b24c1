"""The 2-D image engine: training, scoring, evaluating and reporting anomaly detectors on image folders."""
