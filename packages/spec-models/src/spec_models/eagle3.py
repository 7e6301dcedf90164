"""EAGLE-3 draft (Li et al., 2025), single- or multi-layer, computing what vLLM's Eagle3LlamaForCausalLM /
Eagle3Qwen3ForCausalLM compute (vllm/model_executor/models/llama_eagle3.py, qwen3_eagle3.py).

One draft step, for tokens at positions p with target-vocabulary ids `ids` and incoming hidden states h:
    h0       = fc(aux)                          (step 0: the target's aux states, concatenated)  or
    h        = previous step's `next_hidden`    (later steps: the draft's own output)
    layer 0:   attn(cat[input_layernorm(embed(ids)), hidden_norm(h)])  residual from hidden_norm(h) or h
    layers>0:  plain pre-norm decoder layers
    normed, prenorm = norm(x + residual), x + residual
    logits   = lm_head(normed) over the draft vocabulary; target id = draft id + d2t[draft id]
    next_hidden = prenorm (normed when `norm_output`)
Rotary positions: the position of the token whose aux state feeds the step (vLLM's target position),
plus one per draft step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from spec_format.algorithms import build_eagle3_config, layer_dims
from spec_format.checkpoint import SpeculatorConfig
from spec_format.errors import SpecError
from spec_format.fingerprint import default_eagle3_layers, fingerprint_model_dir, read_model_config
from spec_format.vocab import VocabMapping
from spec_models.layers import AttentionFn, DecoderLayer, DraftDims, draft_dims, run_layer
from spec_models.ops import RMSNorm, add_rms_norm, rope_cos_sin, rope_inv_freq
from spec_models.registry import register_draft
from spec_models.verifier import layer_names, read_verifier_tensors, start_from_verifier


class Eagle3Spec(DraftDims, frozen=True):
    """The numbers an EAGLE-3 module is built from, resolved from config.json with vLLM's defaults."""

    layer_type: str  # "llama" | "qwen3"
    attention_bias: bool
    norm_before_residual: bool
    norm_before_fc: bool
    fc_norm: bool
    norm_output: bool


def eagle3_spec(cfg: SpeculatorConfig, source: str = "config.json") -> Eagle3Spec:
    d = layer_dims(cfg, source)
    lc = cfg.transformer_layer_config
    if d.model_type not in ("llama", "qwen3"):
        raise SpecError(
            f"{source}: field 'transformer_layer_config.model_type' is '{d.model_type}'; EAGLE-3 drafts are llama or qwen3"
        )
    if lc.get("hidden_act", "silu") != "silu" or lc.get("mlp_bias"):
        raise SpecError(f"{source}: field 'transformer_layer_config': only bias-free SiLU MLPs are supported")
    if d.attention_bias and d.model_type == "llama":
        # vLLM's Llama layer then also has an o_proj bias, which the checkpoint layout does not hold.
        raise SpecError(
            f"{source}: field 'transformer_layer_config.attention_bias' is only supported for qwen3 layers"
        )
    return Eagle3Spec(
        **draft_dims(cfg, d, len(cfg.eagle_aux_hidden_state_layer_ids or []) or 3),
        layer_type=d.model_type,
        attention_bias=d.attention_bias,
        # vLLM's speculators loader (update_eagle3) defaults: norm_before_residual True, the rest False.
        norm_before_residual=True if cfg.norm_before_residual is None else cfg.norm_before_residual,
        norm_before_fc=bool(cfg.norm_before_fc),
        fc_norm=bool(cfg.fc_norm),
        norm_output=bool(cfg.norm_output),
    )


@register_draft("eagle3")
class Eagle3Draft(nn.Module):
    """Parameters are named as in the checkpoint; `d2t` is a buffer ([draft_vocab] int64 offsets, zeros
    for a full vocabulary). `embed_tokens` is frozen (the verifier's) unless `embed_requires_grad`."""

    def __init__(self, config: SpeculatorConfig):
        super().__init__()
        s = eagle3_spec(config)
        self.config, self.spec = config, s
        self.embed_tokens = nn.Embedding(s.vocab, s.hidden)
        self.embed_tokens.weight.requires_grad_(bool(config.embed_requires_grad))
        fc_in = s.num_aux * s.target_hidden
        self.input_norm = RMSNorm(fc_in, s.eps) if s.norm_before_fc else None
        self.fc_norm = (
            nn.ModuleList(RMSNorm(s.target_hidden, s.eps) for _ in range(s.num_aux)) if s.fc_norm else None
        )
        self.fc = nn.Linear(fc_in, s.hidden, bias=False)
        self.layers = nn.ModuleList(
            DecoderLayer(
                i,
                s.hidden,
                s.heads,
                s.kv_heads,
                s.head_dim,
                s.intermediate,
                s.eps,
                qk_norm=s.layer_type == "qwen3",
                attention_bias=s.attention_bias,
                norm_before_residual=s.norm_before_residual,
            )
            for i in range(s.num_layers)
        )
        self.norm = RMSNorm(s.hidden, s.eps)
        self.lm_head = nn.Linear(s.hidden, s.draft_vocab, bias=False)
        self.register_buffer("d2t", torch.zeros(s.draft_vocab, dtype=torch.long))
        # Qwen3 layers in vLLM fall back to theta 1e6 when the config has none (set_default_rope_theta).
        theta = 1e6 if s.layer_type == "qwen3" else 1e4
        self._inv_freq = rope_inv_freq(config.transformer_layer_config, s.head_dim, theta)
        self.register_buffer("inv_freq", self._inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        # .to(bf16) casts floating buffers; rotary frequencies stay fp32 (as in vLLM), only moved.
        super()._apply(fn, recurse)
        self.inv_freq = self._inv_freq.to(self.inv_freq.device)
        return self

    # Tensors named in the checkpoint that this module does not hold: unused by vLLM as well.
    IGNORED_TENSORS = ("t2d",)

    def ignores_tensor(self, name: str) -> bool:
        # vLLM builds hidden_norm in every layer but only layer 0 uses it.
        return name in self.IGNORED_TENSORS or (
            name.startswith("layers.")
            and name.endswith(".hidden_norm.weight")
            and not name.startswith("layers.0.")
        )

    def combine(self, aux: torch.Tensor) -> torch.Tensor:
        """aux [..., num_aux * target_hidden] (target states, concatenated in layer-id order) -> [..., H]."""
        if self.input_norm is not None:
            aux = self.input_norm(aux)
        if self.fc_norm is not None:
            chunks = aux.chunk(len(self.fc_norm), dim=-1)
            aux = torch.cat([norm(c) for norm, c in zip(self.fc_norm, chunks)], dim=-1)
        return self.fc(aux)

    def forward(
        self, ids: torch.Tensor, hidden: torch.Tensor, pos: torch.Tensor, attention: AttentionFn
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft step for Q tokens per row.

        ids [B, Q] target-vocabulary token ids; hidden [B, Q, H] (combine(aux) or the previous step's
        next_hidden); pos [B, Q] rotary positions. Returns (normed [B, Q, H], the input of lm_head;
        next_hidden [B, Q, H], the hidden state the next step consumes).
        """
        embeds = self.embed_tokens(ids)
        cos, sin = rope_cos_sin(self.inv_freq, pos)
        x, residual = hidden, None
        for layer in self.layers:
            x, residual = run_layer(self, layer, embeds, x, residual, cos, sin, attention)
        normed, prenorm = add_rms_norm(self.norm, x, residual)
        return normed, (normed if self.spec.norm_output else prenorm)

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary ids -> target ids (target = draft + d2t[draft])."""
        return draft_ids + self.d2t[draft_ids]

    def greedy(self, normed: torch.Tensor) -> torch.Tensor:
        """normed [..., H] -> the greedy draft token as a target id [...]; ties go to the lowest id, as
        in vLLM's argmax over the scattered target-vocabulary logits (d2t keeps draft ids in target order)."""
        return self.to_target(self.lm_head(normed).argmax(dim=-1))


# ---------------------------------------------------------------------------------------------
# Initialisation from the verifier.


def init_eagle3_from_verifier(
    verifier_dir: str | Path,
    aux_layer_ids: list[int] | None = None,
    vocab_mapping: VocabMapping | None = None,
    num_layers: int = 1,
    layer_type: str | None = None,
    speculative_tokens: int = 3,
    norm_before_residual: bool = False,
    norm_before_fc: bool = False,
    fc_norm: bool = False,
    norm_output: bool = False,
    name_or_path: str | None = None,
    provenance: dict | None = None,
    seed: int = 0,
    layers_from_verifier: bool = False,
    **layer_overrides,
) -> Eagle3Draft:
    """A new EAGLE-3 draft for the verifier in `verifier_dir` (a Hugging Face model directory).

    Embeddings (frozen) are the verifier's; lm_head rows are the verifier's rows of the draft vocabulary
    (`vocab_mapping`; None keeps the whole vocabulary); the final norm starts as the verifier's final norm
    (the lm_head rows were trained to read its output). The decoder layer config is derived from the
    verifier's (spec_format.algorithms.draft_layer_config; `layer_overrides` change any key). The norm
    flags are the speculators format's (vLLM honours all four; see docs/algorithms/eagle3.md). Other
    weights: N(0, 0.02), norms 1. `aux_layer_ids` default to EAGLE-3's (2, L/2, L-3) in vLLM's
    capture-id convention. Only embeddings, lm_head and the final norm are read from the verifier, and,
    with `layers_from_verifier`, the decoder layers that follow the deepest aux layer (see
    `_layers_from_verifier`).
    """
    vcfg = read_model_config(verifier_dir)
    info = fingerprint_model_dir(verifier_dir, name_or_path=name_or_path)
    if aux_layer_ids is None:
        aux_layer_ids = default_eagle3_layers(info.num_hidden_layers)[:3]
    draft_vocab = info.vocab_size if vocab_mapping is None else len(vocab_mapping.d2t)
    cfg = build_eagle3_config(
        vcfg, info, aux_layer_ids, draft_vocab, speculative_tokens, num_layers, layer_type,
        norm_before_residual, provenance, norm_before_fc, fc_norm, norm_output, **layer_overrides,
    )  # fmt: skip
    if cfg.transformer_layer_config["hidden_size"] != info.hidden_size:
        raise SpecError(
            f"hidden_size override {cfg.transformer_layer_config['hidden_size']} differs from the verifier's {info.hidden_size}: "
            "EAGLE-3 drafts read the verifier's embeddings and lm_head, so they keep its hidden size"
        )
    model = Eagle3Draft(cfg)
    start_from_verifier(model, verifier_dir, vocab_mapping, seed)
    if layers_from_verifier:
        _layers_from_verifier(model, verifier_dir, info.num_hidden_layers)
    return model


@torch.no_grad()
def _layers_from_verifier(model: Eagle3Draft, verifier_dir: str | Path, num_verifier_layers: int) -> None:
    """Start the draft as the verifier's own continuation of its deepest aux state a (capture id a: the
    state entering verifier layer a). fc passes that state through (the other aux blocks start at zero)
    and draft layer i is verifier layer a + i; layer 0's q/k/v hold the verifier's weights on the hidden
    half of their [embeds, hidden] input and zeros on the embedding half, and its hidden_norm is the
    verifier layer's input norm. At step 0 the draft then computes what verifier layers a.. compute
    (a prediction of the token it is given, through the verifier's final norm and lm_head), and training
    moves it one token further. An MoE verifier has no dense MLP to copy: the draft's stays N(0, 0.02).
    On the quick start's data this start beat N(0, 0.02) weights at every step (docs/eval.md)."""
    ids = list(model.config.eagle_aux_hidden_state_layer_ids or [])
    a = max(ids)
    if a + len(model.layers) > num_verifier_layers:
        raise SpecError(
            f"layers_from_verifier: the deepest aux layer {a} leaves fewer than {len(model.layers)} verifier "
            f"layers after it ({num_verifier_layers} in all)"
        )
    H = model.spec.hidden
    wanted = {}
    for i, layer in enumerate(model.layers):
        for name, _ in layer.named_parameters():
            src = "input_layernorm.weight" if name == "hidden_norm.weight" else name
            if i == 0 and name == "input_layernorm.weight":
                continue  # layer 0's input norm reads embeddings, which the verifier's layer a never sees
            wanted[f"{i}.{name}"] = layer_names(a + i, src)
    found = read_verifier_tensors(verifier_dir, wanted)
    for key, names in wanted.items():
        i, name = key.split(".", 1)
        param = model.layers[int(i)].get_parameter(name)
        if key not in found:
            if name.startswith("mlp."):
                continue  # an MoE verifier layer has experts, not one dense MLP: it stays N(0, 0.02)
            raise SpecError(f"{verifier_dir}: no tensor {names[0]} to start draft layer {i} from")
        w = torch.tensor(found[key])
        if i == "0" and name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            param.zero_()
            target = param[:, H:]  # the hidden half of cat([embeds, hidden])
        else:
            target = param
        if target.shape != w.shape:
            raise SpecError(
                f"layers_from_verifier: draft tensor layers.{key} {tuple(target.shape)} does not match the "
                f"verifier's {names[0]} {tuple(w.shape)}; keep the verifier's layer shapes"
            )
        target.copy_(w)
    block = ids.index(a) * model.spec.target_hidden
    model.fc.weight.zero_()
    model.fc.weight[:, block : block + model.spec.target_hidden] = torch.eye(H, model.spec.target_hidden)
