"""anomri: unsupervised lesion detection with VAE novelty scores."""

__version__ = "0.1.0"
