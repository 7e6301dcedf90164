"""P-EAGLE (parallel EAGLE, arXiv 2602.01469): EAGLE-3's draft that proposes all k tokens in one forward.

Architecture and checkpoint are EAGLE-3's plus one tensor, `mask_hidden` [1, n_aux*target_hidden]: a
learned stand-in for the target's aux states. vLLM serves it as `eagle3` with `parallel_drafting`
(vllm/v1/spec_decode/llm_base_proposer.py, utils.py copy_and_expand_eagle_inputs): after the target
verified x_0..x_{n} and sampled x_{n+1}, the draft's one forward holds
    the context slots t (token x_{t+1}, hidden fc(a_t), position t), up to the last slot n,
    then k-1 parallel slots d = 1..k-1 (token mask_token_id, hidden fc(mask_hidden), position n+d),
causal over positions in the draft's KV cache. Slot n's output is draft token 1, parallel slot d's is
draft token d+1. The parallel slots never read a draft token, so nothing is sequential.

Training (`forward_parallel`) runs every slot t of a packed row as the anchor of its own chain: depth 0
is the context slot, depth d >= 1 a parallel slot at position t+d that attends to the context slots
<= t of its document and to its own chain's depths 1..d (what vLLM's cache holds when t is the last
verified slot). Any subset of anchors per depth may be run (COD sampling), as long as each depth's
anchors are among the previous depth's.
"""

from __future__ import annotations

import msgspec
import torch
from torch import nn

from spec_format.checkpoint import SpeculatorConfig
from spec_format.fingerprint import read_model_config
from spec_format.peagle import as_peagle
from spec_models.blockwise import doc_causal_attention, document_spans, stack_own
from spec_models.drafting import KVCache, extend
from spec_models.eagle3 import Eagle3Draft, init_eagle3_from_verifier
from spec_models.layers import AttentionFn
from spec_models.ops import attend
from spec_models.registry import register_draft
from spec_models.ttt import document_ids, pick_attn


@register_draft("peagle")
class PEagleDraft(Eagle3Draft):
    """EAGLE-3's module plus `mask_hidden` (trained; N(0, 1) at the start, as speculators does)."""

    def __init__(self, config: SpeculatorConfig):
        if config.norm_before_residual is None:  # vLLM's update_peagle defaults it to False (EAGLE-3's: True)
            config = msgspec.structs.replace(config, norm_before_residual=False)
        super().__init__(config)
        self.mask_token_id = int(config.mask_token_id)
        self.mask_hidden = nn.Parameter(torch.randn(1, self.spec.num_aux * self.spec.target_hidden))

    def mask_state(self) -> torch.Tensor:
        """[H]: fc(mask_hidden), the hidden state every parallel slot reads (vLLM computes it once)."""
        return self.combine(self.mask_hidden)[0]


def parallel_mask(slot: torch.Tensor, depth: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """bool [1, 1, Q, Q] (True = attend) over queries (anchor slot [Q], depth [Q]): depth-0 keys of slots
    <= the query's anchor in its document, and the query's own chain's keys of depths 1..its depth."""
    doc = document_ids(position_ids[None])[0][slot]  # [Q]
    same_chain = (slot[:, None] == slot[None, :]) & (depth[None, :] <= depth[:, None]) & (depth[None, :] > 0)
    context = (depth[None, :] == 0) & (slot[None, :] <= slot[:, None]) & (doc[None, :] == doc[:, None])
    return (context | same_chain)[None, None]


def forward_parallel(
    model: PEagleDraft,
    next_ids: torch.Tensor,
    aux: torch.Tensor,
    position_ids: torch.Tensor,
    anchors: list[torch.Tensor],
    attn: str = "auto",
    padding: int = 0,
) -> torch.Tensor:
    """All drafted depths of one packed row in one forward.

    next_ids [T] (slot t: x_{t+1}); aux [T, n_aux*target_hidden] (a_t); position_ids [T];
    anchors[d-1] [n_d]: the slots whose depth d runs (each among depth d-1's; depth 0 runs every slot).
    Returns normed [T + sum n_d, H]: the lm_head inputs of depth 0 (slots 0..T-1), then depth 1's anchors,
    depth 2's, ... Depth d at slot t predicts x_{t+2+d}. attn: "sdpa" (a dense [Q, Q] mask), "blockwise"
    (CPU: per depth, causal flash attention over the depth-0 keys plus the chain's own keys,
    spec_models.blockwise) or "auto" (ttt.pick_attn); anchor lists sorted (nonzero() gives them so).
    padding: queries added after the last depth's (one more depth, at slot 0: they read, nobody reads
    them) so that rows come in a few shapes; their outputs, at the end, are garbage.
    """
    T, dev = next_ids.shape[0], next_ids.device
    real = anchors
    if padding:
        anchors = anchors + [torch.zeros(padding, dtype=torch.long, device=dev)]
    slot = torch.cat([torch.arange(T, device=dev), *anchors])
    depth = torch.cat([torch.zeros(T, dtype=torch.long, device=dev)]
                      + [torch.full((len(a),), d + 1, device=dev) for d, a in enumerate(anchors)])  # fmt: skip
    n = len(slot) - T
    ids = torch.cat([next_ids, next_ids.new_full((n,), model.mask_token_id)])
    hidden = torch.cat([model.combine(aux), model.mask_state().expand(n, -1)])
    if pick_attn(attn, dev, T) == "blockwise":
        attention = _blockwise_attention(T, real, document_spans(position_ids[None]))
    else:
        mask = parallel_mask(slot, depth, position_ids)

        def attention(i, q, k, v):
            return attend(q, k, v, mask)

    normed, _ = model(ids[None], hidden[None], (position_ids[slot] + depth)[None], attention)
    return normed[0]


def _blockwise_attention(T: int, anchors: list[torch.Tensor], spans) -> AttentionFn:
    """forward_parallel's attention without a [Q, Q] mask. Depth d's queries are scattered to their slots
    of a [T] row (slots it does not run hold zeros; their outputs are dropped) and attend causally to the
    depth-0 keys of their document plus, as own keys, their chain's keys of depths 1..d. Costs one causal
    T^2/2 per depth. Padding queries (after the anchors') get zeros."""
    offsets = [T]
    for a in anchors:
        offsets.append(offsets[-1] + len(a))

    def attention(i, q, k, v):
        B, h, _, d = q.shape
        k0, v0 = k[:, :, :T], v[:, :, :T]
        outs = [doc_causal_attention(q[:, :, :T], k0, v0, stack_own([], k0), stack_own([], v0), spans)]
        own_k, own_v = [], []  # depth 1..d keys scattered to their slots [B, kv_h, T, d]
        for n, a in enumerate(anchors):
            seg = slice(offsets[n], offsets[n + 1])
            own_k.append(k.new_zeros(*k0.shape).index_copy(2, a, k[:, :, seg]))
            own_v.append(v.new_zeros(*v0.shape).index_copy(2, a, v[:, :, seg]))
            full_q = q.new_zeros(B, h, T, d).index_copy(2, a, q[:, :, seg])
            out = doc_causal_attention(full_q, k0, v0, stack_own(own_k, k0), stack_own(own_v, v0), spans)
            outs.append(out.index_select(2, a))
        outs.append(q.new_zeros(B, h, q.shape[2] - offsets[-1], d))  # padding: read by nobody
        return torch.cat(outs, 2)

    return attention


@torch.no_grad()
def propose_parallel(
    model: PEagleDraft, next_ids: torch.Tensor, aux: torch.Tensor, lengths: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Greedy draft tokens for a batch of contexts, as vLLM's parallel drafting proposes them: one pass
    over the context (slot t: x_{t+1}, a_t at position t) with k-1 parallel slots after each request's
    last slot, all through the KV cache. Arguments as spec_models.propose; returns [B, num_tokens]."""
    B, L = next_ids.shape
    dev = next_ids.device
    cache = KVCache.empty(model, B, L + num_tokens)
    pos = torch.arange(L, device=dev).expand(B, L)
    normed, _ = extend(model, cache, next_ids, model.combine(aux), pos)
    rows, last = torch.arange(B, device=dev), lengths.to(dev) - 1
    tokens = [model.greedy(normed[rows, last])]
    if num_tokens > 1:
        m = num_tokens - 1
        ppos = last[:, None] + torch.arange(1, m + 1, device=dev)  # [B, k-1]
        ids = next_ids.new_full((B, m), model.mask_token_id)
        hidden = model.mask_state().expand(B, m, -1)
        out, _ = extend(model, cache, ids, hidden, ppos)
        tokens += list(model.greedy(out).unbind(1))
    return torch.stack(tokens, dim=1)


def peagle_from_eagle3(draft: Eagle3Draft, mask_token_id: int, seed: int = 0) -> PEagleDraft:
    """A P-EAGLE draft holding an EAGLE-3 draft's weights (same layer, same names) and a new mask_hidden:
    `spec train --algorithm peagle --init-from` an EAGLE-3 draft, and new drafts (init_peagle_from_verifier)."""
    model = PEagleDraft(as_peagle(draft.config, mask_token_id))
    missing, unexpected = model.load_state_dict(draft.state_dict(), strict=False)
    assert missing == ["mask_hidden"] and not unexpected, (missing, unexpected)
    with torch.no_grad():
        model.mask_hidden.copy_(
            torch.randn(model.mask_hidden.shape, generator=torch.Generator().manual_seed(seed))
        )
    model.embed_tokens.weight.requires_grad_(draft.embed_tokens.weight.requires_grad)
    return model.to(next(draft.parameters()).device)


def init_peagle_from_verifier(
    verifier_dir, mask_token_id: int | None = None, **eagle3_options
) -> PEagleDraft:
    """A new P-EAGLE draft for the verifier: init_eagle3_from_verifier's start (same options) plus
    mask_hidden ~ N(0, 1); the mask token by default: default_mask_token."""
    draft = init_eagle3_from_verifier(verifier_dir, **eagle3_options)
    mask = default_mask_token(verifier_dir) if mask_token_id is None else mask_token_id
    return peagle_from_eagle3(draft, mask, eagle3_options.get("seed", 0))


def default_mask_token(verifier_dir: str) -> int:
    """P-EAGLE's token at drafted positions after the first: the verifier's pad token, else its unk, else
    eos, else 0 (the embedding stays the verifier's). DFlash's is spec_models.dflash.default_mask_token."""
    vcfg = read_model_config(verifier_dir)
    for key in ("pad_token_id", "unk_token_id", "eos_token_id"):
        v = vcfg.get(key)
        v = v[0] if isinstance(v, list) and v else v
        if isinstance(v, int) and 0 <= v < vcfg["vocab_size"]:
            return v
    return 0
