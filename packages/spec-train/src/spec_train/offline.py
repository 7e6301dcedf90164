"""The acceptance estimate training logs: how many tokens per verifier step vLLM would accept from a draft
under greedy decoding, computed from a dataset's captured verifier states without running the verifier.
(`spec eval --offline` is another thing: spec_train.simulate runs the target and replays decoding.)

For every slot t of a sample (the verifier has just verified x_0..x_{t+1}) the draft proposes k tokens;
depth j is accepted iff all earlier depths were and the token equals the verifier's greedy token at
position t+1+j (argmax over the verifier's FULL vocabulary of lm_head(norm(last[t+1+j])): a draft token
can never match a verifier token outside the draft vocabulary). A chain is counted from its first
supervised target (x_{t+2}); depth j counts while x_{t+2+j} is a supervised token of the same sample.

Two computations of the same numbers:
- `ttt_counts`: one TTT forward over a packed row with the verifier's greedy tokens as step inputs; what
  training logs (one forward per row);
- `incremental_counts`: vLLM's way, with spec-models' KV-cache drafting (`extend` over the context once,
  then `greedy_step` per depth, every slot a batch row whose own draft tokens are fed back): the reference
  test_offline.py checks `ttt_counts` against. Given that depths < j were accepted, the draft's inputs at
  depth j are exactly the verifier's greedy tokens, so both count the same accepted chains.
"""

from __future__ import annotations

import torch
from torch import nn

from spec_models import KVCache, extend, forward_ttt, greedy_step
from spec_train.data import supervised_slots
from spec_train.metrics import chain_counts
from spec_train.targets import VerifierHead


def greedy_step_ids(input_ids: torch.Tensor, greedy: torch.Tensor, steps: int) -> torch.Tensor:
    """[S, T] step inputs under acceptance: step 0 reads x_{t+1}, step j >= 1 the verifier's greedy
    token at position t+j (the token vLLM fed back at that depth, given depths < j were accepted).
    input_ids, greedy [T] -> [S, T] (0 past the end of the row)."""
    T = input_ids.shape[0]
    out = torch.zeros(steps, T, dtype=torch.long, device=input_ids.device)
    out[0, : T - 1] = input_ids[1:]
    for j in range(1, steps):
        out[j, : T - j] = greedy[j:]
    return out


def greedy_targets(
    head: VerifierHead, last: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The verifier's greedy token at every position: last [T, H] -> int64 [T]."""
    return head.greedy(head.normed(last), dtype=dtype)


def _draft_tokens(draft: nn.Module, normed: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Greedy draft tokens (target ids) of normed [..., H], chunked over tokens."""
    flat = normed.reshape(-1, normed.shape[-1])
    out = [draft.greedy(flat[i : i + chunk]) for i in range(0, flat.shape[0], chunk)]
    return torch.cat(out).reshape(normed.shape[:-1])


def _match(tokens: torch.Tensor, greedy: torch.Tensor) -> torch.Tensor:
    """tokens [k, T] drafted at (depth j, slot t) vs the verifier's greedy token at t+1+j -> bool [k, T]."""
    k, T = tokens.shape
    match = torch.zeros(k, T, dtype=torch.bool, device=tokens.device)
    for j in range(k):
        n = T - 1 - j
        if n > 0:
            match[j, :n] = tokens[j, :n] == greedy[1 + j :]
    return match


@torch.no_grad()
def ttt_counts(
    draft: nn.Module, head: VerifierHead, batch: dict[str, torch.Tensor], k: int, attn: str = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(accepted [k], reached [k]) over one packed row (data.RowLoader.load)."""
    ids, pos = batch["input_ids"], batch["position_ids"]
    greedy = greedy_targets(head, batch["last"], dtype)
    step_ids = greedy_step_ids(ids, greedy, k)[:, None]  # [k, 1, T]
    with torch.autocast(ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
        normed = forward_ttt(draft, step_ids, batch["aux"][None], pos[None], attn)[:, 0]  # [k, T, H]
    tokens = _draft_tokens(draft, normed)
    return chain_counts(_match(tokens, greedy), supervised_slots(batch["loss_mask"], pos, k))


@torch.no_grad()
def incremental_counts(
    draft: nn.Module, head: VerifierHead, sample: dict[str, torch.Tensor], k: int, slots_per_batch: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted [k], reached [k]) for one sample (one document: input_ids, loss_mask, aux, last), by
    KV-cache drafting as vLLM does it."""
    ids, aux = sample["input_ids"], sample["aux"]
    n = ids.shape[0]
    pos = torch.arange(n, device=ids.device)
    eligible = supervised_slots(sample["loss_mask"], pos, k)  # [k, n]
    greedy = greedy_targets(head, sample["last"])
    tokens = torch.zeros(k, n, dtype=torch.long, device=ids.device)
    if n >= 3:
        # Context pass: slot t holds (x_{t+1}, a_t) at position t, t = 0..n-2 (vLLM's pairing).
        cache = KVCache.empty(draft, 1, n - 1 + k)
        normed, hidden = extend(draft, cache, ids[None, 1:], draft.combine(aux[None, :-1]), pos[None, :-1])
        tokens[0, : n - 1] = draft.greedy(normed[0])
        slots = eligible[0].nonzero().squeeze(1)  # chains worth drafting further
        for start in range(0, len(slots) if k > 1 else 0, slots_per_batch):
            t = slots[start : start + slots_per_batch]
            b = len(t)
            # Each slot's chain sees the context's step-0 entries at positions <= t and its own later
            # entries, which overwrite positions t+1.. in its private copy of the cache.
            mine = KVCache([c.expand(b, -1, -1, -1).clone() for c in cache.k],
                           [c.expand(b, -1, -1, -1).clone() for c in cache.v])  # fmt: skip
            tok, h = tokens[0, t], hidden[0, t]
            for j in range(1, k):
                tok, h = greedy_step(draft, mine, tok, h, t + j)
                tokens[j, t] = tok
    return chain_counts(_match(tokens, greedy), eligible)
