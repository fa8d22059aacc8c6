"""Fast paths for training on GPU, each a drop-in for a plain path with the same numbers (see tests/fast/)."""
