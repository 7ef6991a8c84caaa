"""Operational scripts: private services, the demo and the test runner."""
