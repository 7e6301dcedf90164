"""The training objective: TTT forward of the draft, then a per-step loss against the verifier, chunked.

Alignment (spec_models.ttt): in a packed row x_0..x_{T-1}, TTT step j at slot t predicts x_{t+2+j}. Its
target is the verifier's next-token distribution after x_{t+1+j}: softmax(lm_head(norm(last[t+1+j]))) over
the draft vocabulary (renormalised). (j, t) counts iff x_{t+2+j} is supervised and in t's document
(data.supervised_slots).

Memory: neither the draft's nor the verifier's [tokens x draft_vocab] logits are held whole. The loss runs
over chunks of target positions; for each chunk it computes the verifier's logits once, then for every
step the draft's logits of the slots that predict those positions, the loss, and at once the gradient
(d loss / d logits = softmax(q) - p for KL) pushed back to the lm_head input and weight. The chunk's
logits are then dropped: nothing vocabulary-sized is kept for backward and nothing is recomputed (a
checkpointed loss would run the head matmul twice).
"""

from __future__ import annotations

import torch
from torch import nn

from spec_train.algorithms import get_algorithm
from spec_train.config import position_weights
from spec_train.targets import VerifierHead


def _bucket(x: torch.Tensor, multiple: int = 64) -> torch.Tensor:
    """x [m, ...] padded with zero rows to a multiple of `multiple` rows: the selected slots vary per row,
    and a CPU bf16 matmul compiles a kernel for every new shape (oneDNN), so the shapes are bucketed."""
    pad = (-x.shape[0]) % multiple
    return torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x


def _chunks(valid: torch.Tensor, chunk: int):
    """For each chunk [p0, p0 + chunk) of target positions: (p0, the needed positions relative to p0 [n],
    position - p0 -> row of the chunk's target logits [chunk], and per step j the slots t = p - 1 - j whose
    target position p falls in the chunk)."""
    S, T = valid.shape
    for p0 in range(0, T, chunk):
        p1 = min(p0 + chunk, T)
        sel = []
        need = torch.zeros(p1 - p0, dtype=torch.bool, device=valid.device)
        for j in range(S):
            lo, hi = max(p0 - 1 - j, 0), max(p1 - 1 - j, 0)
            t = valid[j, lo:hi].nonzero().squeeze(1) + lo
            sel.append(t)
            need[t + 1 + j - p0] = True
        pos = need.nonzero().squeeze(1)
        if len(pos):
            yield p0, pos, torch.cumsum(need.long(), 0) - 1, sel


@torch.no_grad()
def _confidence(normed, w, t_normed, tw, valid, chunk, dtype) -> torch.Tensor:
    """q [S, T]: the draft's probability of the verifier's top-1 token at every counted slot (0 elsewhere),
    chunked like the loss (one more pass over the head: D-PACE needs a chain's every depth first)."""
    q = torch.zeros(valid.shape, dtype=torch.float32, device=normed.device)
    for p0, pos, row_of, sel in _chunks(valid, chunk):
        t_top = (_bucket(t_normed[p0 + pos]).to(dtype) @ tw.T).argmax(-1)
        for j, t in enumerate(sel):
            if len(t):
                logq = torch.log_softmax((_bucket(normed[j, t].to(dtype)) @ w.T).float(), -1)[: len(t)]
                q[j, t] = logq.gather(1, t_top[row_of[t + 1 + j - p0]][:, None]).squeeze(1).exp()
    return q


def dpace_weights(q: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    """D-PACE position weights (arXiv 2605.18810, eq. 7-8) per draft chain: the chain from slot t is
    (j, t) for j = 0..S-1 (TTT step j, or DFlash depth j of the anchor after t). With the smoothed
    confidence q~ = (1 - alpha) q + alpha, depth j weighs sum_{m >= j} prod_{i <= m} q~_i: a later depth
    counts as far as the chain is likely to reach it, and weight moves to it as the earlier depths firm up.
    Uncounted slots are neutral (q~ = 1) and weigh 0; each chain's weights are normalised to sum to 1 (as
    the default 0.8**j weights are), so the loss keeps its scale. q, valid [S, T] -> weights [S, T]."""
    qs = torch.where(valid, (1 - alpha) * q + alpha, torch.ones_like(q))
    w = torch.flip(torch.cumsum(torch.flip(torch.cumprod(qs, 0), [0]), 0), [0]) * valid
    return w / w.sum(0, keepdim=True).clamp_min(1e-12)


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, normed, weight, t_normed, t_weight, valid, scale, chunk, kind, dtype, need_grad, dpace):
        """normed [S, T, H] draft lm_head inputs; weight [Vd, H] draft lm_head; t_normed [T, H] verifier
        lm_head inputs; t_weight [Vd, H] verifier rows of the draft vocabulary; valid bool [S, T];
        scale [S] multiplies step j's summed loss; dpace (alpha, or None) also weighs each slot by its D-PACE
        weight (dpace_weights). Returns (loss [], stats [3, S]: summed per-token loss, top-1 agreements
        (draft argmax == verifier argmax within the draft vocabulary), counted slots)."""
        S, T, _ = normed.shape
        w, tw = weight.detach().to(dtype), t_weight.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=normed.device)
        stats = torch.zeros(3, S, dtype=torch.float32, device=normed.device)
        grad_normed = torch.zeros_like(normed, dtype=torch.float32) if need_grad else None
        need_w = need_grad and ctx.needs_input_grad[1]  # False when the lm_head is frozen
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        wgt = None  # D-PACE: [S, T] slot weights from a first pass over the chains' confidence
        if dpace is not None:
            wgt = dpace_weights(_confidence(normed, w, t_normed, tw, valid, chunk, dtype), valid, dpace)
        for p0, pos, row_of, sel in _chunks(valid, chunk):
            t_logits = (_bucket(t_normed[p0 + pos]).to(dtype) @ tw.T).float()  # [n (padded), Vd]
            t_logp = torch.log_softmax(t_logits, -1)
            t_top = t_logits.argmax(-1)
            del t_logits
            for j in range(S):
                t = sel[j]
                if not len(t):
                    continue
                rows = row_of[t + 1 + j - p0]
                m = len(t)
                x = _bucket(normed[j, t].detach().to(dtype))  # [m (padded), H]
                logq = torch.log_softmax((x @ w.T).float(), -1)[:m]  # [m, Vd]
                top = t_top[rows]
                if kind == "kl":
                    logp = t_logp[rows]
                    p = logp.exp()
                    per = (p * (logp - logq)).sum(-1)
                    del logp
                elif kind == "lk":  # -log alpha, alpha = sum_v min(p_v, q_v): P(accept) when sampling
                    p = t_logp[rows].exp()
                    q = logq.exp()
                    below = (q < p).to(q.dtype)  # where q is the smaller one, alpha moves with q
                    alpha = torch.minimum(p, q).sum(-1).clamp_min(1e-6)
                    per = -alpha.log()
                else:  # cross-entropy on the verifier's top-1 token within the draft vocabulary
                    per = -logq.gather(1, top[:, None]).squeeze(1)
                stats[0, j] += per.sum()
                stats[1, j] += (logq.argmax(-1) == top).sum()
                stats[2, j] += len(t)
                sj = scale[j] if wgt is None else scale[j] * wgt[j, t]  # [] or [m]: D-PACE weighs each slot
                loss += sj * per.sum() if wgt is None else (sj * per).sum()
                if need_grad:
                    if kind == "lk":  # d alpha / d z_i = q_i (below_i - sum_v below_v q_v)
                        g = -q * (below - (below * q).sum(-1, keepdim=True)) / alpha[:, None]
                    else:  # d/dq of KL(p || softmax q) and of CE: softmax(q) - target
                        g = logq.exp_()
                        if kind == "kl":
                            g -= p
                        else:
                            g[torch.arange(len(t), device=g.device), top] -= 1
                    g = _bucket((g * (sj if wgt is None else sj[:, None])).to(dtype))  # padded rows: zero
                    grad_normed[j, t] = (g @ w).float()[:m]
                    if need_w:
                        grad_weight += (g.T @ x).float()
        ctx.save_for_backward(grad_normed, grad_weight)
        ctx.dtypes = (normed.dtype, weight.dtype)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, g_loss, _g_stats):
        grad_normed, grad_weight = ctx.saved_tensors
        gw = None if grad_weight is None else (grad_weight * g_loss).to(ctx.dtypes[1])
        return ((grad_normed * g_loss).to(ctx.dtypes[0]), gw) + (None,) * 9


def chunked_loss(
    normed: torch.Tensor,
    weight: torch.Tensor,
    t_normed: torch.Tensor,
    head: VerifierHead,
    valid: torch.Tensor,
    scale: torch.Tensor,
    chunk: int,
    kind: str = "kl",
    dtype: torch.dtype = torch.float32,
    dpace: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, stats [3, S]); see _ChunkedLoss.forward."""
    need_grad = torch.is_grad_enabled() and (normed.requires_grad or weight.requires_grad)
    return _ChunkedLoss.apply(
        normed, weight, t_normed, head.draft_weight, valid, scale, chunk, kind, dtype, need_grad, dpace
    )


class Objective(nn.Module):
    """What DDP / FSDP2 wrap: the draft (trained) and the verifier head (buffers), with the whole loss in
    forward() so that the wrappers see every parameter use. The draft's algorithm (spec_train.algorithms,
    by its `speculators_model_type`) gives the forward over the drafted depths and the simulated acceptance."""

    def __init__(
        self, draft: nn.Module, head: VerifierHead, steps: int, kind: str, chunk: int, attn: str, cfg=None
    ):
        super().__init__()
        self.draft, self.head, self.cfg = draft, head, cfg  # cfg: the run's TrainConfig (None: defaults)
        self.steps, self.kind, self.chunk, self.attn = steps, kind, chunk, attn
        self.algo = get_algorithm(draft.config.algorithm)

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        scale: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        accept_k: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One packed row (data.RowLoader.load) -> (loss, stats [3, S]). scale [S]: step j's summed loss is
        multiplied by scale[j] (its weight over the number of counted slots in the global batch).
        With accept_k: (accepted [k], reached [k]) of the simulated acceptance (offline.ttt_counts)
        instead; it runs here so that FSDP2 has gathered the weights."""
        if accept_k is not None:
            return self.algo.accept_counts(self.draft, self.head, batch, accept_k, self.attn, dtype)
        device = batch["input_ids"].device
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            normed, valid = self.algo.forward(
                self.draft, batch, self.steps, self.attn, self.cfg
            )  # [S, T, H], [S, T]
        if scale is None:
            scale = torch.ones(self.steps, device=device)
        dpace = (
            self.cfg.dpace_alpha if self.cfg is not None and position_weights(self.cfg) == "dpace" else None
        )
        return chunked_loss(
            normed, self.draft.lm_head.weight, self.head.normed(batch["last"]), self.head, valid,
            scale, self.chunk, self.kind, dtype, dpace,
        )  # fmt: skip
