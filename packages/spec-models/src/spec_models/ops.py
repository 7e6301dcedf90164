"""Building blocks shared by the draft architectures: RMSNorm, rotary embeddings, attention.

Each op computes what vLLM's layer of the same name computes (vllm/model_executor/layers/layernorm.py,
rotary_embedding/), so a draft trained here drafts the same tokens when vLLM serves it. Tensors are
[batch, tokens, ...] unless a comment says otherwise; nothing here has a data-dependent shape or syncs
with the host, so the ops compile with `torch.compile(fullgraph=True)` and capture in CUDA graphs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from spec_format.errors import SpecError


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back before the weight, as vLLM and HF do."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def add_rms_norm(norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's fused add-norm: residual <- x + residual; returns (norm(residual), residual)."""
    residual = x + residual
    return norm(residual), residual


# ---------------------------------------------------------------------------------------------
# Rotary embeddings (neox style: the two halves of each head rotate together).


def rope_inv_freq(layer_cfg: dict, head_dim: int, default_theta: float = 10000.0) -> torch.Tensor:
    """float32 [head_dim // 2] inverse frequencies for the rope settings of a HF layer config.

    Reads `rope_parameters` (transformers >= 5) or `rope_theta` + `rope_scaling` (older configs), and
    supports the rope types vLLM's get_rope builds for these drafts: default, linear, llama3.
    """
    params = dict(layer_cfg.get("rope_scaling") or {})
    params.update(layer_cfg.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", layer_cfg.get("rope_theta", default_theta)))
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0 or params.get("rope_dim"):
        raise SpecError(
            "transformer_layer_config: partial rotary embeddings are not supported by spec-models"
        )
    # Same expression as vLLM's RotaryEmbeddingBase._compute_inv_freq, so the fp32 values agree.
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    if kind == "default":
        return inv
    if kind == "linear":
        # vLLM divides positions by the factor; dividing the frequencies is the same rotation.
        return inv / float(params["factor"])
    if kind == "llama3":
        factor, low, high = float(params["factor"]), params["low_freq_factor"], params["high_freq_factor"]
        orig = params["original_max_position_embeddings"]
        wave_len = 2 * math.pi / inv
        smooth = (orig / wave_len - low) / (high - low) if low != high else 0
        return torch.where(
            wave_len < orig / high,
            inv,
            torch.where(wave_len > orig / low, inv / factor, (1 - smooth) * inv / factor + smooth * inv),
        )
    raise SpecError(
        f"transformer_layer_config: rope_type '{kind}' is not supported by spec-models (default, linear, llama3)"
    )


def rope_cos_sin(inv_freq: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pos [B, Q] int -> cos, sin [B, 1, Q, head_dim] (float32), broadcasting over heads."""
    freqs = pos.float().unsqueeze(-1) * inv_freq  # [B, Q, d/2]
    freqs = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, Q, d] rotated by position (neox style)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Attention.


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads (query head i reads KV head i // group).

    q [B, h, Q, d]; k, v [B, kv_h, K, d]; mask bool, broadcastable to [B, h, Q, K] (True = attend).
    Every query must see at least one key (its own), or its row would be NaN. KV heads are repeated
    rather than passed with enable_gqa: SDPA's GQA path takes the math kernel when there is a mask
    (O(Q*K) memory per head on GPUs), the repeated one the memory-efficient kernel.
    """
    if k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # CPU SDPA's backward is ~4x slower in bf16 than in fp32 (oneDNN-less kernel); run it in fp32.
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
