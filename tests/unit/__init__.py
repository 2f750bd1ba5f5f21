"""Unit tests: pure logic, no server and no model; they run in seconds."""
