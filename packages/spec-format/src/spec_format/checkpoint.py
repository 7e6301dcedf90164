"""The speculator checkpoint: a directory with config.json + model.safetensors that vLLM loads as it is.

config.json follows the vllm-project/speculators format, which vLLM reads in
vllm/transformers_utils/configs/speculators/ (`maybe_override_with_speculators`): vLLM requires
`speculators_model_type`, `speculators_config.proposal_methods[0].speculative_tokens`,
`speculators_config.verifier.name_or_path` and a `transformer_layer_config` dict; the algorithm's updater
(EAGLE-3: `update_eagle3`) then copies `draft_vocab_size`, `target_hidden_size`, `norm_before_residual`
(vLLM's default when absent: True), `norm_before_fc`, `fc_norm`, `norm_output` and
`eagle_aux_hidden_state_layer_ids` into the draft's layer config. We always write these flags explicitly:
their defaults differ between vLLM's speculators path and its plain EAGLE-3 path.

Our additions live under one top-level key, `spec` (vLLM ignores it): format version, layer-index
convention, verifier fingerprint, provenance and the sha256 of model.safetensors. A plain speculators
checkpoint has no `spec` key and is valid as it is.

Integrity (format version 2): config.json ends with `"spec_sha256": "<hex>"`, the sha256 of the file's
bytes before it (spec_format.files.seal_json), and `spec.weights_sha256` is that of model.safetensors, so a
flipped, cut or lost byte in either file is an error of `spec validate`, of loading and of `--resume`.
vLLM reads both keys as unknown config attributes and ignores them. Version 1 checkpoints (no seal) are
still read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from spec_format.errors import SpecError
from spec_format.files import file_sha256, seal_json, seal_problem
from spec_format.fingerprint import LAYER_CONVENTION, TargetInfo
from spec_format.tensors import load_tensors, save_tensors

FORMAT_VERSION = 2
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SEAL = "spec_sha256"  # config.json's last key: the sha256 of the bytes before it


class ProposalMethod(msgspec.Struct):
    speculative_tokens: int
    proposal_type: str = "greedy"
    verifier_accept_k: int = 1
    accept_tolerance: float = 0.0


class Verifier(msgspec.Struct):
    name_or_path: str
    architectures: list[str] = []


class SpeculatorsSection(msgspec.Struct):
    algorithm: str
    proposal_methods: list[ProposalMethod]
    verifier: Verifier
    default_proposal_method: str = "greedy"


class SpecMetadata(msgspec.Struct):
    """Our additions. `provenance` is free-form JSON: how the draft was made (training run, conversion)."""

    format_version: int = FORMAT_VERSION
    layer_index_convention: str = LAYER_CONVENTION
    verifier: TargetInfo | None = None
    provenance: dict[str, Any] = {}
    weights_sha256: str | None = None  # hex sha256 of model.safetensors (format version 2)


class SpeculatorConfig(msgspec.Struct, omit_defaults=True):
    speculators_model_type: str
    speculators_config: SpeculatorsSection
    transformer_layer_config: dict[str, Any]
    draft_vocab_size: int | None = None
    target_hidden_size: int | None = None
    # EAGLE-3: the target layers whose hidden states feed `fc`, in vLLM's capture-id convention
    # (id k = residual stream after decoder layer k-1).
    eagle_aux_hidden_state_layer_ids: list[int] | None = None
    # DFlash (speculators' field names, spec_format.dflash): the fc inputs in the same capture-id
    # convention as EAGLE-3's ids (vLLM subtracts 1 for its dflash_config.target_layer_ids); the token whose
    # embedding fills the masked block slots is `mask_token_id` below; block_size = speculative_tokens + 1.
    aux_hidden_state_layer_ids: list[int] | None = None
    block_size: int | None = None
    sample_from_anchor: bool | None = None
    sliding_window_non_causal: bool | None = None
    norm_before_residual: bool | None = None
    norm_before_fc: bool | None = None
    fc_norm: bool | None = None
    norm_output: bool | None = None
    embed_requires_grad: bool | None = None
    # Parallel drafters (P-EAGLE, DFlash): the token id every drafted position after the first reads
    # (vLLM's `pard_token` / `dflash_config.mask_token_id`).
    mask_token_id: int | None = None
    # Written by speculators / transformers; accepted and kept, not interpreted.
    architectures: list[str] | None = None
    auto_map: dict[str, Any] | None = None
    speculators_version: str | None = None
    torch_dtype: str | None = None
    dtype: str | None = None
    tie_word_embeddings: bool | None = None
    transformers_version: str | None = None
    spec: SpecMetadata | None = None

    @property
    def algorithm(self) -> str:
        return self.speculators_model_type

    @property
    def speculative_tokens(self) -> int:
        return self.speculators_config.proposal_methods[0].speculative_tokens

    @property
    def aux_layer_ids(self) -> list[int]:
        """The fc inputs' capture ids, whichever algorithm's field holds them."""
        return list(self.eagle_aux_hidden_state_layer_ids or self.aux_hidden_state_layer_ids or [])

    @property
    def verifier_name(self) -> str:
        return self.speculators_config.verifier.name_or_path


# Fields of a real speculators config.json that we accept without interpreting them.
_TOLERATED_FIELDS = {"has_no_defaults_at_init", "model_type", "_name_or_path", SEAL}
KNOWN_FIELDS = set(SpeculatorConfig.__struct_fields__) | _TOLERATED_FIELDS


def _field_path(msg: str) -> str:
    """msgspec says '... - at `$.a.b[0]`'; turn that into 'field a.b[0]: ...'."""
    if " - at `$" in msg:
        what, where = msg.split(" - at `$", 1)
        return f"field '{where.rstrip('`').lstrip('.')}': {what}"
    return msg


def parse_config(raw: Any, source: str = CONFIG_NAME) -> tuple[SpeculatorConfig, list[str]]:
    """(config, warnings) from a decoded config.json. Unknown top-level fields are warnings."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a JSON object, found {type(raw).__name__}")
    try:
        cfg = msgspec.convert(raw, SpeculatorConfig)
    except msgspec.ValidationError as e:
        raise SpecError(f"{source}: {_field_path(str(e))}") from None
    warnings = [f"{source}: unknown field '{k}' (ignored)" for k in sorted(set(raw) - KNOWN_FIELDS)]
    if not cfg.speculators_config.proposal_methods:
        raise SpecError(
            f"{source}: field 'speculators_config.proposal_methods' is empty; add one greedy proposal method"
        )
    k = cfg.speculative_tokens
    if k < 1:
        raise SpecError(
            f"{source}: field 'speculators_config.proposal_methods[0].speculative_tokens' is {k}; it must be at least 1"
        )
    return cfg, warnings


def read_config(path: str | Path) -> tuple[SpeculatorConfig, list[str]]:
    """Config of a checkpoint directory (or of a config.json path) and its warnings."""
    path = Path(path)
    file = path / CONFIG_NAME if path.is_dir() else path
    try:
        raw = json.loads(file.read_bytes())
    except FileNotFoundError:
        raise SpecError(
            f"{file}: not found; a speculator checkpoint directory holds config.json and model.safetensors"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        detail = f" ({e.msg} at line {e.lineno})" if isinstance(e, json.JSONDecodeError) else ""
        raise SpecError(f"{file}: not valid JSON{detail}") from None
    if isinstance(raw, dict) and _sealed(raw) and (problem := seal_problem(file.read_bytes(), SEAL)):
        raise SpecError(f"{file}: {problem}: the file is corrupted or was edited; restore it (or re-export "
                        f"the draft), or, if you edited it on purpose, run: spec validate --reseal {file.parent}")  # fmt: skip
    return parse_config(raw, str(file))


def _sealed(raw: dict) -> bool:
    """Whether config.json must carry its seal: it has one, or our metadata says format version >= 2."""
    spec = raw.get("spec")
    version = spec.get("format_version", 1) if isinstance(spec, dict) else 1
    return SEAL in raw or (isinstance(spec, dict) and (not isinstance(version, int) or version >= 2))


def weights_problem(path: str | Path, cfg: SpeculatorConfig) -> str | None:
    """model.safetensors against the sha256 config.json records for it (None when it matches or none is
    recorded: a plain speculators checkpoint)."""
    want = cfg.spec.weights_sha256 if cfg.spec else None
    needs = cfg.spec is not None and cfg.spec.format_version >= 2
    file = Path(path) / WEIGHTS_NAME
    if want is None:
        return f"{file.parent / CONFIG_NAME}: field 'spec.weights_sha256' is missing" if needs else None
    if not file.is_file():
        return f"{file}: not found; restore it (config.json records its sha256)"
    found = file_sha256(file)
    if found != want:
        return (f"{file}: sha256 is {found[:16]}..., config.json's spec.weights_sha256 says {want[:16]}...: "
                "the weights are corrupted: restore them")  # fmt: skip
    return None


def _dump(raw: dict) -> bytes:
    return seal_json(json.dumps({k: v for k, v in raw.items() if k != SEAL}, indent=2).encode(), SEAL)


def write_speculative_tokens(path: str | Path, k: int) -> int:
    """Set the draft's k (`proposal_methods[0].speculative_tokens`) in its config.json, keeping every
    other field as written; validated before an atomic replace. Returns the old value."""
    file = Path(path) / CONFIG_NAME
    read_config(path)  # the file as it is must be valid
    raw = json.loads(file.read_bytes())
    old = raw["speculators_config"]["proposal_methods"][0]["speculative_tokens"]
    raw["speculators_config"]["proposal_methods"][0]["speculative_tokens"] = k
    parse_config(raw, str(file))
    tmp = file.with_name(f".{CONFIG_NAME}.tmp-{os.getpid()}")
    tmp.write_bytes(_dump(raw))
    os.replace(tmp, file)
    return old


def reseal_checkpoint(path: str | Path) -> None:
    """Seal config.json and record model.safetensors' sha256 again, as they are now: for files changed on
    purpose (a hand edit, a test that writes a broken file as a faulty writer would)."""
    file = Path(path) / CONFIG_NAME
    try:
        raw = json.loads(file.read_bytes())
    except (OSError, ValueError) as e:  # ValueError: bad JSON or UTF-8
        raise SpecError(f"{file}: cannot reseal: {e}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{file}: cannot reseal: not a JSON object")
    if isinstance(raw.get("spec"), dict) and (Path(path) / WEIGHTS_NAME).is_file():
        raw["spec"]["weights_sha256"] = file_sha256(Path(path) / WEIGHTS_NAME)
    tmp = file.with_name(f".{CONFIG_NAME}.tmp-{os.getpid()}")
    tmp.write_bytes(_dump(raw))
    os.replace(tmp, file)


def config_to_dict(cfg: SpeculatorConfig) -> dict[str, Any]:
    return msgspec.to_builtins(cfg)


def write_checkpoint(
    out_dir: str | Path, cfg: SpeculatorConfig, tensors: dict[str, np.ndarray], float_dtype: str = "bfloat16"
) -> Path:
    """Write config.json + model.safetensors into out_dir (each file atomically).

    Floating-point tensors are stored as `float_dtype` (bf16 by default, as speculators does); d2t (int64)
    and t2d (bool) keep their types. The weights are written before the config, so a directory with a
    config.json always has the weights that belong to it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = msgspec.structs.replace(cfg, torch_dtype=float_dtype, dtype=float_dtype)
    save_tensors(out / WEIGHTS_NAME, tensors, float_dtype=float_dtype)
    if cfg.spec is not None:
        sha = file_sha256(out / WEIGHTS_NAME)
        spec = msgspec.structs.replace(cfg.spec, format_version=FORMAT_VERSION, weights_sha256=sha)
        cfg = msgspec.structs.replace(cfg, spec=spec)
    tmp = out / f".{CONFIG_NAME}.tmp-{os.getpid()}"
    tmp.write_bytes(_dump(config_to_dict(cfg)))
    os.replace(tmp, out / CONFIG_NAME)
    return out


def read_checkpoint(path: str | Path) -> tuple[SpeculatorConfig, dict[str, np.ndarray]]:
    """(config, tensors) of a checkpoint directory; float tensors come back as float32 numpy arrays."""
    cfg, _ = read_config(path)
    if problem := weights_problem(path, cfg):
        raise SpecError(problem)
    return cfg, load_tensors(Path(path) / WEIGHTS_NAME)


def is_checkpoint_dir(path: str | Path) -> bool:
    """A directory with a config.json is treated as a checkpoint; validation says what is wrong with it."""
    return (Path(path) / CONFIG_NAME).is_file()
