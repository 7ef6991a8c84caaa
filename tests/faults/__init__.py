"""Faults injected into real processes (see harness.py)."""
