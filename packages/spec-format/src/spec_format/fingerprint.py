"""Who the target (verifier) is: enough to refuse mixing data, drafts and targets that do not belong together.

Read from the model directory's files alone (config.json and the tokenizer files), without transformers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import msgspec

from spec_format.errors import SpecError

# Keys of config.json that change between saves of the same model and say nothing about its computation.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "_model_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "use_cache",
}
# Tokenizer files whose bytes decide token ids and chat rendering (the template decides loss masks).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
)


class TargetInfo(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    """Fingerprint of a target model. `name_or_path` is how users refer to it (a hub id or a local path)."""

    name_or_path: str
    architecture: str
    model_type: str
    hidden_size: int
    vocab_size: int
    num_hidden_layers: int
    config_sha256: str
    tokenizer_sha256: str | None = None
    revision: str | None = None

    def mismatches(self, other: TargetInfo) -> list[str]:
        """Field-by-field differences that matter ('hidden_size: 576 != 4096'); empty when compatible."""
        out = []
        for field in (
            "architecture",
            "hidden_size",
            "vocab_size",
            "num_hidden_layers",
            "config_sha256",
            "tokenizer_sha256",
        ):
            a, b = getattr(self, field), getattr(other, field)
            if a is not None and b is not None and a != b:
                out.append(f"{field}: {a} != {b}")
        return out


def read_model_config(model_dir: str | Path) -> dict:
    """config.json of a model directory as a dict (the text config for multimodal models)."""
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: not found; pass a model directory that holds config.json") from None
    except json.JSONDecodeError as e:
        raise SpecError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(cfg, dict):
        raise SpecError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
        return {"architectures": cfg.get("architectures"), **cfg["text_config"]}
    return cfg


def config_sha256(cfg: dict) -> str:
    stable = {k: v for k, v in cfg.items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(stable, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def tokenizer_sha256(model_dir: str | Path) -> str | None:
    """One hash over the tokenizer files present (None when the directory has none)."""
    h = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        path = Path(model_dir) / name
        if path.is_file():
            found = True
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest() if found else None


def fingerprint_model_dir(
    model_dir: str | Path, name_or_path: str | None = None, revision: str | None = None
) -> TargetInfo:
    """TargetInfo of a local model directory. `name_or_path` defaults to the directory's absolute path."""
    cfg = read_model_config(model_dir)
    path = Path(model_dir) / "config.json"
    for key in ("hidden_size", "vocab_size", "num_hidden_layers"):
        if not isinstance(cfg.get(key), int):
            raise SpecError(f"{path}: field '{key}' must be an integer, found {cfg.get(key)!r}")
    archs = cfg.get("architectures") or ["unknown"]
    return TargetInfo(
        name_or_path=name_or_path or str(Path(model_dir).resolve()),
        architecture=archs[0],
        model_type=str(cfg.get("model_type", "unknown")),
        hidden_size=cfg["hidden_size"],
        vocab_size=cfg["vocab_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        config_sha256=config_sha256(cfg),
        tokenizer_sha256=tokenizer_sha256(model_dir),
        revision=revision,
    )


def default_eagle3_layers(num_hidden_layers: int) -> list[int]:
    """EAGLE-3's auxiliary layers (2, L//2, L-3) plus the last layer L, in vLLM's capture-id convention:
    id k is the residual stream after decoder layer k-1 (0 = embeddings); id L is the last decoder layer's
    output before the final norm."""
    n = num_hidden_layers
    return [min(2, n - 1), n // 2, max(n - 3, 0), n]


LAYER_CONVENTION = (
    "vllm-capture-id: id k is the residual stream after decoder layer k-1 (0 = token embeddings, "
    "k = transformers' hidden_states[k] for k < L); id L is the last decoder layer's output before the final norm"
)
