"""DFlash (z-lab, arXiv 2602.06036): the checkpoint as vLLM 0.32 reads it, in the speculators layout.

config.json: `speculators_model_type: "dflash"`, `transformer_layer_config` with Qwen3 fields
(`num_hidden_layers` = draft layers, `vocab_size` = the target's), `aux_hidden_state_layer_ids`,
`mask_token_id`, `draft_vocab_size`, `target_hidden_size` when it differs, `block_size` (= k + 1),
`speculators_config.proposal_methods[0].speculative_tokens` (= k) and the verifier. vLLM's updater
(vllm/transformers_utils/configs/speculators/algos.py `update_dflash`) turns it into a
`DFlashDraftModel` config with `dflash_config = {mask_token_id, target_layer_ids: [id - 1 ...]}`.

Layer ids. `aux_hidden_state_layer_ids` use the same convention as EAGLE-3's
`eagle_aux_hidden_state_layer_ids` (fingerprint.LAYER_CONVENTION): vLLM capture ids, id k = the residual
stream after decoder layer k-1 = transformers' hidden_states[k]; a dataset captured with layers [2, 15, 27,
30] feeds a draft with ids [2, 15, 27]. z-lab's `dflash_config.target_layer_ids` count decoder layers whose
OUTPUT is read, i.e. capture id - 1 (vLLM adds 1 back); spec-convert translates. Proved on the real
target by tests/test_models_vllm_parity.py::test_vllm_drafts_what_spec_models_dflash_drafts: the states
vLLM hands the DFlash drafter for ids [2, 15, 27] are transformers' hidden_states[2, 15, 27], and its
proposals (which read all three) equal ours token for token.

Tensors (names vLLM's DFlashQwen3ForCausalLM loads): `fc.weight` [H, n_aux * target_H], `hidden_norm.weight`
[H] (applied to fc's output, the context every layer's K/V are projected from), `layers.N.*` Qwen3 decoder
layers (q/k norms; H-wide inputs), `norm.weight`. `lm_head.weight` and `embed_tokens.weight` are optional
(vLLM then shares the target's), except that a pruned draft vocabulary needs its own lm_head and `d2t`.
"""

from __future__ import annotations

from spec_format.algorithms import (
    DEFAULT_LAYERS,
    Layout,
    Shape,
    decoder_layer_tensors,
    draft_layer_config,
    layer_dims,
    register_layout,
    register_serving,
    speculator_config,
    vocab_tensors,
)
from spec_format.checkpoint import (
    SpeculatorConfig,
)
from spec_format.errors import SpecError
from spec_format.fingerprint import TargetInfo

register_serving("dflash", method="dflash")


def default_dflash_layers(num_hidden_layers: int, n: int = 5) -> list[int]:
    """DFlash's aux layers spread over the depth as z-lab spreads them (decoder outputs 1 .. L-3, evenly,
    n of them), in capture ids (+1), plus the last layer L for the training targets."""
    L = num_hidden_layers
    lo, hi = 1, max(L - 3, 1)
    outs = sorted({round(lo + i * (hi - lo) / (n - 1)) for i in range(n)}) if n > 1 else [L // 2]
    return [o + 1 for o in outs] + [L]


DEFAULT_LAYERS["dflash"] = default_dflash_layers


def check_dflash_config(cfg: SpeculatorConfig, source: str = "config.json") -> None:
    """Fields vLLM needs (it raises a KeyError deep in start-up otherwise), one line each."""
    d = layer_dims(cfg, source)
    if d.model_type != "qwen3":
        raise SpecError(
            f"{source}: field 'transformer_layer_config.model_type' is '{d.model_type}'; vLLM's DFlash drafts are qwen3 layers"
        )
    ids = cfg.aux_hidden_state_layer_ids
    if not ids:
        raise SpecError(
            f"{source}: field 'aux_hidden_state_layer_ids' is missing; list the target layers (vLLM capture ids) fc reads"
        )
    if cfg.eagle_aux_hidden_state_layer_ids:
        raise SpecError(
            f"{source}: field 'eagle_aux_hidden_state_layer_ids' is EAGLE-3's; a DFlash checkpoint names its layers in 'aux_hidden_state_layer_ids'"
        )
    if min(ids) < 1:
        raise SpecError(
            f"{source}: field 'aux_hidden_state_layer_ids' holds {min(ids)}; DFlash ids are capture ids >= 1 (vLLM reads decoder output id - 1)"
        )
    if cfg.mask_token_id is None or not 0 <= cfg.mask_token_id < d.vocab_size:
        raise SpecError(
            f"{source}: field 'mask_token_id' is {cfg.mask_token_id!r}; give a token id in [0, {d.vocab_size}) whose embedding fills the masked slots"
        )
    k = cfg.speculative_tokens
    if cfg.block_size is not None and cfg.block_size != k + (1 if not cfg.sample_from_anchor else 0):
        raise SpecError(
            f"{source}: field 'speculators_config.proposal_methods[0].speculative_tokens' is {k} but 'block_size' is "
            f"{cfg.block_size}; the draft was trained for block_size - 1 = {cfg.block_size - 1} tokens: set speculative_tokens to that"
        )


@register_layout("dflash")
def dflash_layout(cfg: SpeculatorConfig, source: str = "config.json") -> Layout:
    check_dflash_config(cfg, source)
    d = layer_dims(cfg, source)
    H = d.hidden_size
    target_h = cfg.target_hidden_size or H
    draft_vocab = cfg.draft_vocab_size or d.vocab_size
    req: dict[str, Shape] = {
        "fc.weight": (H, len(cfg.aux_hidden_state_layer_ids) * target_h),
        "hidden_norm.weight": (H,),
        "norm.weight": (H,),
    }
    opt: dict[str, Shape] = {"embed_tokens.weight": (d.vocab_size, H), "lm_head.weight": (draft_vocab, H)}
    for i in range(d.num_layers):
        # vLLM's DFlash attention gives o_proj the same bias flag as q/k/v
        req |= decoder_layer_tensors(d, f"layers.{i}.", H, o_bias=True, qk_norm=True)
    if draft_vocab != d.vocab_size:
        req["lm_head.weight"] = opt.pop("lm_head.weight")  # the target's head has the full vocabulary
    forbidden = vocab_tensors(req, opt, draft_vocab, d.vocab_size, target_h != H)
    forbidden["mask_hidden"] = (
        "DFlash embeds masked slots with mask_token_id (vLLM's loader asserts on mask_hidden)"
    )
    return Layout(required=req, optional=opt, dtypes={"d2t": "I64", "t2d": "BOOL"}, forbidden=forbidden)


def dflash_config(
    lc: dict,
    verifier: TargetInfo,
    aux_layer_ids: list[int],
    draft_vocab_size: int,
    mask_token_id: int,
    speculative_tokens: int,
    provenance: dict | None = None,
) -> SpeculatorConfig:
    """The DFlash config around the draft decoder `lc` (new drafts and converted ones alike)."""
    return speculator_config(
        "dflash", lc, verifier, speculative_tokens, draft_vocab_size, provenance, "DFlashDraftModel",
        aux_hidden_state_layer_ids=list(aux_layer_ids), mask_token_id=mask_token_id,
        block_size=speculative_tokens + 1, sample_from_anchor=False,
    )  # fmt: skip


def build_dflash_config(
    verifier_cfg: dict,
    verifier: TargetInfo,
    aux_layer_ids: list[int],
    draft_vocab_size: int,
    mask_token_id: int,
    speculative_tokens: int = 7,
    num_layers: int = 1,
    provenance: dict | None = None,
    **layer_overrides,
) -> SpeculatorConfig:
    """A complete DFlash config: `aux_layer_ids` in capture ids, k = `speculative_tokens` masked slots
    after the anchor (block_size = k + 1)."""
    if speculative_tokens < 1:
        raise SpecError(f"speculative_tokens must be at least 1, got {speculative_tokens}")
    lc = draft_layer_config(verifier_cfg, num_layers, "qwen3", **layer_overrides)
    cfg = dflash_config(
        lc, verifier, aux_layer_ids, draft_vocab_size, mask_token_id, speculative_tokens, provenance
    )
    check_dflash_config(cfg)
    return cfg
