"""A source draft directory as found on disk: its config.json, its tensors and which files held them.

Weights are read from `model.safetensors` (numpy, no torch), `pytorch_model.bin` / `*.pt` (torch with
weights_only=True), or sharded sets listed by a `*.index.json`. A directory holding two different weight
sets is refused rather than guessed at: SafeAILab's loader prefers the .bin, transformers the safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from spec_format.errors import SpecError
from spec_format.files import file_sha256
from spec_format.tensors import load_tensors, tensor_dtypes

TORCH_SUFFIXES = (".bin", ".pt", ".pth")


class Source(msgspec.Struct):
    path: Path
    config: dict[str, Any]
    tensors: dict[str, np.ndarray]  # BF16 widened to float32 (exact)
    dtypes: dict[str, str]  # safetensors dtype names as stored in the source (F16, BF16, I64, BOOL, ...)
    files: dict[str, str]  # weight file name -> sha256


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise SpecError(f"{index}: not a weight index (expected a JSON object with a 'weight_map')") from None
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        raise SpecError(f"{index}: lists shard '{missing[0]}', which is not in {index.parent}")
    return [index.parent / n for n in names]


def weight_files(src: Path) -> list[Path]:
    """The files holding the draft's weights; exactly one weight set or a clear error."""
    candidates = {
        "model.safetensors.index.json": "safetensors shards",
        "model.safetensors": "safetensors",
        "pytorch_model.bin.index.json": "torch shards",
        "pytorch_model.bin": "torch",
    }
    found = [name for name in candidates if (src / name).is_file()]
    # a sharded set and its own single file never coexist in real exports; two kinds mean two weight sets
    kinds = {candidates[name].split()[0] for name in found}
    if len(kinds) > 1:
        raise SpecError(
            f"{src}: holds both {found[0]} and {found[-1]}; keep the weights you want converted and move the other away"
        )
    if found:
        name = found[0]
        return _shards(src / name) if name.endswith(".index.json") else [src / name]
    loose = sorted(p for p in src.iterdir() if p.is_file() and p.suffix in (".safetensors", *TORCH_SUFFIXES))
    if len(loose) == 1:
        return loose
    if not loose:
        raise SpecError(
            f"{src}: no weights found (expected model.safetensors, pytorch_model.bin or a *.index.json shard list)"
        )
    raise SpecError(
        f"{src}: several weight files ({', '.join(p.name for p in loose)}); which one is the draft?"
    )


def read_source(src: str | Path) -> Source:
    src = Path(src)
    if not src.is_dir():
        raise SpecError(f"{src}: not a directory; pass the directory that holds the draft's config.json")
    config_path = src / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise SpecError(
            f"{config_path}: not found; a draft directory needs its config.json (SafeAILab training writes "
            "only pytorch_model.bin: copy the config.json you trained with next to it)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SpecError(f"{config_path}: not valid JSON") from None
    if not isinstance(config, dict):
        raise SpecError(f"{config_path}: expected a JSON object, found {type(config).__name__}")
    tensors: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    files = weight_files(src)
    for path in files:
        if path.suffix == ".safetensors":
            part = load_tensors(path)
            part_dtypes = tensor_dtypes(path)
        else:
            from spec_convert.torch_io import load_torch_state_dict

            part, part_dtypes = load_torch_state_dict(path)
        for name in part:
            if name in tensors:
                raise SpecError(f"{path}: tensor '{name}' appears in two weight files")
        tensors.update(part)
        dtypes.update(part_dtypes)
    return Source(
        path=src.resolve(),
        config=config,
        tensors=tensors,
        dtypes=dtypes,
        files={p.name: file_sha256(p) for p in files},
    )


def is_torch_source(src: Source) -> bool:
    return any(Path(name).suffix in TORCH_SUFFIXES for name in src.files)
