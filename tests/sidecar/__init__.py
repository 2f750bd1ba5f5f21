"""The sidecar over HTTP: in-process apps, and `promptcache serve` as a process."""
