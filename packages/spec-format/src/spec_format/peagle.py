"""P-EAGLE (parallel drafting): EAGLE-3's checkpoint plus `mask_token_id` and `mask_hidden`, served by vLLM
as EAGLE-3 with parallel drafting. vLLM's speculators updater (`update_peagle`) turns `peagle` into EAGLE-3
with parallel_drafting, and `mask_token_id` into the draft's `pard_token`. Its layers are EAGLE-3's, so
are its default capture layers.
"""

from __future__ import annotations

import msgspec

from spec_format.algorithms import (
    DEFAULT_LAYERS,
    Layout,
    build_eagle3_config,
    eagle3_layout,
    layer_dims,
    register_layout,
    register_serving,
)
from spec_format.checkpoint import SpeculatorConfig
from spec_format.errors import SpecError
from spec_format.fingerprint import TargetInfo, default_eagle3_layers

# Named explicitly (update_peagle would add parallel_drafting), so eval/serve pass it through
# `speculative_config`.
register_serving("peagle", method="eagle3", parallel_drafting=True)
DEFAULT_LAYERS["peagle"] = default_eagle3_layers


@register_layout("peagle")
def peagle_layout(cfg: SpeculatorConfig, source: str = "config.json") -> Layout:
    """P-EAGLE: EAGLE-3's tensors plus `mask_hidden` [1, n_aux*target_hidden], the shared aux state that
    every drafted position after the first reads (through fc, like a real aux state). vLLM's loader
    refuses a parallel-drafting checkpoint without it (llama_eagle3.py load_weights)."""
    vocab = layer_dims(cfg, source).vocab_size
    if cfg.mask_token_id is None or not 0 <= cfg.mask_token_id < vocab:
        raise SpecError(
            f"{source}: field 'mask_token_id' must be a token id in [0, {vocab}), found {cfg.mask_token_id!r}; "
            "P-EAGLE feeds it at every drafted position after the first"
        )
    for flag in ("fc_norm", "norm_output"):
        if getattr(cfg, flag):
            # update_peagle copies neither flag, so vLLM would serve the draft without it.
            raise SpecError(
                f"{source}: field '{flag}' is true; vLLM serves P-EAGLE drafts without {flag}: set it false"
            )
    layout = eagle3_layout(cfg, source)
    n_aux = len(cfg.eagle_aux_hidden_state_layer_ids or []) or 3
    layout.required["mask_hidden"] = (
        1,
        n_aux * (cfg.target_hidden_size or layer_dims(cfg, source).hidden_size),
    )
    return layout


def build_peagle_config(
    verifier_cfg: dict, verifier: TargetInfo, aux_layer_ids: list[int], draft_vocab_size: int,
    mask_token_id: int, speculative_tokens: int = 3, **kwargs,
) -> SpeculatorConfig:  # fmt: skip
    """A complete P-EAGLE config: EAGLE-3's (build_eagle3_config's arguments) plus the mask token."""
    cfg = build_eagle3_config(
        verifier_cfg, verifier, aux_layer_ids, draft_vocab_size, speculative_tokens, **kwargs
    )
    return as_peagle(cfg, mask_token_id)


def as_peagle(cfg: SpeculatorConfig, mask_token_id: int) -> SpeculatorConfig:
    """An EAGLE-3 config turned into P-EAGLE's (the same layer; `--init-from` an EAGLE-3 draft)."""
    if cfg.fc_norm or cfg.norm_output:
        raise SpecError("fc_norm / norm_output: vLLM serves P-EAGLE drafts without them; this draft uses one")
    sc = msgspec.structs.replace(cfg.speculators_config, algorithm="peagle")
    return msgspec.structs.replace(
        cfg, speculators_model_type="peagle", speculators_config=sc, mask_token_id=mask_token_id,
        fc_norm=False, norm_output=False, architectures=["PEagleSpeculator"],
    )  # fmt: skip
