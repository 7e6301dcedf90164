"""A tiny fake verifier: config.json + the three tensors a draft reads (numpy-written safetensors)."""

import json
from pathlib import Path

import numpy as np
import pytest

from spec_format.tensors import save_tensors

VOCAB, HIDDEN = 256, 64


def write_verifier(
    d: Path, model_type="llama", tied=False, sharded=False, vocab=VOCAB, hidden=HIDDEN
) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architectures": ["Qwen3ForCausalLM" if model_type == "qwen3" else "LlamaForCausalLM"],
        "model_type": model_type, "hidden_size": hidden, "num_hidden_layers": 8, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "vocab_size": vocab,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 512, "tie_word_embeddings": tied,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    }  # fmt: skip
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    rng = np.random.default_rng(0)
    tensors = {
        "model.embed_tokens.weight": rng.standard_normal((vocab, hidden)).astype(np.float32),
        "model.norm.weight": (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((128, hidden)).astype(np.float32),
    }
    if not tied:
        tensors["lm_head.weight"] = rng.standard_normal((vocab, hidden)).astype(np.float32)
    if sharded:  # one tensor per shard, bf16, with an index
        weight_map = {}
        for i, (name, arr) in enumerate(sorted(tensors.items())):
            file = f"model-{i:05d}.safetensors"
            save_tensors(d / file, {name: arr}, float_dtype="bfloat16")
            weight_map[name] = file
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        save_tensors(d / "model.safetensors", tensors)
    return d


@pytest.fixture
def verifier(tmp_path):
    """verifier(model_type="llama", tied=False, sharded=False) -> a tiny verifier directory."""
    count = [0]

    def make(**kwargs):
        count[0] += 1
        return write_verifier(tmp_path / f"verifier-{count[0]}", **kwargs)

    return make
