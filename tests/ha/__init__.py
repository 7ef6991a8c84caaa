"""A replicated broker (primary, replica, three Sentinels) failing under load (see conftest.py)."""
