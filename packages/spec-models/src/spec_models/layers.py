"""The draft's decoder layer: Llama-style, or Qwen3-style (RMSNorm on each query/key head before rotary).

Parameter names are the checkpoint's tensor names (`self_attn.q_proj.weight`, `mlp.gate_proj.weight`, ...),
the names vLLM's loader reads, so a state dict is a checkpoint without renaming.

Attention is handed in as a function `attention(layer_index, q, k, v) -> out`, so the same layer serves
training (keys of all test-time-training steps, ttt.py) and drafting (a KV cache, drafting.py).
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import torch
import torch.nn.functional as F
from torch import nn

from spec_format.algorithms import LayerDims
from spec_format.checkpoint import SpeculatorConfig
from spec_models.ops import RMSNorm, add_rms_norm, apply_rope


class DraftDims(msgspec.Struct, frozen=True):
    """The numbers every draft module is built from (each algorithm's spec adds its own fields)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    num_layers: int
    eps: float
    vocab: int  # target vocabulary (embeddings, d2t's range)
    draft_vocab: int  # lm_head rows
    target_hidden: int
    num_aux: int


def draft_dims(cfg: SpeculatorConfig, d: LayerDims, num_aux: int) -> dict:
    """DraftDims' fields from a checkpoint config, with vLLM's defaults, as keywords for a spec."""
    return dict(
        hidden=d.hidden_size, heads=d.num_heads, kv_heads=d.num_kv_heads, head_dim=d.head_dim,
        intermediate=d.intermediate_size, num_layers=d.num_layers,
        eps=float(cfg.transformer_layer_config.get("rms_norm_eps", 1e-6)), vocab=d.vocab_size,
        draft_vocab=cfg.draft_vocab_size or d.vocab_size, target_hidden=cfg.target_hidden_size or d.hidden_size,
        num_aux=num_aux,
    )  # fmt: skip


# attention(layer_index, q [B, h, Q, d], k [B, kv_h, Q, d], v [B, kv_h, Q, d]) -> [B, h, Q, d]
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class SelfAttention(nn.Module):
    def __init__(
        self,
        in_dim: int,
        hidden: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        bias: bool,
        qk_norm: bool,
        eps: float,
    ):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(in_dim, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(in_dim, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(in_dim, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps)
            self.k_norm = RMSNorm(head_dim, eps)
        self.qk_norm = qk_norm

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: AttentionFn, index: int
    ) -> torch.Tensor:
        """x [B, Q, in_dim] -> [B, Q, hidden]."""
        B, Q, _ = x.shape
        q = self.q_proj(x).view(B, Q, self.heads, self.head_dim)
        k = self.k_proj(x).view(B, Q, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, Q, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        out = attention(index, q, k, v.transpose(1, 2))
        return self.o_proj(out.transpose(1, 2).reshape(B, Q, self.heads * self.head_dim))


def run_layer(model: nn.Module, layer: nn.Module, *args):
    """layer(*args), with activation checkpointing when `model.gradient_checkpointing` is set (spec train
    --gradient-checkpointing) and gradients are on: the layer's activations are recomputed in the
    backward instead of kept, so memory per layer is its inputs only. Attention functions called again
    in the recomputation must give the same result (ttt.forward_ttt keeps its keys once)."""
    if getattr(model, "gradient_checkpointing", False) and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


class MLP(nn.Module):
    """Dense SwiGLU MLP (also for MoE targets: the draft stays dense)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """One draft decoder layer, in vLLM's residual order (llama_eagle3.py / qwen3_eagle3.py).

    Layer 0 (EAGLE-3): attention reads cat([input_layernorm(embeds), hidden_norm(hidden)]) (2H wide); the
    residual stream starts from hidden_norm(hidden) when `norm_before_residual`, else from the raw hidden.
    Later layers: plain pre-norm layers with vLLM's fused add-norm; they ignore `embeds`.
    """

    def __init__(
        self, index: int, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int,
        eps: float, qk_norm: bool, attention_bias: bool, norm_before_residual: bool,
    ):  # fmt: skip
        super().__init__()
        self.index = index
        in_dim = 2 * hidden if index == 0 else hidden
        self.self_attn = SelfAttention(
            in_dim, hidden, heads, kv_heads, head_dim, attention_bias, qk_norm, eps
        )
        self.mlp = MLP(hidden, intermediate)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        if index == 0:
            self.hidden_norm = RMSNorm(hidden, eps)
        self.norm_before_residual = norm_before_residual

    def forward(
        self,
        embeds: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention: AttentionFn,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """embeds, x [B, Q, H]; residual [B, Q, H] or None (layer 0) -> (x, residual)."""
        if self.index == 0:
            h = self.hidden_norm(x)
            residual = h if self.norm_before_residual else x
            x = torch.cat([self.input_layernorm(embeds), h], dim=-1)
        else:
            x, residual = add_rms_norm(self.input_layernorm, x, residual)
        x = self.self_attn(x, cos, sin, attention, self.index)
        x, residual = add_rms_norm(self.post_attention_layernorm, x, residual)
        return self.mlp(x), residual
