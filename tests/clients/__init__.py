"""The client library: the in-process cache, wrap(), the sidecar client."""
