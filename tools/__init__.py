"""Command-line tools, run from the repository root as ``python -m tools.NAME ...`` (benchmark sets, comparisons,
sample inputs)."""
