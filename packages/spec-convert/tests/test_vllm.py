"""Converted drafts in vLLM (CPU): they load with the verifier, run speculative steps, leave greedy output
unchanged, and a draft that went out to the SafeAILab/SGLang layout and back behaves exactly the same.

Engines: three on a tiny llama verifier (a converted SafeAILab draft, its round trip, a converted
SpecForge Eagle-3.1 draft) and one on the real SmolLM2 (a converted two-layer ModelOpt draft), plus the
suite's shared plain SmolLM2 engine for the reference output.
"""

import subprocess

import pytest

from spec_format.checkpoint import read_checkpoint

pytestmark = pytest.mark.e2e

TINY_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
TOKENS = 24


def convert(spec_cli, *args):
    res = subprocess.run([spec_cli, "convert", *map(str, args)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return res


def greedy(llm, prompts, max_tokens=TOKENS, counters=True):
    """(token ids per prompt, vLLM's spec-decode counters for this call, or None)."""
    from vllm import SamplingParams

    from spec_datagen.runtime import spec_decode_counters

    before = spec_decode_counters(llm) if counters else None
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    ids = [list(o.outputs[0].token_ids) for o in outs]
    if not counters:
        return ids, None
    got = spec_decode_counters(llm) - before
    print(f"spec decode: {got} mean acceptance length {got.mean_acceptance_length:.3f}")  # shown with -s
    return ids, got


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, demo_model):
    """A tiny random llama (8 layers, hidden 64) with SmolLM2's tokenizer and head_dim 32: the shared
    tiny_model("llama") has head_dim 16, which vLLM's CPU attention does not run (it takes 32 and up)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(demo_model)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-llama-hd32")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def safailab_run(tmp_path_factory, tiny_llama, source_writers, vllm_engine, spec_cli):
    """A SafeAILab EAGLE-3 .bin for the tiny llama, converted, run in vLLM: (draft dir, outputs, counters)."""
    root = tmp_path_factory.mktemp("safailab")
    verifier = tiny_llama
    src = source_writers["eagle3"](root / "src", verifier, draft_vocab=1024)
    convert(spec_cli, src, "--verifier", verifier, "--out", root / "draft", "--k", 3)
    llm = vllm_engine("convert-safailab", root / "draft", disable_log_stats=False)
    outputs, counters = greedy(llm, TINY_PROMPTS)
    return root / "draft", outputs, counters


def test_converted_safailab_draft_runs_speculative_steps(safailab_run):
    _, outputs, counters = safailab_run
    assert all(len(o) == TOKENS for o in outputs)
    assert counters.drafts > 0 and counters.draft_tokens == 3 * counters.drafts, counters


def test_round_trip_keeps_vllm_acceptance(tmp_path, safailab_run, tiny_llama, vllm_engine, spec_cli):
    """ours -> SafeAILab/SGLang layout -> ours: identical bytes, so vLLM's outputs and counters are equal."""
    draft, outputs, counters = safailab_run
    convert(spec_cli, draft, "--to", "eagle3", "--out", tmp_path / "eagle3")
    convert(spec_cli, tmp_path / "eagle3", "--verifier", tiny_llama, "--out", tmp_path / "back", "--k", 3)
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (
        draft / "model.safetensors"
    ).read_bytes()
    llm = vllm_engine("convert-roundtrip", tmp_path / "back", disable_log_stats=False)
    back_outputs, back_counters = greedy(llm, TINY_PROMPTS)
    assert back_outputs == outputs
    assert (
        back_counters == counters and back_counters.mean_acceptance_length == counters.mean_acceptance_length
    )


def test_converted_specforge_eagle31_draft_runs(
    tmp_path, safailab_run, tiny_llama, source_writers, vllm_engine, spec_cli
):
    """fc_norm (per-layer norms before fc) loads and runs; greedy output is the verifier's, whatever the draft."""
    verifier = tiny_llama
    src = source_writers["specforge"](tmp_path / "src", verifier, draft_vocab=1024, fc_norm=True)
    convert(spec_cli, src, "--verifier", verifier, "--out", tmp_path / "draft", "--k", 2)
    assert read_checkpoint(tmp_path / "draft")[0].fc_norm is True
    llm = vllm_engine("convert-specforge", tmp_path / "draft", disable_log_stats=False)
    outputs, counters = greedy(llm, TINY_PROMPTS)
    assert counters.drafts > 0 and counters.draft_tokens == 2 * counters.drafts, counters
    assert outputs == safailab_run[1]  # both equal the tiny verifier's own greedy continuation


def test_converted_modelopt_draft_on_smollm2_keeps_greedy_output(
    tmp_path, demo_model, source_writers, vllm_engine, spec_cli
):
    """A two-layer ModelOpt export for the real SmolLM2 (frequency-ordered d2t): it loads with the shapes
    vLLM expects, drafts, and the output equals plain greedy decoding."""
    src = source_writers["modelopt"](tmp_path / "src", demo_model, draft_vocab=4096, num_layers=2)
    res = convert(spec_cli, src, "--verifier", demo_model, "--out", tmp_path / "draft", "--k", 2)
    assert "layer ids [2, 15, 27]" in res.stdout  # ModelOpt [1, 14, 26] are decoder-layer outputs
    prompts = ["The capital of France is", "Write a haiku about the sea.\n", "1, 2, 3, 4,"]
    plain, _ = greedy(vllm_engine("plain", demo_model), prompts, 32, counters=False)
    llm = vllm_engine("convert-modelopt-smollm2", tmp_path / "draft", disable_log_stats=False)
    outputs, counters = greedy(llm, prompts, 32)
    assert counters.drafts > 0 and counters.draft_tokens == 2 * counters.drafts, counters
    assert outputs == plain
