"""Drafts in other projects' layouts, written the way each project writes them, with tiny random weights.

Each writer names the files it learned the layout from. The weights are random (norm weights 1, the rest
small), the vocabulary mapping is a real d2t/t2d pair; what matters is names, config keys, dtypes, file
types and conventions, byte for byte where it counts.

Safetensors files are written with spec-format's numpy writer (bf16 included): the conversions under test
must not need torch for them. `.bin` files are written with torch.save of a plain state dict, as DeepSpeed's
save_16bit_model does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from spec_format.tensors import save_tensors

FAKE_VOCAB = 512


def make_verifier(root: Path, hidden=64, layers=8, vocab=FAKE_VOCAB, name="verifier") -> Path:
    """A verifier directory with config.json and a tokenizer file: enough for conversions (not for vLLM)."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": hidden // 4,
        "intermediate_size": 128, "vocab_size": vocab, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "max_position_embeddings": 2048, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "attention_bias": False, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    (d / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    return d


def _verifier(verifier_dir: Path) -> dict:
    return json.loads((Path(verifier_dir) / "config.json").read_text())


def _random(v: dict, draft_vocab: int, seed: int, **options) -> dict[str, np.ndarray]:
    """Random weights and a sorted d2t/t2d pair, in the format's names."""
    d2t, t2d = vocab_mapping(v["vocab_size"], draft_vocab, seed)
    return draft_weights(v, draft_vocab, seed=seed, **options) | {"d2t": d2t, "t2d": t2d}


def draft_weights(
    v: dict, draft_vocab: int, *, num_layers=1, seed=0, fc_norm=False, n_aux=3, scale=0.05
) -> dict[str, np.ndarray]:
    """float32 EAGLE-3 weights in the format's names for a draft with the verifier's dimensions."""
    rng = np.random.default_rng(seed)
    H, heads, kv = v["hidden_size"], v["num_attention_heads"], v["num_key_value_heads"]
    hd, inter = v.get("head_dim") or H // heads, v["intermediate_size"]

    def w(*shape):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    t = {
        "fc.weight": w(H, n_aux * H),
        "norm.weight": np.ones(H, np.float32),
        "lm_head.weight": w(draft_vocab, H),
    }
    for i in range(num_layers):
        p, width = f"layers.{i}.", 2 * H if i == 0 else H
        t |= {
            p + "input_layernorm.weight": np.ones(H, np.float32),
            p + "post_attention_layernorm.weight": np.ones(H, np.float32),
            p + "self_attn.q_proj.weight": w(heads * hd, width),
            p + "self_attn.k_proj.weight": w(kv * hd, width),
            p + "self_attn.v_proj.weight": w(kv * hd, width),
            p + "self_attn.o_proj.weight": w(H, heads * hd),
            p + "mlp.gate_proj.weight": w(inter, H),
            p + "mlp.up_proj.weight": w(inter, H),
            p + "mlp.down_proj.weight": w(H, inter),
        }
        if i == 0:
            t[p + "hidden_norm.weight"] = np.ones(H, np.float32)
    if fc_norm:
        t |= {f"fc_norm.{i}.weight": np.ones(H, np.float32) for i in range(n_aux)}
    return t


def vocab_mapping(V: int, draft_vocab: int, seed=0, frequency_order=False) -> tuple[np.ndarray, np.ndarray]:
    """(d2t offsets, t2d) over `draft_vocab` kept ids; ids sorted (EAGLE, SpecForge, speculators) or in
    frequency order (ModelOpt's calibrate_frequent_vocab)."""
    rng = np.random.default_rng(seed + 1)
    kept = np.sort(rng.choice(V, size=draft_vocab, replace=False))
    if frequency_order:
        kept = rng.permutation(kept)
    d2t = kept.astype(np.int64) - np.arange(draft_vocab, dtype=np.int64)
    t2d = np.zeros(V, dtype=np.bool_)
    t2d[kept] = True
    return d2t, t2d


def _midlayer(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        ("midlayer." + k.removeprefix("layers.0.") if k.startswith("layers.0.") else k): a
        for k, a in t.items()
    }


def write_safailab(
    out: Path, verifier_dir: Path, *, draft_vocab=128, seed=0, rope_buffers=True, weights=None
) -> Path:
    """SafeAILab EAGLE-3, learned from SafeAILab/EAGLE@cb7e084: eagle/traineagle3/config.json (the keys of a
    hand-written draft config), cnets.py (module names, d2t = used - arange, t2d bool) and main.py
    (DeepSpeed save_16bit_model(exclude_frozen_parameters=True) -> pytorch_model.bin in fp16 with the
    persistent buffers, here the target model's RoPE inv_freq of modeling_llama_kv.LlamaRotaryEmbedding).
    `weights` (the format's names, with d2t/t2d) replaces the random ones; so in the writers below."""
    import torch

    v = _verifier(verifier_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architectures": ["LlamaForCausalLM"], "bos_token_id": v["bos_token_id"], "eos_token_id": v["eos_token_id"],
        "hidden_act": "silu", "hidden_size": v["hidden_size"], "initializer_range": 0.02,
        "intermediate_size": v["intermediate_size"], "max_position_embeddings": 2048, "model_type": "llama",
        "num_attention_heads": v["num_attention_heads"], "num_key_value_heads": v["num_key_value_heads"],
        "num_hidden_layers": 1, "pad_token_id": 0, "rms_norm_eps": 1e-05, "tie_word_embeddings": False,
        "torch_dtype": "float16", "transformers_version": "4.28.1", "use_cache": True,
        "vocab_size": v["vocab_size"], "draft_vocab_size": draft_vocab,
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    t = _midlayer(weights or _random(v, draft_vocab, seed))
    state = {
        k: torch.from_numpy(a).to(torch.float16) if a.dtype.kind == "f" else torch.from_numpy(a)
        for k, a in t.items()
    }
    if rope_buffers:
        hd = v["hidden_size"] // v["num_attention_heads"]
        inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        for i in range(v["num_hidden_layers"]):
            state[f"target_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.half()
    torch.save(state, out / "pytorch_model.bin")
    return out


def write_specforge(
    out: Path,
    verifier_dir: Path,
    *,
    draft_vocab=128,
    seed=0,
    fc_norm=False,
    capture_layers: list[int] | None = None,
    embed=False,
    weights=None,
) -> Path:
    """SpecForge's `export --to sglang` (or --to hf with embed=True), learned from sgl-project/SpecForge@
    a6b6b023: specforge/export/to_sglang.py (save_pretrained, embed dropped), modeling/draft/llama3_eagle.py
    (midlayer, fc_norm, t2d/d2t buffers), configs/*-eagle3*.json (eagle_config, fc_norm, norm_output).
    transformers 4.x save_pretrained writes only keys that differ from LlamaConfig's defaults, plus
    architectures/model_type/torch_dtype/transformers_version, and metadata {"format": "pt"}."""
    v = _verifier(verifier_dir)
    out.mkdir(parents=True, exist_ok=True)
    theta = (v.get("rope_parameters") or {}).get("rope_theta", v.get("rope_theta", 10000.0))
    cfg = {
        "architectures": ["LlamaForCausalLMEagle3"], "bos_token_id": v["bos_token_id"], "eos_token_id": v["eos_token_id"],
        "head_dim": v["head_dim"], "hidden_size": v["hidden_size"], "intermediate_size": v["intermediate_size"],
        "model_type": "llama", "num_attention_heads": v["num_attention_heads"], "num_hidden_layers": 1,
        "num_key_value_heads": v["num_key_value_heads"], "torch_dtype": "bfloat16",
        "transformers_version": "4.53.2", "vocab_size": v["vocab_size"], "draft_vocab_size": draft_vocab,
    }  # fmt: skip
    if v["max_position_embeddings"] != 2048:
        cfg["max_position_embeddings"] = v["max_position_embeddings"]
    if theta != 10000.0:
        cfg["rope_theta"] = theta
    if capture_layers is not None:
        cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": capture_layers}
    if fc_norm:
        cfg |= {"fc_norm": True, "norm_output": True}
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    t = _midlayer(weights or _random(v, draft_vocab, seed, fc_norm=fc_norm))
    if embed:
        rng = np.random.default_rng(seed + 2)
        t["embed_tokens.weight"] = (rng.standard_normal((v["vocab_size"], v["hidden_size"])) * 0.05).astype(
            np.float32
        )
    save_tensors(out / "model.safetensors", t, float_dtype="bfloat16", metadata={"format": "pt"})
    return out


def write_modelopt(out: Path, verifier_dir: Path, *, draft_vocab=128, seed=0, num_layers=2) -> Path:
    """ModelOpt's export_hf_checkpoint.py, learned from NVIDIA/Model-Optimizer@a2fbac7:
    modelopt/torch/export/plugins/hf_spec_export.py (EagleExporter: eagle_module.* without prefix,
    safetensors.torch.save_file, no metadata), hf_spec_configs.py (llama_eagle_template_config, null where
    unknown), speculative/plugins/hf_eagle.py (layer ids = outputs of layers x, default
    sorted({1, L//2-1, L-4})), speculative/utils.py (d2t offsets in frequency order, no t2d)."""
    v = _verifier(verifier_dir)
    out.mkdir(parents=True, exist_ok=True)
    L = v["num_hidden_layers"]
    cfg = {
        "architectures": ["LlamaForCausalLMEagle3"], "bos_token_id": v["bos_token_id"], "eos_token_id": v["eos_token_id"],
        "hidden_act": "silu", "hidden_size": v["hidden_size"], "initializer_range": 0.02,
        "intermediate_size": v["intermediate_size"], "max_position_embeddings": v["max_position_embeddings"],
        "model_type": "llama", "num_attention_heads": v["num_attention_heads"],
        "num_key_value_heads": v["num_key_value_heads"], "num_hidden_layers": num_layers, "pad_token_id": None,
        "rms_norm_eps": v["rms_norm_eps"], "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.56.0", "use_cache": True, "vocab_size": v["vocab_size"],
        "draft_vocab_size": draft_vocab, "rope_scaling": {"rope_type": "default", "rope_theta": 10000},
        "attention_bias": False, "attention_dropout": 0.0, "head_dim": v["head_dim"], "mlp_bias": False,
        "pretraining_tp": None, "rope_theta": 10000,
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": sorted({1, max(0, L // 2 - 1), max(0, L - 4)}),
            "use_aux_hidden_state": True, "use_input_layernorm_in_first_layer": True, "use_last_layernorm": True,
            "use_mtp_layernorm": False, "next_layer_regular": True, "parallel_draft_step": 1,
            "parallel_draft_heads_num_layers": 1,
        },
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(cfg, indent=4))
    t = draft_weights(v, draft_vocab, seed=seed, num_layers=num_layers)
    d2t, _ = vocab_mapping(v["vocab_size"], draft_vocab, seed, frequency_order=True)
    t["d2t"] = d2t
    save_tensors(out / "model.safetensors", t, float_dtype="bfloat16")
    return out


def write_speculators_old(
    out: Path, verifier_dir: Path, *, draft_vocab=128, seed=0, verifier_name="meta-llama/Llama-3.1-8B-Instruct",
    verifier_copies=False, qwen3_without_model_type=False,
) -> Path:  # fmt: skip
    """A speculators EAGLE-3 directory from before 2025-10, learned from vllm-project/speculators history
    (5d4ff90b src/speculators/models/eagle3.py: config fields and module names; 8af566f5 added
    eagle_aux_hidden_state_layer_ids): pydantic dump of Eagle3SpeculatorConfig, transformer_layer_config
    as LlamaConfig.to_diff_dict() (transformers 4.x: default-valued keys missing), bf16 weights with
    embed_tokens, d2t, t2d. verifier_copies adds the verifier_lm_head/verifier_norm that later trainers keep
    out with _keys_to_ignore_on_save. qwen3_without_model_type: a Qwen3-layer draft whose diff dict lost
    model_type (speculators after #620 default to Qwen3Config)."""
    v = _verifier(verifier_dir)
    out.mkdir(parents=True, exist_ok=True)
    lc = {
        "hidden_size": v["hidden_size"], "intermediate_size": v["intermediate_size"],
        "num_attention_heads": v["num_attention_heads"], "num_key_value_heads": v["num_key_value_heads"],
        "num_hidden_layers": 1, "vocab_size": v["vocab_size"], "head_dim": v["head_dim"],
        "bos_token_id": v["bos_token_id"], "eos_token_id": v["eos_token_id"], "torch_dtype": "bfloat16",
        "transformers_version": "4.53.2", "model_type": "llama",
    }  # fmt: skip
    cfg = {
        "architectures": ["Eagle3Speculator"], "auto_map": {"": "eagle3.Eagle3SpeculatorConfig"},
        "draft_vocab_size": draft_vocab, "has_no_defaults_at_init": False, "norm_before_residual": False,
        "speculators_config": {
            "algorithm": "eagle3", "default_proposal_method": "greedy",
            "proposal_methods": [{"accept_tolerance": 0.0, "proposal_type": "greedy", "speculative_tokens": 3, "verifier_accept_k": 1}],
            "verifier": {"architectures": ["LlamaForCausalLM"], "name_or_path": verifier_name},
        },
        "speculators_model_type": "eagle3", "speculators_version": "0.1.0.dev14", "target_hidden_size": None,
        "torch_dtype": "bfloat16", "transformer_layer_config": lc, "transformers_version": "4.53.2",
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    t = draft_weights(v, draft_vocab, seed=seed)
    d2t, t2d = vocab_mapping(v["vocab_size"], draft_vocab, seed)
    rng = np.random.default_rng(seed + 3)
    t |= {
        "d2t": d2t,
        "t2d": t2d,
        "embed_tokens.weight": rng.standard_normal((v["vocab_size"], v["hidden_size"])).astype(np.float32)
        * 0.05,
    }
    if qwen3_without_model_type:
        del lc["model_type"]
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        hd = v["head_dim"]
        t |= {
            "layers.0.self_attn.q_norm.weight": np.ones(hd, np.float32),
            "layers.0.self_attn.k_norm.weight": np.ones(hd, np.float32),
        }
    if verifier_copies:
        t |= {"verifier_lm_head.weight": np.zeros((v["vocab_size"], v["hidden_size"]), np.float32),
              "verifier_norm.weight": np.ones(v["hidden_size"], np.float32)}  # fmt: skip
    save_tensors(out / "model.safetensors", t, float_dtype="bfloat16", metadata={"format": "pt"})
    return out


def write_speculators_peagle(
    out: Path, verifier_dir: Path, *, draft_vocab=128, seed=0, mask_token_id=0, verifier_name="org/target"
) -> Path:
    """A speculators P-EAGLE directory as src/speculators/models/peagle/ saves it: PEagleSpeculatorConfig
    (Eagle3SpeculatorConfig's fields, speculators_model_type "peagle", architectures ["PEagleSpeculator"],
    mask_token_id, embed_requires_grad true, the COD settings para_depths / down_sample_ratio /
    down_sample_ratio_min), EAGLE-3's tensors with trained embed_tokens, d2t, t2d, the verifier_lm_head
    copy, and mask_hidden [1, 1, 3H] (torch.randn(1, 1, 3 * hidden_size))."""
    v = _verifier(verifier_dir)
    out.mkdir(parents=True, exist_ok=True)
    lc = {
        "hidden_size": v["hidden_size"], "intermediate_size": v["intermediate_size"],
        "num_attention_heads": v["num_attention_heads"], "num_key_value_heads": v["num_key_value_heads"],
        "num_hidden_layers": 1, "vocab_size": v["vocab_size"], "head_dim": v["head_dim"], "model_type": "llama",
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "rope_theta": 10000.0,
        "max_position_embeddings": v.get("max_position_embeddings", 2048),
    }  # fmt: skip
    cfg = {
        "architectures": ["PEagleSpeculator"], "draft_vocab_size": draft_vocab, "norm_before_residual": False,
        "mask_token_id": mask_token_id, "embed_requires_grad": True, "para_depths": 8,
        "down_sample_ratio": 0.7, "down_sample_ratio_min": 0.2,
        "eagle_aux_hidden_state_layer_ids": sorted({2, v["num_hidden_layers"] // 2, v["num_hidden_layers"] - 3}),
        "speculators_config": {
            "algorithm": "peagle", "default_proposal_method": "greedy",
            "proposal_methods": [{"accept_tolerance": 0.0, "proposal_type": "greedy", "speculative_tokens": 4, "verifier_accept_k": 1}],
            "verifier": {"architectures": ["LlamaForCausalLM"], "name_or_path": verifier_name},
        },
        "speculators_model_type": "peagle", "speculators_version": "0.4.0", "target_hidden_size": None,
        "torch_dtype": "bfloat16", "transformer_layer_config": lc,
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    t = draft_weights(v, draft_vocab, seed=seed)
    d2t, t2d = vocab_mapping(v["vocab_size"], draft_vocab, seed)
    rng = np.random.default_rng(seed + 5)
    H = v["hidden_size"]
    t |= {"d2t": d2t, "t2d": t2d,
          "embed_tokens.weight": rng.standard_normal((v["vocab_size"], H)).astype(np.float32) * 0.05,
          "mask_hidden": rng.standard_normal((1, 1, 3 * H)).astype(np.float32),
          "verifier_lm_head.weight": np.zeros((v["vocab_size"], H), np.float32)}  # fmt: skip
    save_tensors(out / "model.safetensors", t, float_dtype="bfloat16", metadata={"format": "pt"})
    return out


WRITERS = {
    "eagle3": write_safailab,
    "specforge": write_specforge,
    "modelopt": write_modelopt,
    "speculators": write_speculators_old,
    "speculators-peagle": write_speculators_peagle,
}


@pytest.fixture
def verifier(tmp_path) -> Path:
    return make_verifier(tmp_path)


@pytest.fixture(scope="session")
def source_writers():
    """{format: writer(out, verifier_dir, **options)} for every supported source layout."""
    return WRITERS


@pytest.fixture(scope="session")
def fake_verifier():
    """fake_verifier(root, **dims) -> a verifier directory with config.json only."""
    return make_verifier


@pytest.fixture(scope="session")
def random_draft_tensors():
    """random_draft_tensors(verifier_config, draft_vocab, **options) -> float32 EAGLE-3 weights in the
    format's names (no d2t/t2d), for tests that craft some of them."""
    return draft_weights


def assert_same_tensors(src: Path, out: Path, dropped: tuple[str, ...] = ()) -> None:
    """out/model.safetensors holds every tensor of src/model.safetensors but `dropped`, under its name and
    bit for bit (a shape may lose leading 1s: speculators' mask_hidden [1, 1, D] is written [1, D])."""
    from spec_format.tensors import load_tensors

    want = load_tensors(src / "model.safetensors", upcast_bf16=False)
    got = load_tensors(out / "model.safetensors", upcast_bf16=False)
    assert sorted(want.keys() - got.keys()) == sorted(dropped)
    for k in want.keys() - set(dropped):
        a, b = got[k], want[k]
        assert a.dtype == b.dtype and a.squeeze().shape == b.squeeze().shape, (
            k,
            a.dtype,
            a.shape,
            b.dtype,
            b.shape,
        )
        np.testing.assert_array_equal(a.reshape(b.shape), b, err_msg=k)


@pytest.fixture(scope="session")
def same_tensors():
    """assert_same_tensors(src_dir, converted_dir, dropped=()): the conversion kept every weight."""
    return assert_same_tensors
