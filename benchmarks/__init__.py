"""Benchmarks: scripts that print and save their figures (run with ``python -m benchmarks.NAME``)."""
