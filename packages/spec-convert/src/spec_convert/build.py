"""What every source converter shares: the verifier, the draft's layer config with its source project's
defaults, the auxiliary layer ids in vLLM's convention, the vocabulary mapping, and the final config.

Layer ids in the output are vLLM capture ids (spec_format.fingerprint.LAYER_CONVENTION): id k is the
residual stream entering decoder layer k (= after layer k-1). Sources that count "the output of decoder
layer x" (SGLang, SpecForge, ModelOpt) store x = k - 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from spec_convert.source import Source
from spec_convert.strict import ConversionError, Mapped, check_layout
from spec_format.algorithms import layout_for
from spec_format.checkpoint import (
    ProposalMethod,
    SpecMetadata,
    SpeculatorConfig,
    SpeculatorsSection,
    Verifier,
)
from spec_format.fingerprint import TargetInfo, fingerprint_model_dir, read_model_config
from spec_format.vocab import vocab_mapping_problems

DEFAULT_K = 3  # what speculators' converter and vLLM's EAGLE-3 examples use; --k overrides

# transformers 4.x LlamaConfig defaults (SafeAILab's EConfig has the same ones; its RoPE base is 10000 when
# the config names none). Configs saved with `save_pretrained` (SpecForge, speculators) omit keys equal to
# these, so a converter must read a missing key as its default, not as "unknown".
LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
    "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "attention_bias": False,
}  # fmt: skip
# transformers Qwen3Config defaults (speculators' default draft layer type since June 2026).
QWEN3_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_attention_heads": 32,
    "num_key_value_heads": 32, "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "attention_bias": False,
}  # fmt: skip
LAYER_DEFAULTS = {"llama": LLAMA_DEFAULTS, "qwen3": QWEN3_DEFAULTS}
_ARCH = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Keys of a source config.json that describe the file, not the draft's decoder layer.
FILE_KEYS = {"architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path", "auto_map"}


class Target(msgspec.Struct):
    """The verifier the draft runs with: its config.json and fingerprint."""

    dir: Path
    config: dict[str, Any]
    info: TargetInfo

    @property
    def num_layers(self) -> int:
        return self.info.num_hidden_layers


def read_target(verifier_dir: str | Path, name: str | None = None) -> Target:
    """`name` is what the output records as the verifier (default: the directory's absolute path)."""
    d = Path(verifier_dir)
    return Target(dir=d, config=read_model_config(d), info=fingerprint_model_dir(d, name_or_path=name))


# --- the draft's decoder-layer config -----------------------------------------------------------------


def _rope_mirrors(lc: dict) -> list[str]:
    """Drop what only repeats the RoPE base: a top-level rope_theta / rope_scaling mirroring
    `rope_parameters` (transformers 5 keeps RoPE there; SpecForge's exporter and ours mirror it to the
    legacy keys for older readers), and a rope_scaling of type "default" (ModelOpt writes
    {"rope_type": "default", "rope_theta": t}: no scaling, only the base)."""
    dropped = []
    scaling = lc.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "default":
        theta = scaling.get("rope_theta", lc.get("rope_theta"))
        if set(scaling) <= {"rope_type", "type", "rope_theta"} and lc.get("rope_theta", theta) == theta:
            if theta is not None:
                lc["rope_theta"] = theta
            del lc["rope_scaling"]
            dropped.append("rope_scaling")
    params = lc.get("rope_parameters")
    if isinstance(params, dict):
        if "rope_theta" in lc and lc["rope_theta"] == params.get("rope_theta"):
            del lc["rope_theta"]
            dropped.append("rope_theta")
        if lc.get("rope_scaling") is not None and lc["rope_scaling"] == {
            k: v for k, v in params.items() if k != "rope_theta"
        }:
            del lc["rope_scaling"]
            dropped.append("rope_scaling")
    return dropped


def layer_config(
    source_cfg: dict,
    *,
    skip: set[str],
    num_layers: int,
    target: Target,
    layer_type: str = "llama",
) -> tuple[dict, list[str]]:
    """(transformer_layer_config, notes) from a source config: its decoder keys, minus `skip` and file keys,
    with the source's defaults written out for the keys that shape the computation."""
    lc = {k: v for k, v in source_cfg.items() if k not in skip | FILE_KEYS and v is not None}
    notes = [f"config.json: '{k}' only repeats the RoPE base (dropped)" for k in _rope_mirrors(lc)]
    defaults = LAYER_DEFAULTS[layer_type]
    filled = []
    for key, value in defaults.items():
        if key == "rope_theta" and "rope_parameters" in lc:
            continue
        if key not in lc:
            lc[key] = value
            filled.append(f"{key}={value}")
    lc.setdefault("num_key_value_heads", lc["num_attention_heads"])
    lc.setdefault("head_dim", lc["hidden_size"] // lc["num_attention_heads"])
    if filled:
        notes.append(
            f"config.json omits {', '.join(filled)}: the {layer_type} config defaults the source code reads"
        )
    # Plain RoPE does not depend on max_position_embeddings; a smaller value only caps what vLLM may run.
    kinds = {
        (lc.get(key) or {}).get("rope_type") or (lc.get(key) or {}).get("type")
        for key in ("rope_scaling", "rope_parameters")
    }
    scaled = bool(kinds - {None, "default"})
    target_max = target.config.get("max_position_embeddings")
    if not scaled and isinstance(target_max, int) and lc["max_position_embeddings"] < target_max:
        notes.append(
            f"max_position_embeddings raised from {lc['max_position_embeddings']} to the verifier's {target_max} "
            "(plain RoPE: the draft computes the same, and vLLM can draft at every position the verifier serves)"
        )
        lc["max_position_embeddings"] = target_max
    lc.update(
        model_type=layer_type,
        architectures=[_ARCH[layer_type]],
        num_hidden_layers=num_layers,
        tie_word_embeddings=False,
    )
    return lc, notes


def check_dims(lc: dict, source_cfg: dict, target: Target, where: str = "config.json") -> list[str]:
    """The draft belongs to this verifier: same vocabulary (embeddings, t2d and d2t index into it) and, when
    the source states it, the verifier hidden size fc was trained on."""
    problems = []
    if lc.get("vocab_size") != target.info.vocab_size:
        problems.append(
            f"{where}: vocab_size is {lc.get('vocab_size')}, the verifier's is {target.info.vocab_size} "
            f"({target.dir}/config.json): this draft was made for another vocabulary"
        )
    stated = source_cfg.get("target_hidden_size")
    if stated is not None and stated != target.info.hidden_size:
        problems.append(
            f"{where}: target_hidden_size is {stated}, the verifier's hidden_size is {target.info.hidden_size}: "
            "this draft was made for another verifier"
        )
    return problems


# --- auxiliary layer ids ------------------------------------------------------------------------------


def resolve_layer_ids(
    *,
    override: list[int] | None,
    recorded: list[int] | None,
    shift: int,
    default: list[int],
    field: str,
    convention: str,
    default_rule: str,
    target: Target,
    n_inputs: int,
) -> tuple[list[int], dict, list[str]]:
    """(ids in vLLM's convention, provenance, problems).

    recorded: the source's own ids (in its `convention`), converted with `+ shift`; default: the source
    project's ids in vLLM's convention when it records none (`default_rule` says where they come from);
    override: --layers, already in vLLM's convention. n_inputs: how many hidden states fc takes."""
    if override is not None:
        ids = list(override)
        how = {"value": ids, "from": "--layers (vLLM capture ids)"}
        if recorded is not None:
            how["source"] = {"field": field, "value": recorded, "convention": convention}
    elif recorded is not None:
        ids = [x + shift for x in recorded]
        how = {
            "value": ids,
            "from": f"source field '{field}' = {recorded} ({convention})"
            + (f"; vLLM id = x + {shift}" if shift else ""),
        }
    else:
        ids = list(default)
        how = {
            "value": ids,
            "from": f"the source records no layer ids; {default_rule}; override with --layers",
        }
    L = target.num_layers
    problems = []
    if sorted(set(ids)) != ids:
        problems.append(
            f"auxiliary layer ids {ids} must be distinct and increasing (vLLM concatenates the hidden states "
            f"in layer order); for a {L}-layer verifier pass --layers explicitly"
        )
    bad = [i for i in ids if not 0 <= i <= L]
    if bad:
        problems.append(f"auxiliary layer ids {bad} lie outside [0, {L}] for the {L}-layer verifier")
    if len(ids) != n_inputs:
        problems.append(
            f"{len(ids)} auxiliary layer ids {ids} but fc.weight takes {n_inputs} hidden states of the verifier; "
            "pass that many ids with --layers"
        )
    return ids, how, problems


def fc_inputs(fc: np.ndarray | None, target: Target) -> int:
    """How many verifier hidden states fc concatenates (its in-features / the verifier's hidden size)."""
    if fc is None or fc.ndim != 2 or fc.shape[1] % target.info.hidden_size:
        return 3  # the shape check reports the actual problem
    return fc.shape[1] // target.info.hidden_size


# --- the vocabulary mapping ---------------------------------------------------------------------------

D2T_OFFSETS = "offsets: target_id = draft_id + d2t[draft_id]"


def vocab_mapping(
    m: Mapped, draft_vocab: int, target_vocab: int, full_vocab_reason: str | None = None
) -> dict:
    """Normalise d2t (int64 offsets) and t2d (bool) in place; returns their provenance, adds problems.

    With a full-size draft vocabulary vLLM loads no d2t, so an identity mapping (or any mapping, when the
    source code itself discards it: `full_vocab_reason`) is dropped; a permutation is refused."""
    how: dict[str, str] = {}
    if "d2t" in m.tensors and m.tensors["d2t"].dtype.kind in "iu" and m.tensors["d2t"].dtype != np.int64:
        how["d2t_dtype"] = f"{m.tensors['d2t'].dtype} widened to int64"
        m.tensors["d2t"] = m.tensors["d2t"].astype(np.int64)
    if "t2d" in m.tensors and m.tensors["t2d"].dtype.kind in "iu":
        if not np.isin(m.tensors["t2d"], (0, 1)).all():
            m.problems.append("tensor 't2d' holds values other than 0 and 1")
        how["t2d_dtype"] = f"{m.tensors['t2d'].dtype} 0/1 mask stored as bool"
        m.tensors["t2d"] = m.tensors["t2d"].astype(np.bool_)
    if draft_vocab == target_vocab:
        if "d2t" in m.tensors or "t2d" in m.tensors:
            d2t = m.tensors.get("d2t")
            identity = d2t is None or (d2t.ndim == 1 and not d2t.any())
            if not identity and full_vocab_reason is None:
                m.problems.append(
                    "d2t permutes a full-size draft vocabulary; vLLM reads no d2t when draft_vocab_size equals "
                    "the target vocabulary, so this draft cannot be served as it is"
                )
            reason = full_vocab_reason or "identity mapping over the full vocabulary (vLLM reads no d2t then)"
            for name in ("d2t", "t2d"):
                if name in m.tensors:
                    m.dropped[m.origin.pop(name)] = reason
                    del m.tensors[name]
        how["d2t"] = "none: the draft predicts over the full target vocabulary"
        return how
    d2t = m.tensors.get("d2t")
    if d2t is None or d2t.ndim != 1 or d2t.dtype.kind not in "iu":
        return how  # check_layout names the missing or malformed tensor
    how["d2t"] = f"{D2T_OFFSETS} (source and vLLM use the same encoding; copied unchanged)"
    if "t2d" not in m.tensors:
        problems = vocab_mapping_problems(d2t, None, target_vocab)
        if not problems:
            t2d = np.zeros(target_vocab, dtype=np.bool_)
            t2d[np.arange(len(d2t)) + d2t] = True
            m.tensors["t2d"] = t2d
            m.origin["t2d"] = "t2d"
            how["t2d"] = "derived from d2t (the source stores none; vLLM never reads it, exporters do)"
    m.problems.extend(
        f"vocabulary mapping: {p}" for p in vocab_mapping_problems(d2t, m.tensors.get("t2d"), target_vocab)
    )
    if np.any(np.diff(np.arange(len(d2t)) + d2t) < 0):
        how["order"] = "draft ids are not in target-id order (kept: lm_head rows follow the draft ids)"
    return how


# --- dtype and final config ---------------------------------------------------------------------------

_FLOAT_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


def float_dtype(dtypes: dict[str, str], names: list[str]) -> tuple[str, str]:
    """(output float dtype, provenance): the source's own when all weights share it (a lossless copy),
    else float32 (holds every fp16/bf16 value exactly)."""
    found = sorted({dtypes[n] for n in names if dtypes.get(n) in ("F16", "BF16", "F32", "F64")})
    if len(found) == 1 and found[0] in _FLOAT_NAMES:
        return _FLOAT_NAMES[found[0]], f"{_FLOAT_NAMES[found[0]]}, as stored in the source"
    return "float32", f"float32 (the source mixes {', '.join(found)})"


def eagle3_config(
    lc: dict,
    target: Target,
    aux_ids: list[int],
    draft_vocab: int,
    k: int,
    provenance: dict,
    *,
    norm_before_residual: bool = False,
    norm_before_fc: bool = False,
    fc_norm: bool = False,
    norm_output: bool = False,
    extra: dict | None = None,
) -> SpeculatorConfig:
    """The complete EAGLE-3 config; every vLLM flag written explicitly (vLLM's defaults differ by path)."""
    return SpeculatorConfig(
        speculators_model_type="eagle3",
        speculators_config=SpeculatorsSection(
            algorithm="eagle3",
            proposal_methods=[ProposalMethod(speculative_tokens=k)],
            verifier=Verifier(
                name_or_path=target.info.name_or_path, architectures=[target.info.architecture]
            ),
        ),
        transformer_layer_config=lc,
        draft_vocab_size=draft_vocab,
        target_hidden_size=target.info.hidden_size if target.info.hidden_size != lc["hidden_size"] else None,
        eagle_aux_hidden_state_layer_ids=aux_ids,
        norm_before_residual=norm_before_residual,
        norm_before_fc=norm_before_fc,
        fc_norm=fc_norm,
        norm_output=norm_output,
        architectures=["Eagle3DraftModel"],
        tie_word_embeddings=False,
        spec=SpecMetadata(verifier=target.info, provenance=provenance),
        **(extra or {}),
    )


# --- one conversion -----------------------------------------------------------------------------------


class Options(msgspec.Struct):
    """What the user may override: speculative tokens and the auxiliary layer ids (vLLM capture ids)."""

    k: int | None = None
    layers: list[int] | None = None


class Draft(msgspec.Struct):
    """What a source module worked out; `finish` checks it against the format and builds the result."""

    lc: dict
    layer_ids: list[int]
    draft_vocab: int
    k: int
    provenance: dict
    flags: dict[str, bool] = {}
    notes: list[str] = []
    problems: list[str] = []
    full_vocab_reason: str | None = None  # the source code discards d2t/t2d for a full vocabulary


class Converted(msgspec.Struct):
    config: SpeculatorConfig
    tensors: dict[str, np.ndarray]
    float_dtype: str
    notes: list[str]


def speculative_tokens(options: Options, recorded: int | None = None) -> tuple[int, str]:
    if options.k is not None:
        return options.k, f"{options.k} (--k)"
    if recorded is not None:
        return recorded, f"{recorded} (from the source config)"
    return DEFAULT_K, f"{DEFAULT_K} (the source records none; set it with --k)"


def finish(
    src: Source, target: Target, m: Mapped, draft: Draft, what: str, source_name=lambda name: name
) -> Converted:
    """Vocabulary mapping, the config, and the strict check of every tensor against the format's layout.
    `source_name` maps a format name back to the source's (for messages about missing tensors)."""
    V = target.info.vocab_size
    vocab_how = vocab_mapping(m, draft.draft_vocab, V, draft.full_vocab_reason)
    float_names = [n for n, a in m.tensors.items() if a.dtype.kind == "f" and m.origin.get(n) in src.dtypes]
    dtype, dtype_how = float_dtype(src.dtypes, [m.origin[n] for n in float_names])
    provenance = {
        **draft.provenance,
        "vocab": vocab_how,
        "dropped": dict(sorted(m.dropped.items())),
        "dtype": dtype_how,
        "notes": draft.notes,
    }
    cfg = eagle3_config(
        draft.lc, target, draft.layer_ids, draft.draft_vocab, draft.k, provenance, **draft.flags
    )
    problems = draft.problems + check_layout(m, layout_for(cfg), what, source_name)
    if cfg.target_hidden_size is not None and "embed_tokens.weight" not in m.tensors:
        problems.append(
            f"the draft's hidden size {draft.lc['hidden_size']} differs from the verifier's "
            f"{target.info.hidden_size}, so it needs its own embed_tokens.weight, which the source lacks"
        )
    if problems:
        raise ConversionError(problems)
    return Converted(config=cfg, tensors=m.tensors, float_dtype=dtype, notes=draft.notes)
