"""Which tensors each algorithm's checkpoint holds, with shapes derived from config.json.

One function per algorithm, registered under its `speculators_model_type`; a new algorithm (P-EAGLE,
DFlash, ...) arrives as one function and one `register_layout` call. Names are those vLLM's loader reads
(vllm/model_executor/models/llama_eagle3.py, qwen3_eagle3.py).
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from spec_format.checkpoint import (
    ProposalMethod,
    SpecMetadata,
    SpeculatorConfig,
    SpeculatorsSection,
    Verifier,
)
from spec_format.errors import SpecError
from spec_format.fingerprint import TargetInfo, default_eagle3_layers

Shape = tuple[int, ...]


class Layout(msgspec.Struct):
    required: dict[str, Shape]
    optional: dict[str, Shape] = {}
    # Tensors with a fixed dtype; every other tensor must be floating point.
    dtypes: dict[str, str] = {}
    # Tensors the algorithm knows but this config must not have: name -> why.
    forbidden: dict[str, str] = {}


# fn(config, source) -> Layout; `source` names config.json in error messages.
LAYOUTS: dict[str, Callable[[SpeculatorConfig, str], Layout]] = {}


def register_layout(model_type: str):
    def deco(fn):
        LAYOUTS[model_type] = fn
        return fn

    return deco


def layout_for(cfg: SpeculatorConfig, source: str = "config.json") -> Layout:
    fn = LAYOUTS.get(cfg.speculators_model_type)
    if fn is None:
        raise SpecError(
            f"{source}: field 'speculators_model_type': unknown algorithm '{cfg.speculators_model_type}' (known: {', '.join(sorted(LAYOUTS))})"
        )
    return fn(cfg, source)


# How vLLM serves each algorithm: the `speculative_config` keys besides model and k. One-pass drafters
# (P-EAGLE, DFlash) register theirs next to their layout; eval, serve and the quick start read it from
# here and never name an algorithm themselves.
SERVING: dict[str, dict] = {}


def register_serving(model_type: str, **speculative_config) -> None:
    SERVING[model_type] = speculative_config


def vllm_speculative_config(cfg: SpeculatorConfig, draft_dir: str, k: int | None = None) -> dict:
    """vLLM's `speculative_config` serving the draft in `draft_dir` at k draft tokens (default: the
    checkpoint's own `speculative_tokens`)."""
    extra = SERVING.get(cfg.speculators_model_type)
    if extra is None:
        raise SpecError(
            f"{draft_dir}/config.json: field 'speculators_model_type': no vLLM method is known for "
            f"'{cfg.speculators_model_type}' (known: {', '.join(sorted(SERVING))})"
        )
    k = cfg.speculative_tokens if k is None else k
    if not isinstance(k, int) or k < 1:  # vLLM's SpeculativeConfig: num_speculative_tokens > 0, every method
        raise SpecError(
            f"k = {k!r}: vLLM serves {cfg.speculators_model_type} drafts at k >= 1 draft tokens per step"
        )
    if k not in (servable_ks(cfg) or [k]):
        raise SpecError(
            f"{draft_dir}/config.json: the draft fills blocks of {cfg.block_size} (field 'block_size'); "
            f"serve it at k = {cfg.block_size - 1}, not {k}, or train one for that block"
        )
    return {**extra, "model": str(draft_dir), "num_speculative_tokens": k}


def servable_ks(cfg: SpeculatorConfig) -> list[int] | None:
    """The k vLLM can serve this draft at; None: any k >= 1. A block drafter (DFlash: field `block_size`)
    sees its whole block at once, so only at k = block_size - 1."""
    return [cfg.block_size - 1] if cfg.block_size else None


class LayerDims(msgspec.Struct, frozen=True):
    """The draft decoder's dimensions, read from `transformer_layer_config`."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int  # the TARGET vocabulary (embeddings); the draft head uses draft_vocab_size
    attention_bias: bool


# transformers' defaults for keys a saved config may leave out (configs saved by transformers 4.x keep only
# the keys that differ from them); vLLM builds the draft's config class from the dict, so these apply.
_HF_DEFAULTS = {
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
    "qwen3": {
        "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128,
    },
}  # fmt: skip


def layer_dims(cfg: SpeculatorConfig, source: str = "config.json") -> LayerDims:
    model_type = str(cfg.transformer_layer_config.get("model_type", "llama"))
    lc = {**_HF_DEFAULTS.get(model_type, {}), **cfg.transformer_layer_config}
    for key in ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(lc.get(key), int) or lc[key] < 1:
            raise SpecError(
                f"{source}: field 'transformer_layer_config.{key}' must be a positive integer, found {lc.get(key)!r}"
            )
    heads = lc["num_attention_heads"]
    return LayerDims(
        model_type=model_type,
        hidden_size=lc["hidden_size"],
        num_layers=int(lc.get("num_hidden_layers", 1)),
        num_heads=heads,
        num_kv_heads=int(lc.get("num_key_value_heads") or heads),
        head_dim=int(lc.get("head_dim") or lc["hidden_size"] // heads),
        intermediate_size=lc["intermediate_size"],
        vocab_size=lc["vocab_size"],
        attention_bias=bool(lc.get("attention_bias", False)),
    )


def decoder_layer_tensors(d: LayerDims, p: str, width: int, o_bias: bool, qk_norm: bool) -> dict[str, Shape]:
    """One draft decoder layer's tensors under prefix `p`; q/k/v read `width` features (EAGLE-3's first
    layer reads [embedding; hidden] = 2H)."""
    H, hd, q, kv = d.hidden_size, d.head_dim, d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
    t: dict[str, Shape] = {
        p + "input_layernorm.weight": (H,),
        p + "post_attention_layernorm.weight": (H,),
        p + "self_attn.q_proj.weight": (q, width),
        p + "self_attn.k_proj.weight": (kv, width),
        p + "self_attn.v_proj.weight": (kv, width),
        p + "self_attn.o_proj.weight": (H, q),
        p + "mlp.gate_proj.weight": (d.intermediate_size, H),
        p + "mlp.up_proj.weight": (d.intermediate_size, H),
        p + "mlp.down_proj.weight": (H, d.intermediate_size),
    }
    if d.attention_bias:
        t |= {
            p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.bias": (kv,),
        }
        if o_bias:
            t[p + "self_attn.o_proj.bias"] = (H,)
    if qk_norm:
        t |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
    return t


def vocab_tensors(req: dict, opt: dict, draft_vocab: int, vocab: int, own_embed: bool) -> dict[str, str]:
    """The vocabulary tensors every algorithm shares; edits `req`/`opt`, returns the forbidden ones. vLLM
    needs d2t exactly when the draft vocabulary is smaller and has no place for it otherwise; it never
    reads t2d, but converters do. `own_embed`: the target's embeddings have another width than the draft's,
    so vLLM cannot share them and the draft must carry its own."""
    opt["t2d"] = (vocab,)
    if own_embed:
        req["embed_tokens.weight"] = opt.pop("embed_tokens.weight")
    if draft_vocab != vocab:
        req["d2t"] = (draft_vocab,)
        return {}
    return {
        "d2t": "the draft vocabulary is the full vocabulary, and vLLM's loader then has no d2t parameter; remove it"
    }


EAGLE3_LAYER_TYPES = ("llama", "qwen3")  # the draft decoders vLLM's EAGLE-3 serves


register_serving("eagle3", method="eagle3")


@register_layout("eagle3")
def eagle3_layout(cfg: SpeculatorConfig, source: str = "config.json") -> Layout:
    """EAGLE-3: fc over the concatenated auxiliary target states -> H; layer 0 attends over
    [input_layernorm(embed(token)), hidden_norm(h)] (2H wide); further layers are plain decoder layers;
    final norm; lm_head over the draft vocabulary; d2t/t2d when the draft vocabulary is pruned."""
    d = layer_dims(cfg, source)
    if d.model_type not in EAGLE3_LAYER_TYPES:
        raise SpecError(
            f"{source}: field 'transformer_layer_config.model_type' is '{d.model_type}'; vLLM's EAGLE-3 serves {', '.join(EAGLE3_LAYER_TYPES)}"
        )
    H = d.hidden_size
    target_h = cfg.target_hidden_size or H
    n_aux = len(cfg.eagle_aux_hidden_state_layer_ids or []) or 3
    draft_vocab = cfg.draft_vocab_size or d.vocab_size
    req: dict[str, Shape] = {
        "fc.weight": (H, n_aux * target_h),
        "norm.weight": (H,),
        "lm_head.weight": (draft_vocab, H),
    }
    opt: dict[str, Shape] = {"embed_tokens.weight": (d.vocab_size, H)}
    for i in range(d.num_layers):
        p = f"layers.{i}."
        (req if i == 0 else opt)[p + "hidden_norm.weight"] = (H,)
        # vLLM's Llama attention gives o_proj the same bias flag as q/k/v; its Qwen3 attention does not.
        req |= decoder_layer_tensors(d, p, 2 * H if i == 0 else H, o_bias=d.model_type == "llama",
                                     qk_norm=d.model_type == "qwen3")  # fmt: skip
    forbidden = vocab_tensors(req, opt, draft_vocab, d.vocab_size, target_h != H)
    if cfg.norm_before_fc:
        req["input_norm.weight"] = (n_aux * target_h,)
    if cfg.fc_norm:
        for i in range(n_aux):
            req[f"fc_norm.{i}.weight"] = (target_h,)
    return Layout(required=req, optional=opt, dtypes={"d2t": "I64", "t2d": "BOOL"}, forbidden=forbidden)


# ---------------------------------------------------------------------------------------------
# Building configs from a verifier.

# Verifier model types whose draft uses Qwen3-style layers (q/k norm); everything else gets Llama layers.
_QWEN3_FAMILY = {"qwen3", "qwen3_moe", "qwen3_next"}
# Keys copied from the verifier's config into the draft's layer config.
_COPIED_KEYS = (
    "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "hidden_act",
    "max_position_embeddings", "rope_theta", "rope_parameters", "rope_scaling", "vocab_size",
    "bos_token_id", "eos_token_id", "attention_bias",
)  # fmt: skip


def draft_layer_config(
    verifier_cfg: dict, num_layers: int = 1, layer_type: str | None = None, **overrides
) -> dict:
    """The draft decoder's transformer_layer_config, derived from the verifier's config.json.

    MoE verifiers get a dense MLP: the verifier's dense `intermediate_size` when it has one, else 3*H.
    """
    layer_type = layer_type or ("qwen3" if verifier_cfg.get("model_type") in _QWEN3_FAMILY else "llama")
    if layer_type not in EAGLE3_LAYER_TYPES:
        raise SpecError(f"draft layer type '{layer_type}' is not one of {', '.join(EAGLE3_LAYER_TYPES)}")
    lc = {k: verifier_cfg[k] for k in _COPIED_KEYS if verifier_cfg.get(k) is not None}
    lc["intermediate_size"] = verifier_cfg.get("intermediate_size") or 3 * verifier_cfg["hidden_size"]
    lc.setdefault("head_dim", verifier_cfg["hidden_size"] // verifier_cfg["num_attention_heads"])
    arch = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[layer_type]
    lc.update(
        model_type=layer_type, architectures=[arch], num_hidden_layers=num_layers, tie_word_embeddings=False
    )
    lc.update(overrides)
    return lc


def build_eagle3_config(
    verifier_cfg: dict,
    verifier: TargetInfo,
    aux_layer_ids: list[int],
    draft_vocab_size: int,
    speculative_tokens: int = 3,
    num_layers: int = 1,
    layer_type: str | None = None,
    norm_before_residual: bool = False,
    provenance: dict | None = None,
    norm_before_fc: bool = False,
    fc_norm: bool = False,
    norm_output: bool = False,
    **layer_overrides,
) -> SpeculatorConfig:
    """A complete EAGLE-3 config for a new draft of `verifier_cfg` (its layer config derived from it)."""
    if speculative_tokens < 1:
        raise SpecError(f"speculative_tokens must be at least 1, got {speculative_tokens}")
    lc = draft_layer_config(verifier_cfg, num_layers, layer_type, **layer_overrides)
    return eagle3_config(
        lc, verifier, aux_layer_ids, draft_vocab_size, speculative_tokens, provenance,
        norm_before_residual=norm_before_residual, norm_before_fc=norm_before_fc, fc_norm=fc_norm,
        norm_output=norm_output,
    )  # fmt: skip


def eagle3_config(
    lc: dict,
    verifier: TargetInfo,
    aux_layer_ids: list[int],
    draft_vocab_size: int,
    speculative_tokens: int,
    provenance: dict | None = None,
    *,
    norm_before_residual: bool = False,
    norm_before_fc: bool = False,
    fc_norm: bool = False,
    norm_output: bool = False,
) -> SpeculatorConfig:
    """The complete EAGLE-3 config around the draft decoder's `lc`, every vLLM flag written explicitly
    (vLLM's defaults differ by path). `aux_layer_ids` are the fc inputs in vLLM's capture-id convention;
    `verifier.name_or_path` is what vLLM will load as the target."""
    return speculator_config(
        "eagle3", lc, verifier, speculative_tokens, draft_vocab_size, provenance, "Eagle3DraftModel",
        eagle_aux_hidden_state_layer_ids=list(aux_layer_ids), norm_before_residual=norm_before_residual,
        norm_before_fc=norm_before_fc, fc_norm=fc_norm, norm_output=norm_output,
    )  # fmt: skip


def speculator_config(
    model_type: str,
    lc: dict,
    verifier: TargetInfo,
    speculative_tokens: int,
    draft_vocab_size: int,
    provenance: dict | None,
    architecture: str,
    **fields,
) -> SpeculatorConfig:
    """What every algorithm's config.json holds around its draft decoder `lc`: the speculators section
    (k, the verifier vLLM loads), the draft vocabulary, target_hidden_size where it differs from the
    draft's, our `spec` metadata; `fields` are the algorithm's own."""
    return SpeculatorConfig(
        speculators_model_type=model_type,
        speculators_config=SpeculatorsSection(
            algorithm=model_type,
            proposal_methods=[ProposalMethod(speculative_tokens=speculative_tokens)],
            verifier=Verifier(name_or_path=verifier.name_or_path, architectures=[verifier.architecture]),
        ),
        transformer_layer_config=lc,
        draft_vocab_size=draft_vocab_size,
        target_hidden_size=verifier.hidden_size if verifier.hidden_size != lc["hidden_size"] else None,
        architectures=[architecture],
        tie_word_embeddings=False,
        spec=SpecMetadata(verifier=verifier, provenance=provenance or {}),
        **fields,
    )


# The target layers `spec datagen --algorithm NAME` captures by default (capture ids, the last layer L
# included for the training targets), by algorithm.
DEFAULT_LAYERS: dict[str, Callable[[int], list[int]]] = {"eagle3": default_eagle3_layers}


def default_layers(algorithm: str, num_hidden_layers: int) -> list[int]:
    fn = DEFAULT_LAYERS.get(algorithm)
    if fn is None:
        raise SpecError(
            f"--algorithm {algorithm}: no default layers known (known: {', '.join(sorted(DEFAULT_LAYERS))})"
        )
    return fn(num_hidden_layers)


# Further algorithms register themselves in their own module (this list: the one edit a new one needs here).
import spec_format.dflash  # noqa: E402
import spec_format.peagle  # noqa: E402, F401
