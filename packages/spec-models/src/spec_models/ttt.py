"""Training forward with test-time-training (TTT) steps over packed sequences.

A packed row holds tokens x_0..x_{T-1} of one or more documents with the target's aux states a_t (the
state after x_t). Step j (0 <= j < S), slot t mirrors vLLM's j-th draft forward after the target
verified x_0..x_{t+1}:
    input token   step_ids[j, :, t]   (teacher-forced default: x_{t+1+j}; see ttt_input_ids)
    input hidden  fc(a_t) at j = 0, else step j-1's next_hidden at slot t (the draft's own state)
    position      position_ids[:, t] + j
    predicts      x_{t+2+j}
    attends to    step-0 keys at slots s <= t of the same document, and slot t's own keys of steps
                  1..j (the "diagonal blocks"): exactly what vLLM's KV cache holds at that point,
                  step-0 entries of the context plus one entry per draft step.
Slots whose inputs or targets cross a document boundary compute garbage that no other slot reads;
the trainer masks their loss. Passing the target's greedy tokens as `step_ids` instead of the ground
truth makes step j's prediction exactly the token vLLM would draft at depth j under greedy acceptance.

Documents are found from `position_ids` (each document starts at position 0), as packed HF batches do.
"""

from __future__ import annotations

import torch
from torch import nn

from spec_format.errors import SpecError
from spec_models.blockwise import doc_causal_attention, document_spans, stack_own
from spec_models.ops import attend


def ttt_input_ids(input_ids: torch.Tensor, steps: int, pad_id: int = 0) -> torch.Tensor:
    """Teacher-forced step inputs: input_ids [B, T] -> [S, B, T] with out[j, :, t] = x_{t+1+j}
    (pad_id past the end of the row)."""
    B, T = input_ids.shape
    padded = torch.cat([input_ids, input_ids.new_full((B, steps), pad_id)], dim=1)
    return torch.stack([padded[:, 1 + j : 1 + j + T] for j in range(steps)])


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] document index of each slot: a new document starts wherever the position is 0."""
    return torch.cumsum((position_ids == 0).int(), dim=1)


def ttt_mask(position_ids: torch.Tensor, steps: int) -> torch.Tensor:
    """bool [B, 1, T, S*T] (True = attend): key index i*T + s is slot s of step i. Built once per
    forward; step j uses the first (j+1)*T columns."""
    T = position_ids.shape[1]
    doc = document_ids(position_ids)
    slots = torch.arange(T, device=position_ids.device)
    causal = slots[None, :] <= slots[:, None]  # [T(query), T(key)]
    block0 = causal & (doc[:, :, None] == doc[:, None, :])  # [B, T, T]
    diagonal = (slots[None, :] == slots[:, None]).expand_as(block0)
    return torch.cat([block0] + [diagonal] * (steps - 1), dim=-1)[:, None]


def _flex_block_masks(position_ids: torch.Tensor, steps: int) -> list:
    """The same mask as ttt_mask, as one flex-attention BlockMask per step (sparse: memory O(T))."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = position_ids.shape
    doc = document_ids(position_ids)

    def mask_mod(b, h, q, kv):
        s = kv % T
        return torch.where(kv < T, (s <= q) & (doc[b, s] == doc[b, q]), s == q)

    return [
        create_block_mask(mask_mod, B, None, T, (j + 1) * T, device=position_ids.device) for j in range(steps)
    ]


def pick_attn(attn: str, device: torch.device, T: int) -> str:
    """The attention forward_ttt and forward_parallel run: `attn` itself, or for "auto" the fastest
    measured (docs/training.md, tools/bench_long.py): blockwise on CPUs from BLOCKWISE_FROM tokens,
    else the dense mask."""
    if attn == "blockwise" and device.type != "cpu":
        raise SpecError(
            f"--attn blockwise runs on CPUs (aten's CPU flash kernels); on {device.type} use sdpa or flex"
        )
    if attn != "auto":
        return attn
    return "blockwise" if device.type == "cpu" and T >= BLOCKWISE_FROM else "sdpa"


BLOCKWISE_FROM = 1024  # rows shorter than this are faster with the dense mask on CPU


def forward_ttt(
    model: nn.Module,
    step_ids: torch.Tensor,
    aux: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    attn: str = "auto",
) -> torch.Tensor:
    """All TTT steps of packed rows.

    step_ids [S, B, T] (ttt_input_ids for teacher forcing); aux [B, T, num_aux * target_hidden];
    position_ids [B, T] (default 0..T-1: one document per row); attn "sdpa" (a dense [B, 1, T, S*T]
    mask), "flex" (block-sparse, torch.nn.attention.flex_attention), "blockwise" (CPU: causal flash
    attention per document plus the diagonal keys, spec_models.blockwise; O(T^2/2 + S*T) scores, not
    O(S*T^2)) or "auto" (pick_attn).
    Returns normed [S, B, T, H]: the lm_head inputs of every step (the trainer applies model.lm_head in
    chunks, so full [tokens, vocab] logits are never materialised).
    """
    S, B, T = step_ids.shape
    if position_ids is None:
        position_ids = torch.arange(T, device=step_ids.device).expand(B, T)
    attn = pick_attn(attn, step_ids.device, T)
    if attn == "sdpa":
        mask = ttt_mask(position_ids, S)

        def attend_step(j, q, ks, vs):
            return attend(q, torch.cat(ks, 2), torch.cat(vs, 2), mask[..., : (j + 1) * T])
    elif attn == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        block_masks = _flex_block_masks(position_ids, S)

        def attend_step(j, q, ks, vs):
            K, V = torch.cat(ks, 2), torch.cat(vs, 2)
            return flex_attention(q, K, V, block_mask=block_masks[j], enable_gqa=q.shape[1] != K.shape[1])
    elif attn == "blockwise":
        spans = document_spans(position_ids)

        def attend_step(j, q, ks, vs):
            # own keys of slot t: its keys of steps 1..j, [B, kv_h, T, j, d]
            return doc_causal_attention(
                q, ks[0], vs[0], stack_own(ks[1:], ks[0]), stack_own(vs[1:], vs[0]), spans
            )
    else:
        raise ValueError(f"attn must be 'sdpa', 'flex', 'blockwise' or 'auto', got {attn!r}")
    keys: list[list[torch.Tensor]] = [[] for _ in model.layers]
    values: list[list[torch.Tensor]] = [[] for _ in model.layers]
    hidden = model.combine(aux)
    outs = []
    for j in range(S):

        def attention(i, q, k, v, j=j):
            # Steps < j's keys [B, kv_h, T, d] and this step's. Kept once: a gradient-checkpointed layer
            # calls this again in the backward, and must see the same keys.
            if len(keys[i]) == j:
                keys[i].append(k)
                values[i].append(v)
            return attend_step(j, q, keys[i][:j] + [k], values[i][:j] + [v])

        normed, hidden = model(step_ids[j], hidden, position_ids + j, attention)
        outs.append(normed)
    return torch.stack(outs)
