"""Diffusion MRI input: gradients, preprocessing, shells and voxel features."""
