"""Voxelwise maps: novelty volumes, calibration, lesion probability."""
