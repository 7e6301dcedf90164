"""The acceptance estimate training logs: how many tokens per verifier step vLLM would accept from a draft
under greedy decoding, computed from a dataset's captured verifier states without running the verifier.
(`spec eval --offline` is another thing: spec_train.simulate runs the target and replays decoding.)

For every slot t of a sample (the verifier has just verified x_0..x_{t+1}) the draft proposes k tokens;
depth j is accepted iff all earlier depths were and the token equals the verifier's greedy token at
position t+1+j (argmax over the verifier's FULL vocabulary of lm_head(norm(last[t+1+j])): a draft token
can never match a verifier token outside the draft vocabulary). A chain is counted from its first
supervised target (x_{t+2}); depth j counts while x_{t+2+j} is a supervised token of the same sample.

`ttt_counts` does it in one TTT forward over a packed row with the verifier's greedy tokens as step inputs:
given that depths < j were accepted, the draft's inputs at depth j are exactly those greedy tokens, so it
counts the same accepted chains as drafting token by token with a KV cache as vLLM does (test_offline.py
checks it against that, spec-models' `extend` / `greedy_step`).
"""

from __future__ import annotations

import torch
from torch import nn

from spec_models import forward_ttt
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


def greedy_matches(tokens: torch.Tensor, greedy: torch.Tensor) -> torch.Tensor:
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
    return chain_counts(greedy_matches(tokens, greedy), supervised_slots(batch["loss_mask"], pos, k))
