"""Reproducible benchmarks of sctune against what users would do instead (see BENCHMARKS.md).

Every script runs as ``python -m benchmarks.<name> [--quick] [--out DIR]`` from the repository root and
writes ``<name>.json`` (plus PNG plots where it has them) to ``DIR`` (default ``benchmarks/results``).
"""
