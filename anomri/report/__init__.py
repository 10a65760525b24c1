"""Report figures (matplotlib): shared plotting helpers and the dMRI workflow's figures."""
