"""Generative models of healthy data: voxel VAE, image VAE, GANs."""
