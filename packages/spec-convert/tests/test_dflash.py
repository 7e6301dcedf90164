"""DFlash conversions: z-lab's DFlashDraftModel directories and speculators' dflash directories, written the
way those projects write them (z-lab: config.json of the Hugging Face z-lab/*-DFlash-b16 cards, a Qwen3
config plus block_size, num_target_layers and dflash_config; speculators: models/dflash/config.py), into
the spec format and back; broken ones are refused naming the tensor or field, with nothing written.
tests/test_models_vllm_parity.py serves a draft that went through z-lab's layout in vLLM."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from spec_format.checkpoint import read_checkpoint
from spec_format.tensors import load_tensors, save_tensors

H, HEADS, KV, HD, FF, LAYERS = 64, 4, 2, 16, 128, 2  # the fake verifier's sizes (conftest.make_verifier)


def _qwen3(vocab: int) -> dict:
    return {
        "hidden_size": H, "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": HD,
        "intermediate_size": FF, "num_hidden_layers": LAYERS, "vocab_size": vocab, "rms_norm_eps": 1e-6,
        "hidden_act": "silu", "max_position_embeddings": 2048, "rope_theta": 1000000.0,
        "attention_bias": False, "tie_word_embeddings": False,
    }  # fmt: skip


def _tensors(n_aux: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = lambda *s: (rng.standard_normal(s) * 0.02).astype(np.float32)  # noqa: E731
    t = {
        "fc.weight": w(H, n_aux * H),
        "hidden_norm.weight": np.ones(H, np.float32),
        "norm.weight": np.ones(H, np.float32),
    }
    for i in range(LAYERS):
        p = f"layers.{i}."
        t.update({
            p + "input_layernorm.weight": np.ones(H, np.float32), p + "post_attention_layernorm.weight": np.ones(H, np.float32),
            p + "self_attn.q_proj.weight": w(HEADS * HD, H), p + "self_attn.k_proj.weight": w(KV * HD, H),
            p + "self_attn.v_proj.weight": w(KV * HD, H), p + "self_attn.o_proj.weight": w(H, HEADS * HD),
            p + "self_attn.q_norm.weight": np.ones(HD, np.float32), p + "self_attn.k_norm.weight": np.ones(HD, np.float32),
            p + "mlp.gate_proj.weight": w(FF, H), p + "mlp.up_proj.weight": w(FF, H), p + "mlp.down_proj.weight": w(H, FF),
        })  # fmt: skip
    return t


def write_zlab(out: Path, vocab: int, target_layer_ids=(1, 3, 5), block_size=8, mutate=None) -> Path:
    """z-lab's layout: no embeddings or lm_head (the target's are shared), bf16 safetensors."""
    out.mkdir(parents=True)
    cfg = {
        "architectures": ["DFlashDraftModel"], "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
        "model_type": "qwen3", **_qwen3(vocab), "block_size": block_size, "num_target_layers": 8,
        "dflash_config": {"mask_token_id": vocab - 1, "target_layer_ids": list(target_layer_ids)},
        "torch_dtype": "bfloat16", "transformers_version": "4.57.1",
    }  # fmt: skip
    tensors = _tensors(len(target_layer_ids))
    if mutate:
        mutate(cfg, tensors)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    save_tensors(out / "model.safetensors", tensors, float_dtype="bfloat16")
    return out


def write_speculators_dflash(out: Path, vocab: int) -> Path:
    """speculators' layout: its own config schema, a frozen verifier lm_head copy saved alongside."""
    out.mkdir(parents=True)
    cfg = {
        "architectures": ["DFlashSpeculator"], "speculators_model_type": "dflash", "speculators_version": "0.9.0",
        "transformer_layer_config": {"model_type": "qwen3", **_qwen3(vocab)}, "draft_vocab_size": vocab,
        "aux_hidden_state_layer_ids": [2, 4, 6], "mask_token_id": 3, "block_size": 4,
        "sliding_window_non_causal": True, "sample_from_anchor": False,
        "speculators_config": {"algorithm": "dflash", "default_proposal_method": "greedy",
                               "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3}],
                               "verifier": {"name_or_path": "org/verifier", "architectures": ["LlamaForCausalLM"]}},
    }  # fmt: skip
    tensors = _tensors(3, seed=1)
    tensors["verifier_lm_head.weight"] = np.zeros((vocab, H), np.float32)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    save_tensors(out / "model.safetensors", tensors, float_dtype="bfloat16")
    return out


def _convert(spec_cli, *args):
    return subprocess.run([spec_cli, "convert", *map(str, args)], capture_output=True, text=True, timeout=300)


def _convert_into_ours(tmp_path, fake_verifier, spec_cli, write):
    """write(dir, vocab) a source for a fake verifier, `spec convert` it into tmp_path/ours: (vocab, src, result)."""
    v = fake_verifier(tmp_path)
    vocab = json.loads((v / "config.json").read_text())["vocab_size"]
    src = write(tmp_path / "src", vocab)
    res = _convert(spec_cli, src, "--verifier", v, "--out", tmp_path / "ours")
    assert res.returncode == 0, res.stderr
    return vocab, src, res


def test_zlab_dflash_round_trip(tmp_path, fake_verifier, spec_cli):
    vocab, src, res = _convert_into_ours(tmp_path, fake_verifier, spec_cli, write_zlab)
    assert "z-lab's dflash_config" in res.stdout and "vLLM id = x + 1" in res.stdout
    cfg, tensors = read_checkpoint(tmp_path / "ours")
    assert cfg.algorithm == "dflash" and cfg.aux_hidden_state_layer_ids == [2, 4, 6]  # capture ids
    assert cfg.speculative_tokens == 7 and cfg.block_size == 8 and cfg.mask_token_id == vocab - 1
    original = load_tensors(src / "model.safetensors")
    assert set(tensors) == set(original) and all(np.array_equal(tensors[n], original[n]) for n in original)
    res = _convert(spec_cli, tmp_path / "ours", "--to", "zlab", "--out", tmp_path / "back")
    assert res.returncode == 0, res.stderr
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["dflash_config"] == {"mask_token_id": vocab - 1, "target_layer_ids": [1, 3, 5]}
    assert back["block_size"] == 8 and back["architectures"] == ["DFlashDraftModel"]
    again = load_tensors(tmp_path / "back" / "model.safetensors")
    assert all(np.array_equal(again[n], original[n]) for n in original)


def test_speculators_dflash_converts(tmp_path, fake_verifier, spec_cli):
    _, _, res = _convert_into_ours(tmp_path, fake_verifier, spec_cli, write_speculators_dflash)
    cfg, tensors = read_checkpoint(tmp_path / "ours")
    assert (
        cfg.aux_hidden_state_layer_ids == [2, 4, 6] and cfg.speculative_tokens == 3 and cfg.mask_token_id == 3
    )
    assert "verifier_lm_head.weight" not in tensors and "dropped verifier_lm_head.weight" in res.stdout


BROKEN = {
    "missing tensor": (lambda c, t: t.pop("layers.1.mlp.down_proj.weight"), "missing tensor 'layers.1.mlp.down_proj.weight'"),
    "unknown tensor": (lambda c, t: t.update(mask_hidden=np.zeros((1, 3 * H), np.float32)), "'mask_hidden'"),
    "mis-shaped tensor": (lambda c, t: t.update({"fc.weight": np.zeros((H, 2 * H), np.float32)}), "fc.weight"),
    "ids outside the verifier": (lambda c, t: c["dflash_config"].update(target_layer_ids=[1, 3, 40]), "[41] lie outside"),
    "no mask token": (lambda c, t: c["dflash_config"].pop("mask_token_id"), "mask token id"),
    "other target": (lambda c, t: c.update(num_target_layers=36), "num_target_layers is 36"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_dflash_is_refused_naming_the_problem(tmp_path, fake_verifier, spec_cli, case):
    v = fake_verifier(tmp_path)
    vocab = json.loads((v / "config.json").read_text())["vocab_size"]
    mutate, expected = BROKEN[case]
    src = write_zlab(tmp_path / "zlab", vocab, mutate=mutate)
    res = _convert(spec_cli, src, "--verifier", v, "--out", tmp_path / "ours")
    assert res.returncode == 1 and expected in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "ours").exists()


def test_pruned_vocabulary_has_no_zlab_layout(tmp_path, fake_verifier, spec_cli):
    from spec_format.checkpoint import write_checkpoint
    from spec_format.dflash import build_dflash_config
    from spec_format.fingerprint import fingerprint_model_dir, read_model_config
    from spec_format.vocab import build_vocab_mapping

    v = fake_verifier(tmp_path)
    vcfg = read_model_config(v)
    cfg = build_dflash_config(
        vcfg,
        fingerprint_model_dir(v),
        [2, 4, 6],
        128,
        mask_token_id=3,
        speculative_tokens=3,
        num_layers=LAYERS,
    )
    t = _tensors(3)
    mapping = build_vocab_mapping(np.arange(vcfg["vocab_size"]), 128)
    t.update(d2t=mapping.d2t, t2d=mapping.t2d, **{"lm_head.weight": np.zeros((128, H), np.float32)})
    write_checkpoint(tmp_path / "ours", cfg, t)
    res = _convert(spec_cli, tmp_path / "ours", "--to", "zlab", "--out", tmp_path / "z")
    assert res.returncode == 1 and "no d2t" in res.stderr and not (tmp_path / "z").exists(), res.stderr
