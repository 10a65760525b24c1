"""Synthetic demo data for anomri (BIDS diffusion-MRI cohorts with ground-truth lesions)."""
