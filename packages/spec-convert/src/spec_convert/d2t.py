"""The pruned draft vocabulary of a source: d2t as int64 offsets, t2d as bool, consistent with the verifier.

Every supported source and vLLM encode d2t the same way (target_id = draft_id + d2t[draft_id]), so the
values are copied; what differs is dtypes, whether t2d is stored, and the order of draft ids.
"""

from __future__ import annotations

import numpy as np

from spec_convert.strict import Mapped
from spec_format.vocab import vocab_mapping_problems

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
