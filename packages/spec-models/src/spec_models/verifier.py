"""Read a few tensors (embeddings, lm_head, final norm) from a verifier's safetensors, nothing else.

Handles a single `model.safetensors` and sharded checkpoints (`model.safetensors.index.json`). Tensors
are memory-mapped and only the requested ones are read (and upcast from bf16), so an 8B verifier costs
the size of its embeddings, not of its weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from spec_format.errors import SpecError
from spec_format.tensors import load_tensors, read_header

# Where the language model's tensors live in the HF checkpoints of text and multimodal models.
_PREFIXES = ("model.", "model.language_model.", "language_model.model.")
EMBED_NAMES = tuple(p + "embed_tokens.weight" for p in _PREFIXES)
NORM_NAMES = tuple(p + "norm.weight" for p in _PREFIXES)
LM_HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight", "model.language_model.lm_head.weight")


def layer_names(index: int, name: str) -> tuple[str, ...]:
    """Where decoder layer `index`'s tensor `name` (e.g. "mlp.up_proj.weight") may live."""
    return tuple(f"{p}layers.{index}.{name}" for p in _PREFIXES)


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """{tensor name: file holding it}."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise SpecError(f"{index}: not a safetensors index (no 'weight_map')") from None
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise SpecError(
            f"{model_dir}: no model.safetensors or model.safetensors.index.json; pass a Hugging Face model directory"
        )
    return dict.fromkeys(read_header(single)[0], single)


def read_verifier_tensors(model_dir: str | Path, wanted: dict[str, tuple[str, ...]]) -> dict[str, np.ndarray]:
    """{key: float32 array} for each key of `wanted` (key -> candidate tensor names, first found wins);
    keys with no candidate in the checkpoint are left out."""
    model_dir = Path(model_dir)
    files = _weight_files(model_dir)
    out = {}
    for key, names in wanted.items():
        name = next((n for n in names if n in files), None)
        if name is None:
            continue
        out[key] = np.asarray(load_tensors(files[name], names=[name])[name], dtype=np.float32)
    return out
