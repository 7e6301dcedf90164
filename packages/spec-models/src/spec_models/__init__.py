"""spec-models: draft architectures (EAGLE-3 first) in plain PyTorch, computing what vLLM's draft
implementations compute, saved and loaded through spec-format.

    model = init_eagle3_from_verifier(verifier_dir, vocab_mapping=mapping, num_layers=1)
    normed = forward_ttt(model, ttt_input_ids(ids, steps=3), aux, position_ids)   # training
    tokens = propose(model, next_ids, aux, lengths, num_tokens=3)                   # offline drafting
    save(model, out_dir); model = load(out_dir)
"""

from spec_models.checkpoint import load, save
from spec_models.dflash import DFlashDraft, init_dflash_from_verifier, propose_dflash
from spec_models.drafting import KVCache, extend, greedy_step, propose
from spec_models.eagle3 import Eagle3Draft, init_eagle3_from_verifier
from spec_models.peagle import (
    PEagleDraft,
    forward_parallel,
    init_peagle_from_verifier,
    peagle_from_eagle3,
    propose_parallel,
)
from spec_models.registry import draft_class, register_draft
from spec_models.ttt import forward_ttt, ttt_input_ids, ttt_mask

__all__ = [
    "DFlashDraft",
    "init_dflash_from_verifier",
    "propose_dflash",
    "Eagle3Draft",
    "KVCache",
    "PEagleDraft",
    "draft_class",
    "extend",
    "forward_parallel",
    "forward_ttt",
    "greedy_step",
    "init_eagle3_from_verifier",
    "init_peagle_from_verifier",
    "load",
    "peagle_from_eagle3",
    "propose",
    "propose_parallel",
    "register_draft",
    "save",
    "ttt_input_ids",
    "ttt_mask",
]
