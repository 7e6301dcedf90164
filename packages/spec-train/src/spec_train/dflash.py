"""DFlash training: blocks at sampled anchors of each packed row, filled in one non-causal forward.

Alignment, for a packed row x_0..x_{T-1} (documents restart their positions at 0): an anchor a is a token
the verifier has just produced; the draft sees the verifier's aux states of a's document before a (the
context vLLM keeps in the draft's KV cache) and the block [x_a, mask * k] at positions pos[a] .. pos[a]+k.
Slot j (1..k) predicts x_{a+j}; its target is the verifier's next-token distribution after x_{a+j-1},
softmax(lm_head(norm(last[a+j-1]))) over the draft vocabulary, counted iff x_{a+j} is a supervised token
of a's document. Anchors: every a whose x_{a+1} is supervised and in its document, at most
`max_anchors` per row, drawn without replacement by a generator seeded with (seed, global row): the same
anchors whatever the world size and after a resume. Only the N * k target rows of the verifier's
logits are computed, never [tokens x vocab].

Loss per slot weighted by exp(-(j-1)/gamma) (z-lab's decay; gamma = 7, 5, 4 for blocks 16, 10, 8),
normalised to sum to 1 like EAGLE-3's step weights.
Simulated acceptance (the same chains vLLM counts): at anchor a, depth j-1 is accepted iff all earlier
depths were and slot j's greedy token equals the verifier's greedy token over its full vocabulary.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from spec_format.errors import SpecError
from spec_models.dflash import DFlashDraft, block_inputs
from spec_train.metrics import chain_counts
from spec_train.targets import VerifierHead


def decay_gamma(block_size: int) -> float:
    """z-lab's gamma: 7 for blocks of 16, 5 for 10, 4 for 8 (and below)."""
    return 7.0 if block_size >= 16 else 5.0 if block_size >= 10 else 4.0


def slot_weights(k: int, gamma: float | None = None) -> list[float]:
    g = gamma or decay_gamma(k + 1)
    w = [math.exp(-j / g) for j in range(k)]
    return [x / sum(w) for x in w]


def candidate_anchors(loss_mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """bool [T]: a is an anchor iff x_{a+1} is supervised and in a's document (and a has context)."""
    ok = torch.zeros_like(loss_mask)
    ok[:-1] = loss_mask[1:] & (pos[1:] == pos[:-1] + 1) & (pos[:-1] >= 1)
    return ok


def sample_anchors(loss_mask: torch.Tensor, pos: torch.Tensor, n: int, key: int, seed: int) -> torch.Tensor:
    """int64 [n] anchor indices into the row (padding: -1), drawn from candidate_anchors without
    replacement with a generator seeded by (seed, key); sorted."""
    idx = candidate_anchors(loss_mask, pos).nonzero().squeeze(1).cpu().numpy()
    if len(idx) > n:
        idx = np.sort(np.random.default_rng([seed, 0xDF1A, key + 1]).choice(idx, n, replace=False))
    out = torch.full((n,), -1, dtype=torch.long)
    out[: len(idx)] = torch.from_numpy(idx)
    return out


def slot_targets(loss_mask: torch.Tensor, pos: torch.Tensor, anchors: torch.Tensor, k: int):
    """(target positions [N, k] clamped into the row, valid bool [N, k]): slot j+1 of anchor a predicts
    x_{a+1+j}, counted iff it is supervised and in a's document."""
    T = loss_mask.shape[0]
    p = anchors[:, None] + 1 + torch.arange(k, device=anchors.device)  # [N, k]
    pc = p.clamp(0, T - 1)
    a = anchors.clamp(min=0)
    valid = (
        (anchors[:, None] >= 0)
        & (p < T)
        & loss_mask[pc]
        & (pos[pc] == pos[a][:, None] + 1 + torch.arange(k, device=p.device))
    )
    return pc, valid


def counted_slots(loss_mask, pos, k: int, max_anchors: int, key: int, seed: int) -> torch.Tensor:
    """float [k]: counted slots of one row (what the loop sums over the global batch to scale the loss)."""
    anchors = sample_anchors(loss_mask, pos, max_anchors, key, seed)
    return slot_targets(loss_mask, pos, anchors, k)[1].sum(0).float()


def block_mask(pos: torch.Tensor, anchors: torch.Tensor, width: int) -> torch.Tensor:
    """bool [1, 1, N*width, T + N*width]: block n's queries see the context of their document before the
    anchor (index t in [a - pos[a], a)) and all keys of their own block."""
    T, N = pos.shape[0], anchors.shape[0]
    a = anchors.clamp(min=0)
    t = torch.arange(T, device=pos.device)
    ctx = (t[None] >= (a - pos[a])[:, None]) & (t[None] < a[:, None])  # [N, T]
    blk = torch.eye(N, dtype=torch.bool, device=pos.device)  # [N, N]
    m = torch.cat([ctx, blk.repeat_interleave(width, 1)], 1)  # [N, T + N*width]
    return m.repeat_interleave(width, 0)[None, None]


def draft_blocks(draft: DFlashDraft, batch: dict, anchors: torch.Tensor) -> torch.Tensor:
    """normed [N, k, H]: the masked slots of the blocks at `anchors` in one packed row."""
    ids, pos = batch["input_ids"], batch["position_ids"]
    a = anchors.clamp(min=0)
    width = draft.spec.k + 1
    bids, bpos = block_inputs(draft, ids[a][None], pos[a][None])
    mask = block_mask(pos, anchors, width)
    normed = draft(bids, bpos, draft.combine(batch["aux"][None]), pos[None], mask)[0]
    return normed.view(len(anchors), width, -1)[:, 1:]


class DFlashObjective(nn.Module):
    """What DDP / FSDP2 wrap (as loss.Objective): forward(batch, scale, dtype) -> (loss, stats [3, k]);
    with accept_k, (accepted [k], reached [k]) of the simulated acceptance over every anchor of the row."""

    def __init__(self, draft: DFlashDraft, head: VerifierHead, kind: str, max_anchors: int, seed: int):
        super().__init__()
        self.draft, self.head = draft, head
        self.kind, self.max_anchors, self.seed = kind, max_anchors, seed
        self.steps = draft.spec.k

    def anchors(self, batch: dict) -> torch.Tensor:
        key = int(batch["row_key"]) if "row_key" in batch else 0
        a = sample_anchors(batch["loss_mask"], batch["position_ids"], self.max_anchors, key, self.seed)
        return a.to(batch["input_ids"].device)

    def forward(self, batch, scale=None, dtype=torch.float32, accept_k=None):
        if accept_k is not None:
            return self.acceptance(batch, dtype)
        k = self.steps
        anchors = self.anchors(batch)
        tpos, valid = slot_targets(batch["loss_mask"], batch["position_ids"], anchors, k)
        dev = batch["input_ids"].device
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            normed = draft_blocks(self.draft, batch, anchors)  # [N, k, H]
            logq = torch.log_softmax(self.draft.lm_head(normed).float(), -1)  # [N, k, Vd]
        with torch.no_grad():
            t_logits = self.head.draft_logits(self.head.normed(batch["last"][tpos - 1]), dtype)  # [N, k, Vd]
            t_logp = torch.log_softmax(t_logits, -1)
            top = t_logits.argmax(-1)
        if self.kind == "kl":
            per = (t_logp.exp() * (t_logp - logq)).sum(-1)
        else:
            per = -logq.gather(-1, top[..., None])[..., 0]
        per = per * valid
        if scale is None:
            scale = torch.ones(k, device=dev)
        loss = (per.sum(0) * scale).sum()
        agree = ((logq.argmax(-1) == top) & valid).sum(0)
        stats = torch.stack([per.sum(0).detach(), agree.float(), valid.sum(0).float()])
        return loss, stats

    def acceptance(self, batch, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        return block_counts(self.draft, self.head, batch, self.steps, self.max_anchors, dtype)


@torch.no_grad()
def block_counts(
    draft: DFlashDraft, head: VerifierHead, batch: dict, k: int, anchors_per_pass: int = 64,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(accepted [k], reached [k]) over every anchor of one packed row (data.RowLoader.load): the chains
    vLLM's counters count, drafted in passes of `anchors_per_pass` blocks."""
    if k != draft.spec.k:
        raise SpecError(
            f"this DFlash draft fills blocks of {draft.spec.k + 1}: it drafts k = {draft.spec.k}, not {k}"
        )
    mask, pos = batch["loss_mask"], batch["position_ids"]
    every = candidate_anchors(mask, pos).nonzero().squeeze(1)
    greedy = head.greedy(head.normed(batch["last"]), dtype=dtype)  # [T]: the verifier's token at t+1
    accepted = torch.zeros(k, dtype=torch.long, device=mask.device)
    reached = torch.zeros(k, dtype=torch.long, device=mask.device)
    for i in range(0, len(every), anchors_per_pass):
        anchors = torch.full((anchors_per_pass,), -1, dtype=torch.long, device=mask.device)
        chunk = every[i : i + anchors_per_pass]
        anchors[: len(chunk)] = chunk
        tpos, valid = slot_targets(mask, pos, anchors, k)
        with torch.autocast(mask.device.type, dtype=dtype, enabled=dtype != torch.float32):
            tokens = draft.greedy(draft_blocks(draft, batch, anchors))  # [N, k]
        a, r = chain_counts((tokens == greedy[tpos - 1]).T, valid.T)
        accepted += a
        reached += r
    return accepted, reached
