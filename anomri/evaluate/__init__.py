"""Evaluation against lesion masks: voxel- and lesion-level detection metrics."""
