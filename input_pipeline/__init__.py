"""Data input: the on-disk ArrayRecord format, image transforms and loaders."""
