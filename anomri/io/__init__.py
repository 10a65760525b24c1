"""Input and output: BIDS cohorts, NIfTI volumes, image folders."""
