"""Benchmarks: each figure of issue 9 measured against a baseline run in the same process tree."""
