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
from spec_train.targets import VerifierHead


def _bucket(x: torch.Tensor, multiple: int = 64) -> torch.Tensor:
    """x [m, ...] padded with zero rows to a multiple of `multiple` rows: the selected slots vary per row,
    and a CPU bf16 matmul compiles a kernel for every new shape (oneDNN), so the shapes are bucketed."""
    pad = (-x.shape[0]) % multiple
    return torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, normed, weight, t_normed, t_weight, valid, scale, chunk, kind, dtype, need_grad):
        """normed [S, T, H] draft lm_head inputs; weight [Vd, H] draft lm_head; t_normed [T, H] verifier
        lm_head inputs; t_weight [Vd, H] verifier rows of the draft vocabulary; valid bool [S, T];
        scale [S] multiplies step j's summed loss. Returns (loss [], stats [3, S]: summed per-token loss,
        top-1 agreements (draft argmax == verifier argmax within the draft vocabulary), counted slots)."""
        S, T, _ = normed.shape
        w, tw = weight.detach().to(dtype), t_weight.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=normed.device)
        stats = torch.zeros(3, S, dtype=torch.float32, device=normed.device)
        grad_normed = torch.zeros_like(normed, dtype=torch.float32) if need_grad else None
        need_w = need_grad and ctx.needs_input_grad[1]  # False when the lm_head is frozen
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for p0 in range(0, T, chunk):
            p1 = min(p0 + chunk, T)
            # Slots t = p - 1 - j whose target position p falls in [p0, p1), for each step j.
            sel = []
            need = torch.zeros(p1 - p0, dtype=torch.bool, device=normed.device)
            for j in range(S):
                lo, hi = max(p0 - 1 - j, 0), max(p1 - 1 - j, 0)
                t = valid[j, lo:hi].nonzero().squeeze(1) + lo
                sel.append(t)
                need[t + 1 + j - p0] = True
            pos = need.nonzero().squeeze(1)  # needed target positions, relative to p0
            if not len(pos):
                continue
            row_of = torch.cumsum(need.long(), 0) - 1  # position - p0 -> row of the chunk's target logits
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
                loss += scale[j] * per.sum()
                if need_grad:
                    if kind == "lk":  # d alpha / d z_i = q_i (below_i - sum_v below_v q_v)
                        g = -q * (below - (below * q).sum(-1, keepdim=True)) / alpha[:, None]
                    else:  # d/dq of KL(p || softmax q) and of CE: softmax(q) - target
                        g = logq.exp_()
                        if kind == "kl":
                            g -= p
                        else:
                            g[torch.arange(len(t), device=g.device), top] -= 1
                    g = _bucket((g * scale[j]).to(dtype))  # padded rows are zero: no gradient
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
        return ((grad_normed * g_loss).to(ctx.dtypes[0]), gw) + (None,) * 8


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, stats [3, S]); see _ChunkedLoss.forward."""
    need_grad = torch.is_grad_enabled() and (normed.requires_grad or weight.requires_grad)
    return _ChunkedLoss.apply(
        normed, weight, t_normed, head.draft_weight, valid, scale, chunk, kind, dtype, need_grad
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
        return chunked_loss(
            normed, self.draft.lm_head.weight, self.head.normed(batch["last"]), self.head, valid,
            scale, self.chunk, self.kind, dtype,
        )  # fmt: skip
