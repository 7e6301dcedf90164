"""The draft's decoder-layer config (`transformer_layer_config`) from a source config, with the keys the
source omitted written out as the values its code reads."""

from __future__ import annotations

from typing import Any

from spec_convert.target import Target

# transformers 4.x LlamaConfig defaults (SafeAILab's EConfig has the same ones; its RoPE base is 10000 when
# the config names none). Configs saved with `save_pretrained` (SpecForge, speculators) omit keys equal to
# these, so a converter must read a missing key as its default, not as "unknown".
LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
    "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "attention_bias": False,
}  # fmt: skip
# transformers Qwen3Config defaults (speculators' default draft layer type since June 2026).
QWEN3_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_attention_heads": 32,
    "num_key_value_heads": 32, "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "attention_bias": False,
}  # fmt: skip
LAYER_DEFAULTS = {"llama": LLAMA_DEFAULTS, "qwen3": QWEN3_DEFAULTS}
_ARCH = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Keys of a source config.json that describe the file, not the draft's decoder layer.
FILE_KEYS = {"architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path", "auto_map"}


def _rope_mirrors(lc: dict) -> list[str]:
    """Drop what only repeats the RoPE base: a top-level rope_theta / rope_scaling mirroring
    `rope_parameters` (transformers 5 keeps RoPE there; SpecForge's exporter and ours mirror it to the
    legacy keys for older readers), and a rope_scaling of type "default" (ModelOpt writes
    {"rope_type": "default", "rope_theta": t}: no scaling, only the base)."""
    dropped = []
    scaling = lc.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "default":
        theta = scaling.get("rope_theta", lc.get("rope_theta"))
        if set(scaling) <= {"rope_type", "type", "rope_theta"} and lc.get("rope_theta", theta) == theta:
            if theta is not None:
                lc["rope_theta"] = theta
            del lc["rope_scaling"]
            dropped.append("rope_scaling")
    params = lc.get("rope_parameters")
    if isinstance(params, dict):
        if "rope_theta" in lc and lc["rope_theta"] == params.get("rope_theta"):
            del lc["rope_theta"]
            dropped.append("rope_theta")
        if lc.get("rope_scaling") is not None and lc["rope_scaling"] == {
            k: v for k, v in params.items() if k != "rope_theta"
        }:
            del lc["rope_scaling"]
            dropped.append("rope_scaling")
    return dropped


def layer_config(
    source_cfg: dict,
    *,
    skip: set[str],
    num_layers: int,
    target: Target,
    layer_type: str = "llama",
) -> tuple[dict, list[str]]:
    """(transformer_layer_config, notes) from a source config: its decoder keys, minus `skip` and file keys,
    with the source's defaults written out for the keys that shape the computation."""
    lc = {k: v for k, v in source_cfg.items() if k not in skip | FILE_KEYS and v is not None}
    notes = [f"config.json: '{k}' only repeats the RoPE base (dropped)" for k in _rope_mirrors(lc)]
    defaults = LAYER_DEFAULTS[layer_type]
    filled = []
    for key, value in defaults.items():
        if key == "rope_theta" and "rope_parameters" in lc:
            continue
        if key not in lc:
            lc[key] = value
            filled.append(f"{key}={value}")
    lc.setdefault("num_key_value_heads", lc["num_attention_heads"])
    lc.setdefault("head_dim", lc["hidden_size"] // lc["num_attention_heads"])
    if filled:
        notes.append(
            f"config.json omits {', '.join(filled)}: the {layer_type} config defaults the source code reads"
        )
    # Plain RoPE does not depend on max_position_embeddings; a smaller value only caps what vLLM may run.
    kinds = {
        (lc.get(key) or {}).get("rope_type") or (lc.get(key) or {}).get("type")
        for key in ("rope_scaling", "rope_parameters")
    }
    scaled = bool(kinds - {None, "default"})
    target_max = target.config.get("max_position_embeddings")
    if not scaled and isinstance(target_max, int) and lc["max_position_embeddings"] < target_max:
        notes.append(
            f"max_position_embeddings raised from {lc['max_position_embeddings']} to the verifier's {target_max} "
            "(plain RoPE: the draft computes the same, and vLLM can draft at every position the verifier serves)"
        )
        lc["max_position_embeddings"] = target_max
    lc.update(
        model_type=layer_type,
        architectures=[_ARCH[layer_type]],
        num_hidden_layers=num_layers,
        tie_word_embeddings=False,
    )
    return lc, notes


def midlayer_config(cfg: dict, skip: set[str], target: Target) -> tuple[dict, list[str], list[str]]:
    """(layer config, notes, problems) of a draft with one decoder layer (`midlayer`, SafeAILab's and
    SpecForge's layout), whatever num_hidden_layers its config.json states."""
    lc, notes = layer_config(cfg, skip=skip, num_layers=1, target=target)
    if cfg.get("num_hidden_layers", 1) != 1:
        notes.append(
            f"config.json: num_hidden_layers {cfg['num_hidden_layers']} ignored; the draft has one midlayer"
        )
    return lc, notes, check_dims(lc, cfg, target)


def check_dims(lc: dict, source_cfg: dict, target: Target, where: str = "config.json") -> list[str]:
    """The draft belongs to this verifier: same vocabulary (embeddings, t2d and d2t index into it) and, when
    the source states it, the verifier hidden size fc was trained on."""
    problems = []
    if lc.get("vocab_size") != target.info.vocab_size:
        problems.append(
            f"{where}: vocab_size is {lc.get('vocab_size')}, the verifier's is {target.info.vocab_size} "
            f"({target.dir}/config.json): this draft was made for another vocabulary"
        )
    stated = source_cfg.get("target_hidden_size")
    if stated is not None and stated != target.info.hidden_size:
        problems.append(
            f"{where}: target_hidden_size is {stated}, the verifier's hidden_size is {target.info.hidden_size}: "
            "this draft was made for another verifier"
        )
    return problems
