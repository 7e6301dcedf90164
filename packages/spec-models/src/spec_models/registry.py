"""Draft classes by `speculators_model_type`: a new algorithm (P-EAGLE, DFlash, ...) is one module that
defines its nn.Module and calls `register_draft` (plus its tensor layout in spec-format).

A registered class is built as `cls(config: SpeculatorConfig)`, keeps that config as `.config`, and names
its parameters and buffers after the checkpoint's tensors, so save/load (checkpoint.py) need no mapping.
"""

from __future__ import annotations

from torch import nn

from spec_format.errors import SpecError

DRAFTS: dict[str, type[nn.Module]] = {}


def register_draft(model_type: str):
    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        DRAFTS[model_type] = cls
        return cls

    return deco


def draft_class(model_type: str, source: str = "config.json") -> type[nn.Module]:
    # Importing the package registers the built-in algorithms.
    import spec_models.dflash
    import spec_models.eagle3
    import spec_models.peagle  # noqa: F401

    cls = DRAFTS.get(model_type)
    if cls is None:
        raise SpecError(
            f"{source}: field 'speculators_model_type': spec-models has no draft '{model_type}' (known: {', '.join(sorted(DRAFTS))})"
        )
    return cls
