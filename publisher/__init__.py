"""Publisher CLI: sends events with a known share of duplicates to the API and verifies /stats."""
