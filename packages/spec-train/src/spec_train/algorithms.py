"""Training algorithms by name (`spec train --algorithm NAME`, the draft's `speculators_model_type`).

An algorithm is one module of plain functions (spec_train/eagle3.py, peagle.py, ...) that registers an
`Algorithm`: what differs between drafting methods. Everything else (data, loss against the verifier,
optimiser, resume, DDP/FSDP2, metrics, checkpoints) is train.py's and shared.

    build_draft(cfg, ds, d) -> (draft, aux_idx, last_idx)
        a new draft for the verifier, or cfg.init_from loaded (and converted) to fine-tune; aux_idx /
        last_idx are the positions of its aux layers and of the last layer in the dataset's layers.
    forward(draft, batch, steps, attn, cfg) -> (normed [S, T, H], valid bool [S, T])
        the lm_head inputs of one packed row (data.RowLoader.load) for S drafted depths, and which
        (depth j, slot t) count in the loss. Depth j at slot t predicts x_{t+2+j} (loss.py aligns the
        verifier's targets that way). Runs under the trainer's autocast. cfg: the run's TrainConfig, or
        None (tests, benchmarks) for its defaults.
    slot_counts(loss_mask [T], position_ids [T], steps, cfg) -> float [S]
        the expected number of counted slots per depth of a row, from token data alone: the trainer sums
        it over the global batch before any forward and scales each depth's loss by weight / count.
    accept_counts(draft, head, batch, k, attn, dtype) -> (accepted [k], reached [k])
        simulated greedy acceptance over a packed row, for training metrics (one forward).
    offline_counts(draft, head, sample, k) -> (accepted [k], reached [k])
        the same numbers for one sample computed the way vLLM drafts (KV cache): the reference that
        tests hold accept_counts to.
    propose(draft, next_ids [B, L], aux [B, L, A], lengths [B], k) -> [B, k] target ids
        greedy proposals exactly as vLLM's drafter makes them (spec eval --offline replays rounds with it).
    position_weights: "decay" or "dpace"
        how the depths share the loss when the run sets neither --position-weights nor --step-weights.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from spec_format.errors import SpecError


@dataclass(frozen=True)
class Algorithm:
    build_draft: Callable
    forward: Callable
    slot_counts: Callable
    accept_counts: Callable
    offline_counts: Callable
    propose: Callable
    position_weights: str = "decay"


ALGORITHMS: dict[str, Algorithm] = {}
BUILTIN = ("eagle3", "peagle", "dflash")  # modules spec_train.<name>, imported on first use


def register_algorithm(name: str, algorithm: Algorithm) -> None:
    ALGORITHMS[name] = algorithm


def get_algorithm(name: str) -> Algorithm:
    """The registered algorithm (its module imported on first use); a SpecError naming the known ones."""
    if name not in ALGORITHMS and name in BUILTIN:
        importlib.import_module(f"spec_train.{name}")
    if name not in ALGORITHMS:
        raise SpecError(
            f"--algorithm {name}: spec train knows {', '.join(sorted(set(BUILTIN) | set(ALGORITHMS)))}"
        )
    return ALGORITHMS[name]
