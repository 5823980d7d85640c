"""lipsync: fast, dependable LatentSync-compatible lip sync."""

__version__ = "0.1.0"
