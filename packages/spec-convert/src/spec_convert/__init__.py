"""spec-convert."""
