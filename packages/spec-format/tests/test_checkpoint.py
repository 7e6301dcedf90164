"""Speculator checkpoints: structs, tensors (bf16 without torch), vocab mapping, strict validation, CLI.

numpy only: these tests also run where torch is not installed.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spec_format.algorithms import build_eagle3_config, layout_for, servable_ks, vllm_speculative_config
from spec_format.checkpoint import read_checkpoint, read_config, reseal_checkpoint, write_checkpoint
from spec_format.dflash import build_dflash_config, default_dflash_layers
from spec_format.errors import SpecError
from spec_format.fingerprint import default_eagle3_layers, fingerprint_model_dir, read_model_config
from spec_format.tensors import (
    bf16_bits_to_float32,
    float32_to_bf16_bits,
    load_tensors,
    save_tensors,
    tensor_dtypes,
)
from spec_format.validate import validate_checkpoint
from spec_format.vocab import build_vocab_mapping, vocab_mapping_problems

VOCAB = 512


def make_verifier(root: Path, model_type="llama", hidden=64, layers=8, vocab=VOCAB) -> Path:
    d = root / f"verifier-{model_type}"
    d.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architectures": ["Qwen3ForCausalLM" if model_type == "qwen3" else "LlamaForCausalLM"],
        "model_type": model_type, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "vocab_size": vocab,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048,
    }  # fmt: skip
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    return d


def make_checkpoint(
    root: Path, name="draft", model_type="llama", num_layers=1, draft_vocab=128, seed=0
) -> Path:
    verifier = make_verifier(root, model_type)
    cfg = build_eagle3_config(
        read_model_config(verifier), fingerprint_model_dir(verifier), default_eagle3_layers(8)[:3], draft_vocab,
        num_layers=num_layers, provenance={"test": True},
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    layout = layout_for(cfg)
    tensors = {
        n: rng.standard_normal(s).astype(np.float32) * 0.05 for n, s in layout.required.items() if n != "d2t"
    }
    mapping = build_vocab_mapping(rng.integers(0, 50, VOCAB), draft_vocab)
    tensors.update(d2t=mapping.d2t, t2d=mapping.t2d)
    return write_checkpoint(root / name, cfg, tensors)


# --- tensors ------------------------------------------------------------------------------------


def test_bf16_rounds_to_nearest_even():
    # 1 + 2^-8 lies halfway between bf16 1.0 and 1 + 2^-7: ties go to the even mantissa (1.0);
    # 1 + 3*2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6 and goes up to the even 1 + 2^-6.
    x = np.array(
        [1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -2.5, 0.0, np.inf, -np.inf, np.nan, 3.4e38], np.float32
    )
    back = bf16_bits_to_float32(float32_to_bf16_bits(x))
    assert back[0] == 1.0 and back[1] == 1 + 2**-6 and back[2] == 1 + 2**-7
    assert back[3] == -2.5 and back[4] == 0.0 and back[5] == np.inf and back[6] == -np.inf
    assert np.isnan(back[7]) and back[8] == np.inf  # above bf16's largest finite value: rounds to inf
    rng = np.random.default_rng(0)
    y = rng.standard_normal(10_000).astype(np.float32) * 1e4
    assert np.all(np.abs(bf16_bits_to_float32(float32_to_bf16_bits(y)) - y) <= np.abs(y) * 2**-8)


def test_tensor_file_roundtrip_all_dtypes(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal(7).astype(np.float16),
        "bf": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "i64": np.arange(-3, 9, dtype=np.int64),
        "i32": np.arange(4, dtype=np.int32),
        "u8": np.arange(6, dtype=np.uint8),
        "mask": np.array([True, False, True]),
        "scalar_vec": np.zeros((0,), np.float32),
    }
    save_tensors(tmp_path / "t.safetensors", tensors, dtypes={"bf": "bfloat16"}, metadata={"format": "pt"})
    assert tensor_dtypes(tmp_path / "t.safetensors")["bf"] == "BF16"
    back = load_tensors(tmp_path / "t.safetensors")
    for name, arr in tensors.items():
        expected = bf16_bits_to_float32(float32_to_bf16_bits(arr)) if name == "bf" else arr
        assert back[name].dtype == expected.dtype and np.array_equal(back[name], expected), name
    raw = load_tensors(tmp_path / "t.safetensors", upcast_bf16=False)["bf"]
    assert raw.dtype == np.uint16 and np.array_equal(raw, float32_to_bf16_bits(tensors["bf"]))


def test_files_read_back_with_the_safetensors_package(tmp_path):
    """Our writer's files are standard safetensors (the package reads non-bf16 tensors with numpy). spec-format
    itself does not depend on it, so a spec-format-only environment skips this."""
    load_file = pytest.importorskip("safetensors.numpy").load_file

    save_tensors(
        tmp_path / "t.safetensors", {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, bool)}
    )
    back = load_file(str(tmp_path / "t.safetensors"))
    assert np.array_equal(back["a"], np.arange(6, dtype=np.float32).reshape(2, 3)) and back["b"].all()


# --- vocab mapping ------------------------------------------------------------------------------


def test_vocab_mapping_keeps_most_frequent_sorted():
    freq = np.array([0, 9, 3, 9, 0, 1, 5, 0])
    m = build_vocab_mapping(freq, 4)
    assert m.target_ids.tolist() == [1, 2, 3, 6]  # counts 9, 3, 9, 5; kept ids in increasing order
    assert m.d2t.tolist() == [1, 1, 1, 3] and m.d2t.dtype == np.int64
    assert m.t2d.tolist() == [False, True, True, True, False, False, True, False]
    assert m.num_unseen == 0 and vocab_mapping_problems(m.d2t, m.t2d, 8) == []


def test_vocab_mapping_fills_unseen_by_id_and_counts_them():
    freq = np.array([0, 0, 4, 0, 2, 0])
    m = build_vocab_mapping(freq, 4)
    assert m.target_ids.tolist() == [0, 1, 2, 4] and m.num_unseen == 2
    full = build_vocab_mapping(freq, 6)
    assert full.target_ids.tolist() == list(range(6)) and not full.d2t.any()
    with pytest.raises(ValueError, match="draft_vocab_size"):
        build_vocab_mapping(freq, 7)


def test_vocab_problems_name_what_is_wrong():
    assert "outside the target vocabulary" in vocab_mapping_problems(np.array([0, 5]), None, 4)[0]
    assert "same target id" in vocab_mapping_problems(np.array([1, 0]), None, 4)[0]
    t2d = np.array([True, False, True, False])
    assert "disagree" in vocab_mapping_problems(np.array([0, 0]), t2d, 4)[0]


# --- checkpoint round trip and validation --------------------------------------------------------


@pytest.mark.parametrize("model_type,num_layers", [("llama", 1), ("llama", 2), ("qwen3", 1), ("qwen3", 3)])
def test_checkpoint_roundtrip_validates(tmp_path, model_type, num_layers):
    ckpt = make_checkpoint(tmp_path, model_type=model_type, num_layers=num_layers)
    report = validate_checkpoint(ckpt, verifier=tmp_path / f"verifier-{model_type}")
    assert report.ok and not report.warnings, report
    cfg, tensors = read_checkpoint(ckpt)
    assert cfg.algorithm == "eagle3" and cfg.speculative_tokens == 3 and cfg.draft_vocab_size == 128
    assert cfg.spec.format_version == 2 and cfg.spec.verifier.hidden_size == 64
    assert cfg.spec.provenance == {"test": True}
    assert cfg.eagle_aux_hidden_state_layer_ids == [2, 4, 5]
    assert tensors["layers.0.self_attn.q_proj.weight"].shape == (
        64,
        128,
    )  # attention input is [embed, hidden]: 2H
    assert tensors["fc.weight"].shape == (64, 3 * 64)
    if num_layers > 1:
        assert tensors[f"layers.{num_layers - 1}.self_attn.q_proj.weight"].shape == (64, 64)
    assert ("layers.0.self_attn.q_norm.weight" in tensors) == (model_type == "qwen3")
    raw = json.loads((ckpt / "config.json").read_text())
    assert raw["norm_before_residual"] is False  # always explicit: vLLM's default differs by path
    # a second write of what was read gives the same bytes (bf16 -> f32 -> bf16 is exact)
    write_checkpoint(tmp_path / "again", cfg, tensors)
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        ckpt / "model.safetensors"
    ).read_bytes()


def test_plain_speculators_checkpoint_is_valid_as_it_is(tmp_path):
    """A config as the speculators project writes it (no `spec` key, its own extra fields) validates."""
    ckpt = make_checkpoint(tmp_path)
    raw = json.loads((ckpt / "config.json").read_text())
    raw.pop("spec")
    raw.pop("spec_sha256")
    raw.update(
        auto_map={"": "config.Eagle3SpeculatorConfig"}, speculators_version="0.8.0.dev0",
        embed_requires_grad=False, transformers_version="4.57.1", has_no_defaults_at_init=False,
    )  # fmt: skip
    raw["speculators_config"]["proposal_methods"][0].update(verifier_accept_k=1, accept_tolerance=0.0)
    (ckpt / "config.json").write_text(json.dumps(raw))
    report = validate_checkpoint(ckpt, verifier=tmp_path / "verifier-llama")
    assert report.ok and report.warnings == [], report


# The edits below stand for a faulty writer: the files are resealed, so what validation finds is the
# edit itself, not the broken checksum (test_corruption_is_found covers that).
def _mutate_config(ckpt: Path, fn) -> None:
    raw = json.loads((ckpt / "config.json").read_text())
    fn(raw)
    (ckpt / "config.json").write_text(json.dumps(raw))
    reseal_checkpoint(ckpt)


def _mutate_tensors(ckpt: Path, fn) -> None:
    tensors = load_tensors(ckpt / "model.safetensors")
    tensors = {k: np.array(v) for k, v in tensors.items()}
    fn(tensors)
    save_tensors(ckpt / "model.safetensors", tensors, float_dtype="bfloat16")
    reseal_checkpoint(ckpt)


BAD_CHECKPOINTS = {
    "config not json": (lambda c: (c / "config.json").write_text("{not json"), "config.json: not valid JSON"),
    "config not an object": (lambda c: (c / "config.json").write_text("[1, 2]"), "expected a JSON object"),
    "missing field": (
        lambda c: _mutate_config(c, lambda r: r.pop("transformer_layer_config")),
        "transformer_layer_config",
    ),
    "mistyped field": (
        lambda c: _mutate_config(
            c, lambda r: r["speculators_config"]["proposal_methods"][0].update(speculative_tokens="3")
        ),
        "speculators_config.proposal_methods[0].speculative_tokens",
    ),
    "zero speculative tokens": (
        lambda c: _mutate_config(
            c, lambda r: r["speculators_config"]["proposal_methods"][0].update(speculative_tokens=0)
        ),
        "must be at least 1",
    ),
    "unknown algorithm": (
        lambda c: _mutate_config(c, lambda r: r.update(speculators_model_type="medusa9")),
        "unknown algorithm 'medusa9'",
    ),
    "missing weights": (lambda c: (c / "model.safetensors").unlink(), "model.safetensors: not found"),
    "truncated weights": (
        lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:-100]),
        "the weights are corrupted",
    ),
    "nan weights": (
        lambda c: _mutate_tensors(c, lambda t: t["norm.weight"].__setitem__(3, np.nan)),
        "'norm.weight' holds 1 NaN/Inf",
    ),
    "inf weights": (
        lambda c: _mutate_tensors(c, lambda t: t["fc.weight"].__setitem__((0, 0), np.inf)),
        "'fc.weight' holds 1 NaN/Inf",
    ),
    "wrong shape": (
        lambda c: _mutate_tensors(c, lambda t: t.update({"fc.weight": np.zeros((64, 128), np.float32)})),
        "tensor 'fc.weight': expected shape [64, 192], found [64, 128]",
    ),
    "missing tensor": (
        lambda c: _mutate_tensors(c, lambda t: t.pop("layers.0.hidden_norm.weight")),
        "missing tensor 'layers.0.hidden_norm.weight'",
    ),
    "unknown tensor": (
        lambda c: _mutate_tensors(c, lambda t: t.update(medusa_head=np.zeros(3, np.float32))),
        "unknown tensor 'medusa_head'",
    ),
    "d2t outside vocab": (
        lambda c: _mutate_tensors(c, lambda t: t["d2t"].__setitem__(-1, 10_000)),
        "outside the target vocabulary",
    ),
    "d2t wrong dtype": (
        lambda c: _mutate_tensors(c, lambda t: t.update(d2t=t["d2t"].astype(np.int32))),
        "'d2t': expected dtype I64",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoints_fail_with_one_clear_line(tmp_path, case):
    ckpt = make_checkpoint(tmp_path)
    mutate, expected = BAD_CHECKPOINTS[case]
    mutate(ckpt)
    report = validate_checkpoint(ckpt)
    assert not report.ok
    assert any(expected in e for e in report.errors), report.errors
    assert all("\n" not in e for e in report.errors)
    # the command: exit 1, the problem on stderr, no traceback
    out = subprocess.run(
        [sys.executable, "-m", "spec_format", "validate", str(ckpt)], capture_output=True, text=True
    )
    assert out.returncode == 1 and expected in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_unknown_config_field_is_a_warning(tmp_path):
    ckpt = make_checkpoint(tmp_path)
    _mutate_config(ckpt, lambda r: r.update(my_new_flag=True))
    report = validate_checkpoint(ckpt)
    assert report.ok and report.warnings == [f"{ckpt / 'config.json'}: unknown field 'my_new_flag' (ignored)"]


def test_verifier_mismatches_are_errors(tmp_path):
    ckpt = make_checkpoint(tmp_path)
    other = make_verifier(tmp_path / "x", hidden=128)
    report = validate_checkpoint(ckpt, verifier=other)
    assert any("does not match the verifier's hidden_size 128" in e for e in report.errors), report.errors
    small = make_verifier(tmp_path / "y", vocab=256)
    report = validate_checkpoint(ckpt, verifier=small)
    assert any("vocab_size' is 512, the verifier's vocab_size is 256" in e for e in report.errors), (
        report.errors
    )
    shallow = make_verifier(tmp_path / "z", layers=4)
    report = validate_checkpoint(ckpt, verifier=shallow)
    assert any("holds 5, outside [0, 4]" in e for e in report.errors), report.errors


def test_changed_verifier_tokenizer_is_a_warning(tmp_path):
    ckpt = make_checkpoint(tmp_path)
    (tmp_path / "verifier-llama" / "tokenizer.json").write_text('{"other": 1}')
    report = validate_checkpoint(ckpt, verifier=tmp_path / "verifier-llama")
    assert report.ok and any("tokenizer_sha256" in w for w in report.warnings), report


def test_inspect_json(tmp_path):
    ckpt = make_checkpoint(tmp_path, num_layers=2)
    out = subprocess.run(
        [sys.executable, "-m", "spec_format", "inspect", "--json", str(ckpt)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["algorithm"] == "eagle3" and info["draft_layers"] == 2 and info["speculative_tokens"] == 3
    assert info["draft_vocab_size"] == 128 and info["target_vocab_size"] == 512 and info["parameters"] > 0


def test_read_config_reports_the_field(tmp_path):
    ckpt = make_checkpoint(tmp_path)
    _mutate_config(ckpt, lambda r: r["speculators_config"].pop("verifier"))
    with pytest.raises(SpecError, match="speculators_config"):
        read_config(ckpt)


def test_full_vocabulary_draft_must_not_carry_d2t(tmp_path):
    ckpt = make_checkpoint(tmp_path, draft_vocab=VOCAB)  # written with an all-zero d2t
    report = validate_checkpoint(ckpt)
    assert any("tensor 'd2t' must be absent" in e for e in report.errors), report.errors
    _mutate_tensors(ckpt, lambda t: t.pop("d2t"))
    assert validate_checkpoint(ckpt).ok


def test_layer_config_keys_left_at_transformers_defaults(tmp_path):
    """Configs saved by transformers 4.x omit keys equal to the defaults; vLLM applies those defaults."""
    ckpt = make_checkpoint(tmp_path)
    _mutate_config(ckpt, lambda r: r["transformer_layer_config"].update(intermediate_size=11008))
    _mutate_tensors(ckpt, lambda t: t.update({
        "layers.0.mlp.gate_proj.weight": np.zeros((11008, 64), np.float32),
        "layers.0.mlp.up_proj.weight": np.zeros((11008, 64), np.float32),
        "layers.0.mlp.down_proj.weight": np.zeros((64, 11008), np.float32),
    }))  # fmt: skip
    _mutate_config(ckpt, lambda r: r["transformer_layer_config"].pop("intermediate_size"))
    report = validate_checkpoint(ckpt)
    assert report.ok, report.errors  # 11008 is LlamaConfig's default


def test_target_hidden_size_other_than_the_drafts_needs_own_embeddings(tmp_path):
    ckpt = make_checkpoint(tmp_path)
    _mutate_config(ckpt, lambda r: r.update(target_hidden_size=96))
    _mutate_tensors(ckpt, lambda t: t.update({"fc.weight": np.zeros((64, 3 * 96), np.float32)}))
    report = validate_checkpoint(ckpt)
    assert any("missing tensor 'embed_tokens.weight'" in e for e in report.errors), report.errors


# --- P-EAGLE ------------------------------------------------------------------------------------


def make_peagle_checkpoint(root: Path, mask_token_id=7) -> Path:
    from spec_format.peagle import build_peagle_config

    verifier = make_verifier(root)
    cfg = build_peagle_config(
        read_model_config(verifier), fingerprint_model_dir(verifier), default_eagle3_layers(8)[:3], VOCAB,
        mask_token_id,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    tensors = {n: rng.standard_normal(s).astype(np.float32) for n, s in layout_for(cfg).required.items()}
    return write_checkpoint(root / "peagle", cfg, tensors)


def test_peagle_checkpoint_validates_and_needs_mask_hidden(tmp_path):
    ckpt = make_peagle_checkpoint(tmp_path)
    raw = json.loads((ckpt / "config.json").read_text())
    assert raw["speculators_model_type"] == "peagle" and raw["mask_token_id"] == 7
    assert validate_checkpoint(ckpt, tmp_path / "verifier-llama").ok
    assert load_tensors(ckpt / "model.safetensors")["mask_hidden"].shape == (1, 3 * 64)
    _mutate_tensors(ckpt, lambda t: t.pop("mask_hidden"))
    errors = validate_checkpoint(ckpt).errors
    assert len(errors) == 1 and "missing tensor 'mask_hidden' (expected shape [1, 192])" in errors[0]


@pytest.mark.parametrize(
    "edit, field",
    [(lambda c: c.pop("mask_token_id"), "mask_token_id"), (lambda c: c.update(mask_token_id=VOCAB), "mask_token_id"),
     (lambda c: c.update(norm_output=True), "norm_output")],
)  # fmt: skip
def test_bad_peagle_configs_name_the_field(tmp_path, edit, field):
    ckpt = make_peagle_checkpoint(tmp_path)
    _mutate_config(ckpt, edit)
    errors = validate_checkpoint(ckpt).errors
    assert len(errors) == 1 and f"field '{field}'" in errors[0]


def test_peagle_serves_as_eagle3_with_parallel_drafting(tmp_path):
    from spec_format.algorithms import vllm_speculative_config

    cfg, _ = read_config(make_peagle_checkpoint(tmp_path))
    assert vllm_speculative_config(cfg, "d", 4) == {
        "method": "eagle3", "parallel_drafting": True, "model": "d", "num_speculative_tokens": 4
    }  # fmt: skip
    assert servable_ks(cfg) is None  # any k


# --- DFlash (spec_format.dflash): the checkpoint as vLLM 0.32 reads it ---------------------------------


def make_dflash(tmp_path, draft_vocab=128, k=3):
    v = make_verifier(tmp_path)
    cfg = build_dflash_config(read_model_config(v), fingerprint_model_dir(v), [2, 4, 6], draft_vocab,
                              mask_token_id=7, speculative_tokens=k, num_layers=2)  # fmt: skip
    rng = np.random.default_rng(0)
    t = {
        n: rng.standard_normal(s).astype(np.float32)
        for n, s in layout_for(cfg).required.items()
        if n != "d2t"
    }
    if draft_vocab != VOCAB:
        m = build_vocab_mapping(rng.integers(0, 10, VOCAB), draft_vocab)
        t.update(d2t=m.d2t, t2d=m.t2d)
    return write_checkpoint(tmp_path / "ckpt", cfg, t), v


def test_dflash_roundtrip_and_serving(tmp_path):
    ckpt, v = make_dflash(tmp_path)
    report = validate_checkpoint(ckpt, verifier=v)
    assert report.ok and not report.warnings, report
    raw = json.loads((ckpt / "config.json").read_text())
    assert raw["speculators_model_type"] == "dflash" and raw["aux_hidden_state_layer_ids"] == [2, 4, 6]
    assert (
        raw["block_size"] == 4 and raw["mask_token_id"] == 7 and "eagle_aux_hidden_state_layer_ids" not in raw
    )
    assert raw["transformer_layer_config"]["model_type"] == "qwen3"
    cfg, tensors = read_checkpoint(ckpt)
    assert tensors["fc.weight"].shape == (64, 3 * 64) and tensors[
        "layers.1.self_attn.q_proj.weight"
    ].shape == (64, 64)
    assert vllm_speculative_config(cfg, str(ckpt)) == {
        "method": "dflash",
        "model": str(ckpt),
        "num_speculative_tokens": 3,
    }
    with pytest.raises(SpecError, match="blocks of 4.*k = 3, not 5"):
        vllm_speculative_config(cfg, str(ckpt), 5)
    assert servable_ks(cfg) == [3]  # what a k sweep (the quick start's) measures
    assert default_dflash_layers(36) == [2, 10, 18, 26, 34, 36]  # z-lab's Qwen3-8B ids [1, 9, 17, 25, 33] + 1


def _config(ckpt, fn):
    _mutate_config(ckpt, fn)


def _tensors(ckpt, fn):
    _mutate_tensors(ckpt, fn)


BROKEN = {
    "missing tensor": (lambda c: _tensors(c, lambda t: t.pop("layers.1.self_attn.k_norm.weight")), "missing tensor 'layers.1.self_attn.k_norm.weight'"),
    "mis-shaped tensor": (lambda c: _tensors(c, lambda t: t.update({"fc.weight": np.zeros((64, 128), np.float32)})), "'fc.weight': expected shape [64, 192]"),
    "unknown tensor": (lambda c: _tensors(c, lambda t: t.update(medusa=np.zeros(3, np.float32))), "unknown tensor 'medusa'"),
    "mask_hidden": (lambda c: _tensors(c, lambda t: t.update(mask_hidden=np.zeros((1, 192), np.float32))), "'mask_hidden' must be absent"),
    "no lm_head with a pruned vocabulary": (lambda c: _tensors(c, lambda t: t.pop("lm_head.weight")), "missing tensor 'lm_head.weight'"),
    "no mask token": (lambda c: _config(c, lambda r: r.pop("mask_token_id")), "field 'mask_token_id'"),
    "mask token outside the vocabulary": (lambda c: _config(c, lambda r: r.update(mask_token_id=VOCAB)), "field 'mask_token_id'"),
    "no layer ids": (lambda c: _config(c, lambda r: r.pop("aux_hidden_state_layer_ids")), "field 'aux_hidden_state_layer_ids' is missing"),
    "EAGLE-3's field": (lambda c: _config(c, lambda r: r.update(eagle_aux_hidden_state_layer_ids=[2, 4, 6])), "'eagle_aux_hidden_state_layer_ids' is EAGLE-3's"),
    "layer id past the verifier": (lambda c: _config(c, lambda r: r.update(aux_hidden_state_layer_ids=[2, 4, 9])), "holds 9, outside [0, 8]"),
    "llama layers": (lambda c: _config(c, lambda r: r["transformer_layer_config"].update(model_type="llama")), "vLLM's DFlash drafts are qwen3 layers"),
    "k other than the block": (lambda c: _config(c, lambda r: r["speculators_config"]["proposal_methods"][0].update(speculative_tokens=5)), "'block_size' is 4"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_dflash_fails_with_one_line(tmp_path, case):
    ckpt, v = make_dflash(tmp_path)
    mutate, expected = BROKEN[case]
    mutate(ckpt)
    report = validate_checkpoint(ckpt, verifier=v)
    assert not report.ok and any(expected in e for e in report.errors), report.errors
    assert all("\n" not in e for e in report.errors)


def test_full_vocabulary_dflash_shares_the_targets_head(tmp_path):
    ckpt, v = make_dflash(tmp_path, draft_vocab=VOCAB)
    _tensors(ckpt, lambda t: t.pop("lm_head.weight", None))  # vLLM then uses the target's lm_head
    assert validate_checkpoint(ckpt, verifier=v).ok
    _tensors(ckpt, lambda t: t.update(d2t=np.zeros(VOCAB, np.int64)))
    assert any("'d2t' must be absent" in e for e in validate_checkpoint(ckpt, verifier=v).errors)


def test_a_flipped_byte_anywhere_in_a_checkpoint_is_found(tmp_path):
    """config.json is sealed and records model.safetensors' sha256: a byte changed anywhere in either file
    (here 40 uniformly placed positions each), or either file cut short, is an error of validation and of
    reading; the edit `write_speculative_tokens` makes is resealed and stays valid."""
    from spec_format.checkpoint import write_speculative_tokens

    ckpt = make_checkpoint(tmp_path)
    assert validate_checkpoint(ckpt).ok
    rng = np.random.default_rng(0)
    for name in ("config.json", "model.safetensors"):
        good = (ckpt / name).read_bytes()
        for pos in rng.integers(0, len(good), 40):
            bad = bytearray(good)
            bad[pos] ^= 1 << int(rng.integers(0, 8))
            (ckpt / name).write_bytes(bytes(bad))
            errors = validate_checkpoint(ckpt).errors
            assert errors and all("\n" not in e for e in errors), (name, pos)
            with pytest.raises(SpecError):
                read_checkpoint(ckpt)
        (ckpt / name).write_bytes(good[: len(good) // 2])
        assert not validate_checkpoint(ckpt).ok
        (ckpt / name).write_bytes(good)
    assert write_speculative_tokens(ckpt, 5) == 3
    assert validate_checkpoint(ckpt).ok and read_config(ckpt)[0].speculative_tokens == 5


def test_a_deliberate_edit_is_refused_until_resealed(tmp_path):
    """A hand edit of config.json breaks its seal: `spec validate` says so and names the way out; `spec
    validate --reseal` records the file as it is now, and it is valid again (unless the edit broke it)."""
    ckpt = make_checkpoint(tmp_path)
    raw = json.loads((ckpt / "config.json").read_text())
    raw["speculators_config"]["proposal_methods"][0]["speculative_tokens"] = 2
    (ckpt / "config.json").write_text(json.dumps(raw, indent=2))

    def validate(*extra):
        return subprocess.run([sys.executable, "-m", "spec_format", "validate", *extra, str(ckpt)],
                              capture_output=True, text=True)  # fmt: skip

    out = validate()
    assert out.returncode == 1 and f"run: spec validate --reseal {ckpt}" in out.stderr, out.stderr
    assert validate("--reseal").returncode == 0
    assert read_config(ckpt)[0].speculative_tokens == 2 and validate().returncode == 0
    (ckpt / "config.json").write_text("{broken")
    out = validate("--reseal")
    assert out.returncode == 1 and "cannot reseal" in out.stderr and "Traceback" not in out.stderr, out.stderr
