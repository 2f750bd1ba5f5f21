"""The engine against a real Redis (and the model where the semantic tier is on)."""
