"""Exact blockwise attention for the training masks "causal within the document, plus a few own keys".

Every query of a TTT step (ttt.py) or a P-EAGLE depth (peagle.py) at slot t sees
    context keys  k[s] for slots s <= t of t's document        (causal; rows pack several documents)
    own keys      n keys of slot t alone (its earlier TTT steps / chain depths)
A dense [T, T + n*T] mask computes every score, most of them masked: O(n * T^2) per step. Here each
document runs one causal flash-attention call on its own slice (the kernel skips the upper triangle: T^2/2
at most), the own keys are n elementwise scores, and the two merge through their log-sum-exps. Memory is
linear in T (flash attention keeps no [T, T] matrix; the backward recomputes it).

The backward needs the gradient through the context part's log-sum-exp, which the flash kernel's
backward does not take. It takes one extra head column: with q, k, v padded by a zero column, out by a
column of ones and dout by -dlse, the kernel's rowsum(dout * out) becomes D - dlse, which is exactly the
softmax backward with the extra log-sum-exp gradient (dS = P * (dP - D + dlse)).

CPU only (aten's CPU flash kernels); other devices keep the dense mask or flex attention
(ttt.forward_ttt's `attn`). The kernels run in bf16 when training does (autocast bf16, which spec train
picks on CPUs with AMX: there they take 102 us a token of an 8k-token row forward and backward, against
175 in fp32), else in fp32; the log-sum-exp merge and everything around it stays fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def document_spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row of position_ids [B, T]: the (start, end) slots of its documents (each starts at position 0).
    Read on the host once per forward."""
    spans = []
    for row in position_ids.tolist():
        starts = [i for i, p in enumerate(row) if p == 0] or [0]
        if starts[0] != 0:
            starts.insert(0, 0)
        spans.append(list(zip(starts, starts[1:] + [len(row)])))
    return spans


def _context(q, k, v, spans, scale, kernel_dtype):
    """Causal attention within each document, the kernel in kernel_dtype: (out [B, h, T, d], lse [B, h, T])
    in q's dtype."""
    out, lse = torch.empty_like(q), q.new_empty(q.shape[:3])
    q_, k_, v_ = (x.to(kernel_dtype) for x in (q, k, v))
    for b, row in enumerate(spans):
        for s, e in row:
            o, m = _fwd(
                q_[b : b + 1, :, s:e], k_[b : b + 1, :, s:e], v_[b : b + 1, :, s:e], 0.0, True, scale=scale
            )
            out[b, :, s:e], lse[b, :, s:e] = o[0], m[0]
    return out, lse


class _DocCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, xk, xv, spans, kernel_dtype):
        scale = q.shape[-1] ** -0.5
        oc, lc = _context(q, k, v, spans, scale, kernel_dtype)  # [B, h, T, d], [B, h, T]
        sx = (q[:, :, :, None] * xk).sum(-1) * scale  # [B, h, T, n]: own-key scores
        lse = torch.logaddexp(lc, sx.logsumexp(-1)) if sx.shape[-1] else lc
        w0, wx = (lc - lse).exp(), (sx - lse[..., None]).exp()
        out = w0[..., None] * oc + (wx[..., None] * xv).sum(-2)
        ctx.save_for_backward(q, k, v, xk, xv, oc, lc, sx, lse, out)
        ctx.spans, ctx.scale, ctx.kernel_dtype = spans, scale, kernel_dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, xk, xv, oc, lc, sx, lse, out = ctx.saved_tensors
        scale = ctx.scale
        w0, wx = (lc - lse).exp(), (sx - lse[..., None]).exp()
        D = (dout * out).sum(-1, keepdim=True)  # [B, h, T, 1]
        doc_ = w0[..., None] * dout  # d loss / d context out
        dlc = w0 * ((dout * oc).sum(-1) - D[..., 0])  # d loss / d context lse
        dsx = wx * ((dout[:, :, :, None] * xv).sum(-1) - D)  # [B, h, T, n]
        dxv = wx[..., None] * dout[:, :, :, None]
        dxk = dsx[..., None] * q[:, :, :, None] * scale
        dq = (dsx[..., None] * xk).sum(-2) * scale
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        pad = lambda x, c: F.pad(x, (0, 1), value=c).to(ctx.kernel_dtype)  # noqa: E731
        q1, k1, v1 = pad(q, 0.0), pad(k, 0.0), pad(v, 0.0)
        o1 = torch.cat([oc, torch.ones_like(oc[..., :1])], -1).to(ctx.kernel_dtype)
        g1 = torch.cat([doc_, -dlc[..., None]], -1).to(ctx.kernel_dtype)
        for b, row in enumerate(ctx.spans):
            for s, e in row:
                sl = (slice(b, b + 1), slice(None), slice(s, e))
                gq, gk, gv = _bwd(
                    g1[sl], q1[sl], k1[sl], v1[sl], o1[sl], lc[sl].contiguous(), 0.0, True, scale=scale
                )
                dq[sl] += gq[..., :-1]
                dk[sl] += gk[..., :-1]
                dv[sl] += gv[..., :-1]
        return dq, dk, dv, dxk, dxv, None, None


def stack_own(keys: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """n tensors [B, kv_h, T, d] -> own keys [B, kv_h, T, n, d] (n = 0: empty, shaped after `like`)."""
    if keys:
        return torch.stack(keys, 3)
    return like.new_empty(*like.shape[:3], 0, like.shape[3])


def doc_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    own_k: torch.Tensor,
    own_v: torch.Tensor,
    spans: list[list[tuple[int, int]]],
) -> torch.Tensor:
    """Attention of each slot's query over the causal keys of its document plus keys of its own.

    q [B, h, T, d]; k, v [B, kv_h, T, d] (slot order); own_k, own_v [B, kv_h, T, n, d] (n >= 0 keys per
    slot); spans: document_spans(position_ids). Returns [B, h, T, d] in q's dtype. Query head i reads KV
    head i // (h / kv_h), as in vLLM. Computed in fp32 (fp64 inputs: fp64), autocast off; the flash kernels
    in bf16 where q is bf16 (autocast bf16 training).
    """
    h, kv = q.shape[1], k.shape[1]
    with torch.autocast(q.device.type, enabled=False):
        args = [x.to(torch.promote_types(x.dtype, torch.float32)) for x in (q, k, v, own_k, own_v)]
        if kv != h:
            args[1:] = [x.repeat_interleave(h // kv, dim=1) for x in args[1:]]
        kernel_dtype = torch.bfloat16 if q.dtype == torch.bfloat16 else args[0].dtype
        out = _DocCausalAttention.apply(*args, spans, kernel_dtype)
    return out.to(q.dtype)
