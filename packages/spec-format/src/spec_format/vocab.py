"""The pruned draft vocabulary: d2t / t2d, the encoding EAGLE, SpecForge, ModelOpt, speculators and vLLM share.

d2t: int64 [draft_vocab], an OFFSET: target_id = draft_id + d2t[draft_id] (not the target id itself).
t2d: bool [target_vocab], True for the target ids that the draft vocabulary holds.
Draft ids enumerate the kept target ids in increasing order, so d2t is non-decreasing and >= 0.
"""

from __future__ import annotations

import msgspec
import numpy as np


class VocabMapping(msgspec.Struct, frozen=True):
    d2t: np.ndarray  # int64 [draft_vocab]
    t2d: np.ndarray  # bool [target_vocab]
    # Kept ids that never occurred in the data (filled after the seen ones, by token id).
    num_unseen: int = 0

    @property
    def target_ids(self) -> np.ndarray:
        """int64 [draft_vocab]: the target id of each draft id."""
        return np.arange(len(self.d2t), dtype=np.int64) + self.d2t


def build_vocab_mapping(frequencies: np.ndarray, draft_vocab_size: int) -> VocabMapping:
    """Keep the `draft_vocab_size` most frequent target ids (ties and never-seen ids by lowest id).

    frequencies: int [target_vocab], counts over supervised tokens. When fewer distinct ids were seen than
    the draft vocabulary holds, the rest is filled with unseen ids in id order (`num_unseen` says how many).
    """
    freq = np.asarray(frequencies, dtype=np.int64)
    target_vocab = freq.shape[0]
    if not 1 <= draft_vocab_size <= target_vocab:
        raise ValueError(
            f"draft_vocab_size must be in [1, {target_vocab}] (the target vocabulary), got {draft_vocab_size}"
        )
    # Stable sort on -freq keeps equal counts in increasing id order.
    order = np.argsort(-freq, kind="stable")[:draft_vocab_size]
    kept = np.sort(order)
    num_unseen = int((freq[kept] == 0).sum())
    d2t = kept - np.arange(draft_vocab_size, dtype=np.int64)
    t2d = np.zeros(target_vocab, dtype=np.bool_)
    t2d[kept] = True
    return VocabMapping(d2t=d2t, t2d=t2d, num_unseen=num_unseen)


def vocab_mapping_problems(d2t: np.ndarray, t2d: np.ndarray | None, target_vocab: int) -> list[str]:
    """What is wrong with a d2t/t2d pair (empty list when consistent)."""
    problems = []
    d2t = np.asarray(d2t)
    if d2t.ndim != 1 or d2t.dtype.kind not in "iu":
        return [f"d2t must be a 1-D integer tensor, found {d2t.dtype}{list(d2t.shape)}"]
    targets = np.arange(len(d2t), dtype=np.int64) + d2t.astype(np.int64)
    bad = np.flatnonzero((targets < 0) | (targets >= target_vocab))
    if len(bad):
        i = int(bad[0])
        problems.append(
            f"d2t maps draft id {i} to target id {int(targets[i])}, outside the target vocabulary [0, {target_vocab}) "
            f"({len(bad)} such ids); d2t holds offsets (target = draft + d2t[draft])"
        )
        return problems
    if len(np.unique(targets)) != len(targets):
        problems.append("d2t maps two draft ids to the same target id")
    if t2d is not None:
        t2d = np.asarray(t2d)
        if t2d.shape != (target_vocab,):
            problems.append(
                f"t2d has shape {list(t2d.shape)}, expected [{target_vocab}] (the target vocabulary)"
            )
        elif int(t2d.astype(bool).sum()) != len(d2t):
            problems.append(
                f"t2d marks {int(t2d.astype(bool).sum())} target ids but d2t has {len(d2t)} draft ids"
            )
        elif not t2d.astype(bool)[targets].all():
            problems.append("t2d and d2t disagree: some target ids of d2t are not marked in t2d")
    return problems
