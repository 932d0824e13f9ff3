"""Benchmarks: triserve measured against baselines run side by side (see bench/README.md)."""
