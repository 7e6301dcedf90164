"""Export a spec-format EAGLE-3 draft to the SafeAILab/SGLang layout, so a draft trained here also runs in
SGLang, SpecForge and the EAGLE reference code.

Written the way SpecForge's `export --to sglang` writes it (see specforge.py): config.json with LlamaConfig
keys, architectures ["LlamaForCausalLMEagle3"], draft_vocab_size and torch_dtype; model.safetensors
(metadata {"format": "pt"}) with `midlayer.*`, fc, norm, lm_head, d2t and t2d (SGLang's loader requires
both; a full-vocabulary draft gets the identity mapping SpecForge initialises), and embed_tokens only when
the draft has its own.

Layer ids: when they are EAGLE-3's default 2, L//2, L-3 the config names none, which SGLang, the EAGLE
code and vLLM all read as exactly those layers. Other ids go to `eagle_config` in SGLang's convention
(x = vLLM id - 1); the EAGLE reference code has no such field and always uses the default.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from spec_convert.eagle3 import default_layers, source_name
from spec_convert.output import Export, staged_dir
from spec_convert.strict import ConversionError
from spec_format.checkpoint import SpeculatorConfig
from spec_format.tensors import save_tensors, tensor_dtypes

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Decoder-layer keys we set ourselves in the exported config.
_SET_KEYS = ("architectures", "model_type", "num_hidden_layers", "tie_word_embeddings")


def _problems(cfg: SpeculatorConfig) -> list[str]:
    lc = cfg.transformer_layer_config
    problems = []
    if cfg.algorithm != "eagle3":
        problems.append(f"the draft is '{cfg.algorithm}', the SafeAILab/SGLang layout holds EAGLE-3 drafts")
    if lc.get("model_type", "llama") != "llama":
        problems.append(
            f"the draft has {lc.get('model_type')} decoder layers; the SafeAILab/SGLang EAGLE-3 draft is a Llama layer"
        )
    if lc.get("num_hidden_layers", 1) != 1:
        problems.append(
            f"the draft has {lc['num_hidden_layers']} decoder layers; the midlayer layout holds one"
        )
    if lc.get("attention_bias"):
        problems.append("the draft's attention has biases; the SafeAILab/SGLang EAGLE-3 layer has none")
    for flag in ("norm_before_residual", "norm_before_fc", "norm_output"):
        if getattr(cfg, flag):
            problems.append(f"{flag} is true; the SafeAILab/SGLang EAGLE-3 layer has no such option")
    ids = cfg.eagle_aux_hidden_state_layer_ids or []
    if len(ids) != 3:
        problems.append(
            f"the draft takes {len(ids)} verifier layers; the SafeAILab/SGLang fc takes exactly 3"
        )
    return problems


def eagle3_layout(
    cfg: SpeculatorConfig, tensors: dict[str, np.ndarray], float_dtype: str, num_target_layers: int
) -> tuple[dict, dict[str, np.ndarray], list[str]]:
    """(config.json dict, tensors, notes) of the export; ConversionError when the draft does not fit."""
    problems = _problems(cfg)
    if problems:
        raise ConversionError(problems)
    lc = cfg.transformer_layer_config
    notes = []
    config = {k: v for k, v in lc.items() if k not in _SET_KEYS}
    params = lc.get("rope_parameters")
    if isinstance(params, dict):
        # transformers 5 keeps RoPE in rope_parameters; SGLang and the EAGLE code read the legacy keys
        if "rope_theta" not in lc and "rope_theta" in params:
            config["rope_theta"] = params["rope_theta"]
        if params.get("rope_type", "default") != "default" and lc.get("rope_scaling") is None:
            config["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    config.update(
        architectures=["LlamaForCausalLMEagle3"],
        model_type="llama",
        num_hidden_layers=1,
        tie_word_embeddings=False,
        draft_vocab_size=cfg.draft_vocab_size or lc["vocab_size"],
        torch_dtype=float_dtype,
    )
    if cfg.target_hidden_size is not None:
        config["target_hidden_size"] = cfg.target_hidden_size
    if cfg.fc_norm:
        config["fc_norm"] = True
        notes.append(
            "fc_norm is read by SpecForge and SGLang; the EAGLE reference code has no per-layer fc norms"
        )
    ids = list(cfg.eagle_aux_hidden_state_layer_ids or [])
    default = default_layers(num_target_layers)
    if ids != default:
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in ids]}
        notes.append(
            f"layer ids {ids} are not EAGLE-3's default {default}: written to eagle_config as {[i - 1 for i in ids]} "
            "(SGLang's convention); the EAGLE reference code ignores it, and vLLM reading this export directly "
            "would take those numbers as its own ids: serve the spec-format directory in vLLM instead"
        )

    out = {source_name(name): arr for name, arr in tensors.items()}
    V = int(lc["vocab_size"])
    if "d2t" not in out:
        out["d2t"] = np.zeros(V, dtype=np.int64)
        out["t2d"] = np.ones(V, dtype=np.bool_)
        notes.append(
            "the draft predicts the full vocabulary: wrote the identity d2t/t2d SGLang's loader expects"
        )
    elif "t2d" not in out:
        t2d = np.zeros(V, dtype=np.bool_)
        t2d[np.arange(len(out["d2t"])) + out["d2t"]] = True
        out["t2d"] = t2d
        notes.append("wrote t2d derived from d2t (SGLang's loader requires it)")
    return config, out, notes


def write_eagle3(out_dir: Path, config: dict, tensors: dict[str, np.ndarray], float_dtype: str) -> None:
    save_tensors(out_dir / WEIGHTS_NAME, tensors, float_dtype=float_dtype, metadata={"format": "pt"})
    tmp = out_dir / f".{CONFIG_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out_dir / CONFIG_NAME)


def export(
    src_dir: Path, cfg: SpeculatorConfig, tensors: dict, num_target_layers: int, out: Path, force: bool
) -> list[str]:
    """`spec convert --to eagle3`, in the float type the source stores (float32 when it mixes them)."""
    stored = {d for d in tensor_dtypes(src_dir / WEIGHTS_NAME).values() if d in ("F16", "BF16", "F32")}
    float_dtype = (
        {"F16": "float16", "BF16": "bfloat16"}.get(stored.pop(), "float32") if len(stored) == 1 else "float32"
    )
    config, out_tensors, notes = eagle3_layout(cfg, tensors, float_dtype, num_target_layers)
    with staged_dir(out, force) as tmp:
        write_eagle3(tmp, config, out_tensors, float_dtype)
    return notes


EXPORTS = {"eagle3": Export(export, "SafeAILab/SGLang EAGLE-3 layout")}
