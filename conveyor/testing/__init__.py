"""Conformance suites and test helpers, shipped in the wheel for third parties."""
