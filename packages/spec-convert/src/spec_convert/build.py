"""One conversion, assembled: what a source module worked out (`Draft`), checked against the format's
layout and turned into a complete EAGLE-3 config and tensors (`Converted`)."""

from __future__ import annotations

import msgspec
import numpy as np

from spec_convert.d2t import vocab_mapping
from spec_convert.source import Source
from spec_convert.strict import ConversionError, Mapped, check_layout
from spec_convert.target import Target
from spec_format.algorithms import as_peagle, layout_for
from spec_format.checkpoint import (
    ProposalMethod,
    SpecMetadata,
    SpeculatorConfig,
    SpeculatorsSection,
    Verifier,
)

DEFAULT_K = 3  # what speculators' converter and vLLM's EAGLE-3 examples use; --k overrides


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
    """The complete EAGLE-3 config; every vLLM flag written explicitly (vLLM's defaults differ by path).
    A P-EAGLE draft is this config through spec_format.algorithms.as_peagle."""
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
    if draft.mask_token_id is not None:
        cfg = as_peagle(cfg, draft.mask_token_id)
    problems = draft.problems + check_layout(m, layout_for(cfg), what, source_name)
    if cfg.target_hidden_size is not None and "embed_tokens.weight" not in m.tensors:
        problems.append(
            f"the draft's hidden size {draft.lc['hidden_size']} differs from the verifier's "
            f"{target.info.hidden_size}, so it needs its own embed_tokens.weight, which the source lacks"
        )
    if problems:
        raise ConversionError(problems)
    return Converted(config=cfg, tensors=m.tensors, float_dtype=dtype, notes=draft.notes)
