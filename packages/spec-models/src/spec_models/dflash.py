"""DFlash draft (z-lab, arXiv 2602.06036), computing what vLLM's DFlashQwen3ForCausalLM computes
(vllm/model_executor/models/qwen3_dflash.py, vllm/v1/spec_decode/dflash.py).

One drafting round for a request whose target has processed x_0..x_{a-1} and sampled x_a (the anchor):
    ctx      = hidden_norm(fc(aux[0..a-1]))              [C=a, H]   the target's aux states, concatenated
    per layer l: K_ctx = rope(k_norm(k_proj_l(ctx))), V_ctx = v_proj_l(ctx)   (context keys, positions 0..a-1)
    x        = embed([x_a, mask, ..., mask])             [k+1, H]  at positions a .. a+k
    layers:    pre-norm Qwen3 layers (vLLM's fused add-norm residual order); the block's queries attend
               to the context keys and to ALL k+1 block keys (non-causal inside the block)
    normed   = norm(x + residual)
    draft j  = argmax lm_head(normed[j]) over the draft vocabulary (+ d2t), j = 1..k  -> x_{a+j}
One forward for the whole block: the cost barely grows with k. Training (spec_train.dflash) runs many
blocks of one packed row at once: block n sees the context of its own document before its anchor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from spec_format.algorithms import layer_dims
from spec_format.checkpoint import SpeculatorConfig
from spec_format.dflash import build_dflash_config
from spec_format.errors import SpecError
from spec_format.fingerprint import fingerprint_model_dir, read_model_config
from spec_format.vocab import VocabMapping
from spec_models.layers import MLP, DraftDims, SelfAttention, draft_dims, run_layer
from spec_models.ops import RMSNorm, add_rms_norm, apply_rope, attend, rope_cos_sin, rope_inv_freq
from spec_models.registry import register_draft
from spec_models.verifier import layer_names, read_verifier_tensors, start_from_verifier


class DFlashSpec(DraftDims, frozen=True):
    k: int  # masked slots per block (block = anchor + k)
    mask_token_id: int


def dflash_spec(cfg: SpeculatorConfig, source: str = "config.json") -> DFlashSpec:
    d = layer_dims(cfg, source)
    lc = cfg.transformer_layer_config
    if lc.get("hidden_act", "silu") != "silu" or lc.get("mlp_bias") or d.attention_bias:
        raise SpecError(
            f"{source}: field 'transformer_layer_config': spec-models' DFlash has bias-free SiLU layers only"
        )
    if cfg.sample_from_anchor:
        raise SpecError(
            f"{source}: field 'sample_from_anchor' is true; spec-models drafts from the masked slots only"
        )
    if lc.get("layer_types") and any(t != "full_attention" for t in lc["layer_types"]):
        raise SpecError(
            f"{source}: field 'transformer_layer_config.layer_types': only full attention is supported"
        )
    return DFlashSpec(
        **draft_dims(cfg, d, len(cfg.aux_hidden_state_layer_ids)),
        k=cfg.speculative_tokens,
        mask_token_id=int(cfg.mask_token_id),
    )


class DFlashLayer(nn.Module):
    def __init__(self, s: DFlashSpec):
        super().__init__()
        self.self_attn = SelfAttention(
            s.hidden, s.hidden, s.heads, s.kv_heads, s.head_dim, False, True, s.eps
        )
        self.mlp = MLP(s.hidden, s.intermediate)
        self.input_layernorm = RMSNorm(s.hidden, s.eps)
        self.post_attention_layernorm = RMSNorm(s.hidden, s.eps)

    def context_kv(self, ctx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """ctx [B, C, H] (hidden_norm(fc(aux))) -> K, V [B, kv_heads, C, head_dim]: vLLM writes these into
        the draft's KV cache (precompute_and_store_context_kv) before the block's forward."""
        a = self.self_attn
        B, C, _ = ctx.shape
        k = a.k_norm(a.k_proj(ctx).view(B, C, a.kv_heads, a.head_dim))
        v = a.v_proj(ctx).view(B, C, a.kv_heads, a.head_dim)
        return apply_rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)

    def forward(self, x, residual, cos, sin, ctx, ccos, csin, mask):
        """x [B, Q, H] block states; ctx [B, C, H] context states at rotary (ccos, csin); mask as in
        DFlashDraft.forward. The context's K/V are made here, inside this module's call, so that FSDP2
        (which gathers a layer's weights around its forward) has them gathered."""
        k_ctx, v_ctx = self.context_kv(ctx, ccos, csin)

        def attention(_, q, k, v):
            return attend(q, torch.cat([k_ctx, k], 2), torch.cat([v_ctx, v], 2), mask)

        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = add_rms_norm(self.input_layernorm, x, residual)
        x = self.self_attn(x, cos, sin, attention, 0)
        x, residual = add_rms_norm(self.post_attention_layernorm, x, residual)
        return self.mlp(x), residual


@register_draft("dflash")
class DFlashDraft(nn.Module):
    """Parameters named as in the checkpoint; `embed_tokens` is the verifier's (frozen), `d2t` a buffer
    (zeros for the full vocabulary)."""

    def __init__(self, config: SpeculatorConfig):
        super().__init__()
        s = dflash_spec(config)
        self.config, self.spec = config, s
        self.embed_tokens = nn.Embedding(s.vocab, s.hidden)
        self.embed_tokens.weight.requires_grad_(bool(config.embed_requires_grad))
        self.fc = nn.Linear(s.num_aux * s.target_hidden, s.hidden, bias=False)
        self.hidden_norm = RMSNorm(s.hidden, s.eps)
        self.layers = nn.ModuleList(DFlashLayer(s) for _ in range(s.num_layers))
        self.norm = RMSNorm(s.hidden, s.eps)
        self.lm_head = nn.Linear(s.hidden, s.draft_vocab, bias=False)
        self.register_buffer("d2t", torch.zeros(s.draft_vocab, dtype=torch.long))
        # vLLM's DFlash layers fall back to theta 1e6 when the config has none (set_default_rope_theta).
        self._inv_freq = rope_inv_freq(config.transformer_layer_config, s.head_dim, 1e6)
        self.register_buffer("inv_freq", self._inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # rotary frequencies stay fp32 (as in vLLM), only moved
        self.inv_freq = self._inv_freq.to(self.inv_freq.device)
        return self

    def ignores_tensor(self, name: str) -> bool:
        return name == "t2d"

    def combine(self, aux: torch.Tensor) -> torch.Tensor:
        """aux [..., num_aux * target_hidden] -> the context states hidden_norm(fc(aux)) [..., H]."""
        return self.hidden_norm(self.fc(aux))

    def forward(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        ctx: torch.Tensor,
        ctx_pos: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Blocks of query tokens against context states.

        ids [B, Q] block tokens (anchors and mask_token_id), pos [B, Q] their positions; ctx [B, C, H]
        (combine(aux)), ctx_pos [B, C]; mask bool [B, 1, Q, C + Q]: which context and block keys each query
        sees (True = attend). Returns normed [B, Q, H], the lm_head input.
        """
        cos, sin = rope_cos_sin(self.inv_freq, pos)
        ccos, csin = rope_cos_sin(self.inv_freq, ctx_pos)
        x, residual = self.embed_tokens(ids), None
        for layer in self.layers:
            x, residual = run_layer(self, layer, x, residual, cos, sin, ctx, ccos, csin, mask)
        return add_rms_norm(self.norm, x, residual)[0]

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def greedy(self, normed: torch.Tensor) -> torch.Tensor:
        """normed [..., H] -> greedy draft tokens as target ids [...] (ties to the lowest id, as vLLM)."""
        return self.to_target(self.lm_head(normed).argmax(dim=-1))


def block_inputs(model: DFlashDraft, anchor_ids: torch.Tensor, anchor_pos: torch.Tensor):
    """anchor_ids, anchor_pos [B, N] -> block ids, positions [B, N * (k+1)]: each anchor followed by k
    mask tokens at the next positions."""
    B, N = anchor_ids.shape
    width = model.spec.k + 1
    ids = torch.full((B, N, width), model.spec.mask_token_id, dtype=torch.long, device=anchor_ids.device)
    ids[:, :, 0] = anchor_ids
    pos = anchor_pos[:, :, None] + torch.arange(width, device=anchor_pos.device)
    return ids.reshape(B, N * width), pos.reshape(B, N * width)


@torch.no_grad()
def propose_dflash(
    model: DFlashDraft,
    next_ids: torch.Tensor,
    aux: torch.Tensor,
    lengths: torch.Tensor,
    num_tokens: int | None = None,
) -> torch.Tensor:
    """Greedy draft tokens for a batch of contexts, as vLLM's DFlash proposer makes them.

    Same inputs as spec_models.propose (slot t holds x_{t+1} and the aux state after x_t): next_ids [B, L]
    (x_1..x_n in the first n = lengths[b] slots), aux [B, L, num_aux * target_hidden]; the anchor is x_n
    (the last next_id) at position n, its context the aux states of positions 0..n-1. Returns [B, k].
    """
    k = model.spec.k
    if num_tokens not in (None, k):
        raise SpecError(
            f"this DFlash draft fills blocks of {k + 1}: it proposes {k} tokens, not {num_tokens}"
        )
    B, L = next_ids.shape
    dev = next_ids.device
    lengths = lengths.to(dev)
    rows = torch.arange(B, device=dev)
    anchor = next_ids[rows, lengths - 1][:, None]
    ids, pos = block_inputs(model, anchor, lengths[:, None])
    ctx_pos = torch.arange(L, device=dev).expand(B, L)
    see_ctx = ctx_pos < lengths[:, None]  # [B, L]
    mask = torch.cat([see_ctx, torch.ones(B, k + 1, dtype=torch.bool, device=dev)], 1)
    mask = mask[:, None, None, :].expand(B, 1, k + 1, L + k + 1)
    normed = model(ids, pos, model.combine(aux), ctx_pos, mask)
    return model.greedy(normed[:, 1:])


# ---------------------------------------------------------------------------------------------
# Initialisation from the verifier.


def default_mask_token(verifier_dir: str | Path) -> int:
    """The tokenizer's mask token, else its last added special token that is not bos/eos/pad/unk (SmolLM2:
    16, <empty_output>): an id chat data never holds, so its embedding only ever means 'masked slot'."""
    vdir = Path(verifier_dir)
    try:
        tok = json.loads((vdir / "tokenizer.json").read_text())
        tcfg = json.loads((vdir / "tokenizer_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise SpecError(
            f"{vdir}: no readable tokenizer.json/tokenizer_config.json to pick a mask token from; pass --mask-token-id"
        ) from None
    added = {a["content"]: a["id"] for a in tok.get("added_tokens", [])}
    if tcfg.get("mask_token") in added:
        return added[tcfg["mask_token"]]
    taken = {tcfg.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    free = [i for c, i in added.items() if c not in taken]
    if not free:
        raise SpecError(
            f"{vdir}: the tokenizer has no spare special token for DFlash's mask; pass --mask-token-id"
        )
    return max(free)


def init_dflash_from_verifier(
    verifier_dir: str | Path,
    aux_layer_ids: list[int],
    vocab_mapping: VocabMapping | None = None,
    num_layers: int = 1,
    speculative_tokens: int = 7,
    mask_token_id: int | None = None,
    name_or_path: str | None = None,
    provenance: dict | None = None,
    seed: int = 0,
    layers_from_verifier: bool = False,
    **layer_overrides,
) -> DFlashDraft:
    """A new DFlash draft for the verifier in `verifier_dir`: embeddings (frozen), lm_head rows of the
    draft vocabulary and the final norm from the verifier; other weights N(0, 0.02), norms 1. With
    `layers_from_verifier`, draft layer i starts as verifier layer L - num_layers + i (the last ones: they
    map states to next-token predictions that the verifier's norm and lm_head read)."""
    vcfg = read_model_config(verifier_dir)
    info = fingerprint_model_dir(verifier_dir, name_or_path=name_or_path)
    if mask_token_id is None:
        mask_token_id = default_mask_token(verifier_dir)
    draft_vocab = info.vocab_size if vocab_mapping is None else len(vocab_mapping.d2t)
    cfg = build_dflash_config(
        vcfg, info, aux_layer_ids, draft_vocab, mask_token_id, speculative_tokens, num_layers, provenance,
        **layer_overrides,
    )  # fmt: skip
    model = DFlashDraft(cfg)
    start_from_verifier(model, verifier_dir, vocab_mapping, seed)
    if layers_from_verifier:
        first = info.num_hidden_layers - num_layers
        for i, layer in enumerate(model.layers):
            wanted = {n: layer_names(first + i, n) for n, _ in layer.named_parameters()}
            got = read_verifier_tensors(verifier_dir, wanted)
            with torch.no_grad():
                for n, p in layer.named_parameters():
                    if n in got and tuple(got[n].shape) == tuple(p.shape):
                        p.copy_(torch.tensor(got[n]))
    return model
