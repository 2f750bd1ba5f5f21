"""Shared helpers of the test suites: sidecars, Redis servers, paths."""
