"""spec-models."""
