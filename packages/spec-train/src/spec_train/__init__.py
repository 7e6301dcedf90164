"""spec-train."""
