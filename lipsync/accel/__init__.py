"""Acceleration: compilation, CUDA graphs, caching modes (issue #5)."""
