"""Benchmarks: one bounded command each, on loopback, stopping everything they start."""
