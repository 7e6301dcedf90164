"""Incremental drafting with a KV cache, as vLLM's proposer runs the draft (llm_base_proposer.py).

Inputs use vLLM's pairing: slot t holds the token x_{t+1} and the target's aux state a_t (the state after
x_t), at rotary position t. For a context x_0..x_n the draft therefore reads `next_ids` = x_1..x_n and
aux states a_0..a_{n-1}; it then proposes x_{n+1}, x_{n+2}, ... by feeding each greedy token back with its
own hidden state, one position further per step.

The cache holds one entry per position (index = rotary position), so what vLLM keeps in its draft KV
cache is reproduced exactly: step-0 entries for the context and one entry per draft step after it.
Entries are written with `scatter_` at the given positions and attention masks keys beyond each
query's position, so all shapes are static: the one-token step (`greedy_step`) can be compiled with
`torch.compile(fullgraph=True)` or captured in a CUDA graph (static buffers: the cache, ids [B],
hidden [B, H], pos [B]; replay after copying new values into them).
"""

from __future__ import annotations

import torch
from torch import nn

from spec_models.layers import AttentionFn
from spec_models.ops import attend


class KVCache:
    """Per-layer keys and values, [B, kv_heads, max_len, head_dim] each; entry index = position."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor]):
        self.k, self.v = k, v

    @classmethod
    def empty(cls, model: nn.Module, batch: int, max_len: int) -> KVCache:
        p = next(model.layers.parameters())
        shapes = [
            (batch, layer.self_attn.kv_heads, max_len, layer.self_attn.head_dim) for layer in model.layers
        ]
        return cls(
            [torch.zeros(s, device=p.device, dtype=p.dtype) for s in shapes],
            [torch.zeros(s, device=p.device, dtype=p.dtype) for s in shapes],
        )

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


def cached_attention(cache: KVCache, pos: torch.Tensor) -> AttentionFn:
    """Attention that writes the new keys at `pos` [B, Q] and lets each query see cache entries at
    positions <= its own (causal by position)."""
    keys = torch.arange(cache.max_len, device=pos.device)
    mask = keys[None, None, None, :] <= pos[:, None, :, None]  # [B, 1, Q, max_len]
    index = pos[:, None, :, None]

    def attention(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        at = index.expand(-1, k.shape[1], -1, k.shape[3])
        cache.k[i].scatter_(2, at, k)
        cache.v[i].scatter_(2, at, v)
        return attend(q, cache.k[i], cache.v[i], mask)

    return attention


def extend(
    model: nn.Module, cache: KVCache, ids: torch.Tensor, hidden: torch.Tensor, pos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run Q tokens per request through the draft with the cache: ids [B, Q], hidden [B, Q, H], pos [B, Q]
    -> (normed, next_hidden) [B, Q, H]. Q = context length for the first pass, 1 per drafting step
    (parallel drafters pass several)."""
    return model(ids, hidden, pos, cached_attention(cache, pos))


def greedy_step(
    model: nn.Module, cache: KVCache, ids: torch.Tensor, hidden: torch.Tensor, pos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One drafting step, one token per request: ids [B] (target ids), hidden [B, H], pos [B] ->
    (next draft token [B] as target ids, next hidden [B, H]). No host syncs, static shapes."""
    normed, nxt = extend(model, cache, ids[:, None], hidden[:, None], pos[:, None])
    return model.greedy(normed[:, 0]), nxt[:, 0]


@torch.no_grad()
def propose(
    model: nn.Module, next_ids: torch.Tensor, aux: torch.Tensor, lengths: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Greedy draft tokens for a batch of contexts, as vLLM proposes them.

    next_ids [B, L]: request b's tokens x_1..x_n in its first n = lengths[b] slots (right-padded);
    aux [B, L, num_aux * target_hidden]: a_0..a_{n-1} in the same slots; lengths [B].
    Returns [B, num_tokens] target ids: the proposals for x_{n+1}, ..., x_{n+num_tokens}.
    """
    B, L = next_ids.shape
    cache = KVCache.empty(model, B, L + num_tokens)
    pos = torch.arange(L, device=next_ids.device).expand(B, L)
    normed, hidden = extend(model, cache, next_ids, model.combine(aux), pos)
    rows, last = torch.arange(B, device=next_ids.device), lengths.to(next_ids.device) - 1
    tokens = [model.greedy(normed[rows, last])]
    hidden, p = hidden[rows, last], last
    for _ in range(num_tokens - 1):
        p = p + 1
        token, hidden = greedy_step(model, cache, tokens[-1], hidden, p)
        tokens.append(token)
    return torch.stack(tokens, dim=1)
