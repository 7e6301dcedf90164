"""Read a few tensors (embeddings, lm_head, final norm) from a verifier's safetensors, nothing else.

Handles a single `model.safetensors` and sharded checkpoints (`model.safetensors.index.json`). Tensors
are memory-mapped and only the requested ones are read (and upcast from bf16), so an 8B verifier costs
the size of its embeddings, not of its weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

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


@torch.no_grad()
def start_from_verifier(model: torch.nn.Module, verifier_dir: str | Path, vocab_mapping, seed: int) -> None:
    """Every draft's start: weights N(0, 0.02), norms 1, biases 0; then the verifier's embeddings, its
    lm_head rows of the draft vocabulary (`vocab_mapping`: a spec_format VocabMapping, None for the whole
    vocabulary) and its final norm (the lm_head rows were trained to read its output), and d2t."""
    found = read_verifier_tensors(
        verifier_dir, {"embed": EMBED_NAMES, "lm_head": LM_HEAD_NAMES, "norm": NORM_NAMES}
    )
    if "embed" not in found:
        raise SpecError(f"{verifier_dir}: no embedding tensor found (looked for {', '.join(EMBED_NAMES)})")
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        elif name != "embed_tokens.weight":
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    lm_head = found.get("lm_head", found["embed"])  # tied embeddings: the head is the embedding matrix
    rows = np.arange(model.lm_head.weight.shape[0]) if vocab_mapping is None else vocab_mapping.target_ids
    model.embed_tokens.weight.copy_(torch.tensor(found["embed"]))
    model.lm_head.weight.copy_(torch.tensor(lm_head[rows]))
    if "norm" in found:
        model.norm.weight.copy_(torch.tensor(found["norm"]))
    if vocab_mapping is not None:
        model.d2t.copy_(torch.from_numpy(vocab_mapping.d2t))
