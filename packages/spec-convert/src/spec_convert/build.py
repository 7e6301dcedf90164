"""One conversion, assembled: what a source module read off its source (`Draft`: the decoder-layer config,
how the source records its layer ids, flags, notes) is resolved (layer ids, k), checked against the
format's layout and turned into a complete EAGLE-3 config and tensors (`Converted`) by `finish`, the part
every converter shares. A converter module defines ORIGIN, LAYERS and `convert(src, target, options)`, which reads
its layout's config into a Draft, maps tensor names (strict.map_tensors) and returns `finish(...)`."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from spec_convert.d2t import vocab_mapping
from spec_convert.layer_ids import fc_inputs, resolve_layer_ids
from spec_convert.source import Source
from spec_convert.strict import ConversionError, Mapped, check_layout
from spec_convert.target import Target
from spec_format.algorithms import eagle3_config, layout_for
from spec_format.checkpoint import SpeculatorConfig
from spec_format.peagle import as_peagle

DEFAULT_K = 3  # what speculators' converter and vLLM's EAGLE-3 examples use; --k overrides


_FLOAT_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


def float_dtype(dtypes: dict[str, str], names: list[str]) -> tuple[str, str]:
    """(output float dtype, provenance): the source's own when all weights share it (a lossless copy),
    else float32 (holds every fp16/bf16 value exactly)."""
    found = sorted({dtypes[n] for n in names if dtypes.get(n) in ("F16", "BF16", "F32", "F64")})
    if len(found) == 1 and found[0] in _FLOAT_NAMES:
        return _FLOAT_NAMES[found[0]], f"{_FLOAT_NAMES[found[0]]}, as stored in the source"
    return "float32", f"float32 (the source mixes {', '.join(found)})"


class Options(msgspec.Struct):
    """What the user may override: speculative tokens and the auxiliary layer ids (vLLM capture ids)."""

    k: int | None = None
    layers: list[int] | None = None


class Origin(msgspec.Struct, frozen=True):
    """The code base a converter reads: `name` is its --from name, `what` names its drafts in messages,
    `source_name` maps a format tensor name back to the source's (for messages about missing tensors)."""

    name: str
    project: str
    what: str
    source_name: Any = None  # Callable[[str], str]; None: the names are the format's


class LayerIds(msgspec.Struct, frozen=True):
    """How a source records its auxiliary layer ids (see layer_ids.resolve_layer_ids): in config `field`,
    in its own `convention` (vLLM id = x + shift); without them its project uses `default(L)` (vLLM
    capture ids for an L-layer verifier), which `default_rule` explains."""

    default: Any  # Callable[[int], list[int]]
    default_rule: str
    field: str = ""
    convention: str = ""
    shift: int = 0


class Draft(msgspec.Struct):
    """What a source module read off the source; `finish` resolves layer ids and k, checks it against the
    format and builds the result. `k` is the speculative tokens the source records; `source` adds to the
    provenance's source entry; `flags_how` says where the vLLM flags come from."""

    lc: dict
    draft_vocab: int
    layers: LayerIds
    recorded_layers: list[int] | None  # as the source's config holds them (None: it records none)
    flags_how: str
    flags: dict[str, bool] = {}
    renamed: dict[str, str] = {}
    k: int | None = None
    source: dict = {}
    notes: list[str] = []
    problems: list[str] = []
    full_vocab_reason: str | None = None  # the source code discards d2t/t2d for a full vocabulary
    mask_token_id: int | None = None  # set: a P-EAGLE draft (EAGLE-3's layer + mask_hidden)


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
    src: Source, target: Target, options: Options, m: Mapped, draft: Draft, origin: Origin
) -> Converted:
    """Layer ids (--layers, else the source's, else its project's default), k, the vocabulary mapping, the
    config and provenance, and the strict check of every tensor against the format's layout."""
    rules = draft.layers
    layer_ids, layer_how, layer_problems = resolve_layer_ids(
        override=options.layers,
        recorded=list(draft.recorded_layers) if draft.recorded_layers else None,
        shift=rules.shift,
        default=rules.default(target.num_layers),
        default_rule=rules.default_rule,
        target=target,
        n_inputs=fc_inputs(m.tensors.get("fc.weight"), target),
        field=rules.field,
        convention=rules.convention,
    )
    k, k_how = speculative_tokens(options, draft.k)
    V = target.info.vocab_size
    vocab_how = vocab_mapping(m, draft.draft_vocab, V, draft.full_vocab_reason)
    float_names = [n for n, a in m.tensors.items() if a.dtype.kind == "f" and m.origin.get(n) in src.dtypes]
    dtype, dtype_how = float_dtype(src.dtypes, [m.origin[n] for n in float_names])
    provenance = {
        "source": {
            "format": origin.name, "project": origin.project, "path": str(src.path), "files": src.files,
            **draft.source,
        },
        "layer_ids": layer_how,
        "renamed": draft.renamed,
        "speculative_tokens": k_how,
        "flags": draft.flags_how,
        "vocab": vocab_how,
        "dropped": dict(sorted(m.dropped.items())),
        "dtype": dtype_how,
        "notes": draft.notes,
    }  # fmt: skip
    cfg = eagle3_config(draft.lc, target.info, layer_ids, draft.draft_vocab, k, provenance, **draft.flags)
    if draft.mask_token_id is not None:
        cfg = as_peagle(cfg, draft.mask_token_id)
    source_name = origin.source_name or (lambda name: name)
    problems = draft.problems + layer_problems + check_layout(m, layout_for(cfg), origin.what, source_name)
    if cfg.target_hidden_size is not None and "embed_tokens.weight" not in m.tensors:
        problems.append(
            f"the draft's hidden size {draft.lc['hidden_size']} differs from the verifier's "
            f"{target.info.hidden_size}, so it needs its own embed_tokens.weight, which the source lacks"
        )
    if problems:
        raise ConversionError(problems)
    return Converted(config=cfg, tensors=m.tensors, float_dtype=dtype, notes=draft.notes)
