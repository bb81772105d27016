"""Helpers shared by the tests: a fixture module per server, and the fault tools."""
