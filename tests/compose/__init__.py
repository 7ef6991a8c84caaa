"""The compose stack for real: images built, containers started (see conftest.py)."""
