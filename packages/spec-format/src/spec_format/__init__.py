"""spec-format: speculator checkpoint schema and hidden-state dataset store. Never imports torch."""

from spec_format.errors import SpecError

__all__ = ["SpecError"]
