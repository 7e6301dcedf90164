"""save / load a draft module through spec-format's checkpoint API (numpy <-> torch happens here).

The module's state-dict names are the checkpoint's tensor names; which tensors a checkpoint holds is
decided by spec-format's layout for the algorithm, so this file knows no algorithm.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from spec_format.algorithms import layout_for
from spec_format.checkpoint import CONFIG_NAME, read_checkpoint, write_checkpoint
from spec_format.errors import SpecError
from spec_format.validate import validate_checkpoint
from spec_models.registry import draft_class
from spec_models.verifier import EMBED_NAMES, read_verifier_tensors


def _ignores(model: nn.Module, name: str) -> bool:
    fn = getattr(model, "ignores_tensor", None)
    return bool(fn and fn(name))


def save(
    model: nn.Module,
    out_dir: str | Path,
    include_embeddings: bool | None = None,
    float_dtype: str = "bfloat16",
) -> Path:
    """Write `model` as a checkpoint vLLM loads as it is (config.json + model.safetensors).

    Embeddings are left out by default (vLLM then shares the target's, and the checkpoint is smaller);
    they are written when `include_embeddings`, or by default when they were trained. A pruned
    vocabulary gets d2t and t2d; a full one neither. Floats are stored as `float_dtype` (bf16 default).
    """
    cfg = model.config
    layout = layout_for(cfg)
    known = {**layout.optional, **layout.required}
    embed = getattr(model, "embed_tokens", None)
    if include_embeddings is None:
        include_embeddings = bool(embed is not None and embed.weight.requires_grad)
    tensors: dict[str, np.ndarray] = {}
    for name, t in model.state_dict().items():
        if name == "embed_tokens.weight" and not include_embeddings:
            continue
        if name == "d2t" and "d2t" not in layout.required:
            continue  # full vocabulary: vLLM expects no mapping
        if name not in known:
            raise SpecError(
                f"tensor '{name}' of {type(model).__name__} is not in the '{cfg.algorithm}' checkpoint layout"
            )
        t = t.detach().cpu()
        tensors[name] = (t.float() if t.is_floating_point() else t).numpy()
    if "d2t" in tensors and "t2d" in known:
        t2d = np.zeros(known["t2d"], dtype=np.bool_)
        t2d[np.arange(len(tensors["d2t"])) + tensors["d2t"]] = True
        tensors["t2d"] = t2d
    missing = sorted(set(layout.required) - set(tensors))
    if missing:
        raise SpecError(
            f"{type(model).__name__} has no tensor '{missing[0]}' that the '{cfg.algorithm}' layout requires"
        )
    return write_checkpoint(out_dir, cfg, tensors, float_dtype)


def load(
    path: str | Path,
    verifier: str | Path | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Rebuild the draft module of a checkpoint directory (validated strictly first).

    A checkpoint without `embed_tokens` takes the verifier's embeddings, as vLLM does: from `verifier`
    (a model directory) or else from the config's `verifier.name_or_path` when that is a local directory.
    """
    path = Path(path)
    report = validate_checkpoint(path)
    if report.errors:
        more = (
            f" (and {len(report.errors) - 1} more; run `spec validate {path}`)"
            if len(report.errors) > 1
            else ""
        )
        raise SpecError(report.errors[0] + more)
    cfg, tensors = read_checkpoint(path)
    model = draft_class(cfg.speculators_model_type, str(path / CONFIG_NAME))(cfg)
    state = {n: torch.from_numpy(np.array(a)) for n, a in tensors.items() if not _ignores(model, n)}
    if "embed_tokens.weight" in model.state_dict() and "embed_tokens.weight" not in state:
        vdir = Path(verifier) if verifier is not None else Path(cfg.verifier_name)
        if not (vdir / "config.json").is_file():
            raise SpecError(
                f"{path}: the checkpoint has no embed_tokens and the verifier '{vdir}' is not a local model directory; "
                "pass the verifier directory to take its embeddings from"
            )
        embed = read_verifier_tensors(vdir, {"embed": EMBED_NAMES}).get("embed")
        want = tuple(model.embed_tokens.weight.shape)
        if embed is None or embed.shape != want:
            found = "none" if embed is None else list(embed.shape)
            raise SpecError(f"{vdir}: verifier embeddings have shape {found}, the draft needs {list(want)}")
        state["embed_tokens.weight"] = torch.tensor(embed)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "d2t"]  # absent d2t = full vocabulary (the zero buffer)
    if missing or unexpected:
        name = (missing or unexpected)[0]
        raise SpecError(f"{path}: tensor '{name}' {'is missing' if missing else 'is not used by the model'}")
    return model.to(device=device, dtype=dtype)
