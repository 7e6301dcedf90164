"""A tiny fake verifier: config.json + the three tensors a draft reads (numpy-written safetensors)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from spec_format.tensors import save_tensors
from spec_format.vocab import build_vocab_mapping

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


def _perturb(model, scale: float, seed: int = 0):
    """Add N(0, scale) to every weight but the (frozen) embeddings: a fresh draft's zeros and ones would
    hide bugs that real weights show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "embed_tokens.weight":
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture
def perturb():
    """perturb(model, scale, seed=0) -> the model, its weights (not embeddings) moved by N(0, scale)."""
    return _perturb


@pytest.fixture
def random_draft(verifier, perturb):
    """random_draft(init, scale, *args, seed=0, **kwargs) -> init(a fresh verifier, *args, vocab_mapping=a
    100-token draft vocabulary, seed=seed, **kwargs), its weights perturbed by N(0, scale), in eval mode."""

    def make(init, scale: float, *args, seed: int = 0, **kwargs):
        m = build_vocab_mapping(np.random.default_rng(seed).integers(0, 20, VOCAB), 100)
        return perturb(init(verifier(), *args, vocab_mapping=m, seed=seed, **kwargs), scale, seed).eval()

    return make


def _same_outputs_and_grads(run, attns=("sdpa", "blockwise"), rtol=1e-9):
    """run(attn) -> (out, grads) for each attention path; the blockwise path must give the dense one's output
    and gradients (float64: to rounding), with a gradient reaching the first input (grads[0])."""
    (dense, g_dense), (block, g_block) = (run(attn) for attn in attns)
    torch.testing.assert_close(block, dense, rtol=rtol * 0.1, atol=rtol * 0.1)
    assert g_block[0].abs().sum() > 0
    for a, b in zip(g_block, g_dense, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol)


@pytest.fixture
def same_outputs_and_grads():
    """same_outputs_and_grads(run): conftest._same_outputs_and_grads."""
    return _same_outputs_and_grads
