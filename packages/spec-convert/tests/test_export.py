"""spec convert --to eagle3: a spec-format draft exported to the SafeAILab/SGLang layout, and back.

The round trip (ours -> eagle3 layout -> ours) gives byte-identical weights and an equal config apart
from provenance. The vLLM side of the round trip (same acceptance) is in test_vllm.py."""

import json
import subprocess

import numpy as np
import pytest

from spec_format.checkpoint import reseal_checkpoint
from spec_format.tensors import load_tensors, read_header, save_tensors

K = 4


def run(spec_cli, *args) -> subprocess.CompletedProcess:
    return subprocess.run([spec_cli, "convert", *map(str, args)], capture_output=True, text=True, timeout=300)


def config_without_provenance(path) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    del cfg["spec"]["provenance"], cfg["spec_sha256"]  # the seal covers the provenance too
    return cfg


def _drop_mapping(ckpt):
    """A full-vocabulary draft carries no d2t/t2d (vLLM loads none then)."""
    t = {
        k: np.array(v) for k, v in load_tensors(ckpt / "model.safetensors").items() if k not in ("d2t", "t2d")
    }
    save_tensors(ckpt / "model.safetensors", t, float_dtype="bfloat16")
    reseal_checkpoint(ckpt)  # an edit on purpose: sealed again


def _set_layers(ckpt, ids):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["eagle_aux_hidden_state_layer_ids"] = ids
    (ckpt / "config.json").write_text(json.dumps(cfg))
    reseal_checkpoint(ckpt)


VARIANTS = {
    "pruned vocabulary": (128, None),
    "full vocabulary": (512, _drop_mapping),
    "non-default layers": (128, lambda c: _set_layers(c, [1, 3, 7])),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_through_the_eagle3_layout_is_bit_identical(
    tmp_path, verifier, random_eagle3, spec_cli, variant
):
    draft_vocab, tweak = VARIANTS[variant]
    ours = random_eagle3(tmp_path / "ours", verifier, draft_vocab=draft_vocab, k=K)
    if tweak:
        tweak(ours)
    exported, back = tmp_path / "eagle3", tmp_path / "back"
    res = run(spec_cli, ours, "--to", "eagle3", "--out", exported)
    assert res.returncode == 0, res.stderr

    # the export is the SafeAILab/SGLang layout, as SpecForge's export --to sglang writes it
    header, metadata, _ = read_header(exported / "model.safetensors")
    assert metadata == {"format": "pt"}
    assert {n.split(".")[0] for n in header} == {"midlayer", "fc", "norm", "lm_head", "d2t", "t2d"}
    assert header["d2t"]["dtype"] == "I64" and header["t2d"]["dtype"] == "BOOL"
    assert header["midlayer.self_attn.q_proj.weight"]["dtype"] == "BF16"
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["draft_vocab_size"] == draft_vocab
    assert cfg["num_hidden_layers"] == 1 and cfg["vocab_size"] == 512 and cfg["torch_dtype"] == "bfloat16"
    assert cfg["rope_theta"] == 10000.0  # mirrored from rope_parameters for readers that predate it
    if variant == "non-default layers":
        assert cfg["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [0, 2, 6]}  # SGLang: id - 1
        assert "not EAGLE-3's default" in res.stdout
    else:
        assert "eagle_config" not in cfg  # default layers: SGLang, EAGLE code and vLLM all read 2, L//2, L-3
    if variant == "full vocabulary":
        t = load_tensors(exported / "model.safetensors")
        assert not t["d2t"].any() and t["t2d"].all()  # the identity SGLang's loader expects

    res = run(spec_cli, exported, "--verifier", verifier, "--out", back, "--k", K)
    assert res.returncode == 0, res.stderr
    assert (back / "model.safetensors").read_bytes() == (ours / "model.safetensors").read_bytes()
    assert config_without_provenance(back) == config_without_provenance(ours)


def test_export_refuses_what_the_layout_cannot_hold(tmp_path, verifier, random_eagle3, spec_cli):
    two_layers = random_eagle3(tmp_path / "two", verifier, num_layers=2, layer_type="qwen3", draft_vocab=128)
    res = run(spec_cli, two_layers, "--to", "eagle3", "--out", tmp_path / "out")
    assert res.returncode == 1
    assert "qwen3 decoder layers" in res.stderr and "has 2 decoder layers" in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()
    ours = random_eagle3(tmp_path / "ours", verifier, draft_vocab=128)
    cfg = json.loads((ours / "config.json").read_text())
    (ours / "config.json").write_text(json.dumps(cfg | {"norm_before_residual": True}))
    reseal_checkpoint(ours)
    res = run(spec_cli, ours, "--to", "eagle3", "--out", tmp_path / "out")
    assert res.returncode == 1 and "norm_before_residual is true" in res.stderr, res.stderr


def test_export_takes_only_a_valid_spec_checkpoint(
    tmp_path, verifier, random_eagle3, source_writers, spec_cli
):
    src = source_writers["specforge"](tmp_path / "sf", verifier)
    res = run(spec_cli, src, "--to", "eagle3", "--out", tmp_path / "out")
    assert res.returncode == 1 and "speculators_config" in res.stderr, res.stderr
    ours = random_eagle3(tmp_path / "ours", verifier, draft_vocab=128)
    res = run(spec_cli, ours, "--to", "eagle3", "--from", "specforge", "--out", tmp_path / "out")
    assert res.returncode == 2 and "--to eagle3 exports a spec-format SRC" in res.stderr, res.stderr
