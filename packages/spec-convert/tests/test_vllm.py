"""Converted drafts in vLLM (CPU): they load with the verifier, run speculative steps, are accepted exactly
where they should be, leave greedy output unchanged, and a draft that went out to the SafeAILab/SGLang
layout and back keeps what vLLM reads.

A random draft is never accepted, so its acceptance proves nothing. The tiny verifier here is built so that
its next token depends on the current token only (every attention output projection is zero): the hidden
state entering decoder layer k is then a fixed function of the token at that position. That allows a
draft written by hand that predicts the token after next from ONE verifier layer: fc passes that layer's
state through, the decoder layer adds nothing, lm_head is a least-squares fit. vLLM accepts its first
proposals only if the converter told vLLM that very layer: an off-by-one in the layer ids hands the draft
another layer's state and acceptance collapses.

Engines: two on the tiny verifier (a converted SafeAILab draft, a converted SpecForge Eagle-3.1 draft) and two on the real SmolLM2 (a converted two-layer ModelOpt draft, a converted speculators P-EAGLE draft), plus the suite's
shared plain SmolLM2 engine for the reference output.
"""

import json
import subprocess

import numpy as np
import pytest

from spec_format.checkpoint import read_checkpoint

pytestmark = pytest.mark.e2e

TINY_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
TOKENS = 16
DRAFT_VOCAB = 1024


def convert(spec_cli, *args):
    res = subprocess.run([spec_cli, "convert", *map(str, args)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return res


def assert_lossless_on_smollm2(vllm_engine, demo_model, key, draft_dir, k):
    """The draft in `draft_dir` drafts k tokens per step in vLLM and leaves SmolLM2's greedy output as it is."""
    prompts = ["The capital of France is", "Write a haiku about the sea.\n", "1, 2, 3, 4,"]
    plain, _ = greedy(vllm_engine("plain", demo_model), prompts, 32, counters=False)
    outputs, counters = greedy(vllm_engine(key, draft_dir, disable_log_stats=False), prompts, 32)
    assert counters.drafts > 0 and counters.draft_tokens == k * counters.drafts, counters
    assert outputs == plain


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
def bigram_verifier(tmp_path_factory, demo_model):
    """A tiny random llama (8 layers, hidden 64, SmolLM2's tokenizer) with zero attention outputs, so each
    next token is a function of the current one, and growing MLP outputs. head_dim 32: vLLM's CPU attention runs 32 and up (the
    shared tiny_model("llama") has 16)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(demo_model)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.o_proj.weight.zero_()
            # each layer outweighs the residual stream it gets, so neighbouring layers' states differ
            # (cosine ~0.2) and a draft fed its neighbour's state fails
            layer.mlp.down_proj.weight.mul_(10 * 4**i)
    out = tmp_path_factory.mktemp("bigram-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    prompts = [tok(p).input_ids for p in TINY_PROMPTS]
    return out, prompts


def bigram_draft(verifier, prompts, layer: int, random_draft_tensors, fc_norm=False):
    """(weights in the format's names, the verifier's greedy outputs, how often the draft would still be right
    if vLLM handed it layer - 1 instead): a draft that proposes the token after next from the hidden state
    entering verifier layer `layer`, which must be its third fc input."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(verifier, dtype=torch.float32).eval()

    @torch.no_grad()
    def step(token: int) -> tuple[int, np.ndarray, np.ndarray]:
        out = model(torch.tensor([[token]]), output_hidden_states=True)
        h = out.hidden_states
        return int(out.logits[0, -1].argmax()), h[layer][0, -1].numpy(), h[layer - 1][0, -1].numpy()

    # the verifier's greedy chain from each prompt's last token; the draft sees the state of position i
    # (token c[i]) and the sampled c[i+1], and must propose c[i+2]
    expected, state, below, label = [], {}, {}, {}
    for ids in prompts:
        chain = [ids[-1]]
        for _ in range(TOKENS + 3):
            nxt, state[chain[-1]], below[chain[-1]] = step(chain[-1])
            chain.append(nxt)
        expected.append(chain[1 : TOKENS + 1])
        label |= {chain[i]: chain[i + 2] for i in range(len(chain) - 2)}
    tokens = sorted(label)

    def normed(states):  # what the draft's final norm makes of the state fc passes through
        return np.stack([states[t] / np.sqrt(np.mean(states[t] ** 2) + 1e-6) for t in tokens])

    U = normed(state)
    v = json.loads((verifier / "config.json").read_text())
    V, H = v["vocab_size"], v["hidden_size"]
    kept = sorted(set(label.values()))
    kept += [t for t in range(V) if t not in set(kept)][: DRAFT_VOCAB - len(kept)]
    kept = np.array(sorted(kept))
    Y = (kept[None, :] == np.array([label[t] for t in tokens])[:, None]).astype(np.float32)
    W = np.linalg.lstsq(U, Y, rcond=None)[0]  # [H, draft_vocab]: U @ W reproduces the one-hot labels
    assert ((U @ W).argmax(1) == Y.argmax(1)).all(), "the verifier's chains visit too many tokens to fit"
    off_by_one = float(((normed(below) @ W).argmax(1) == Y.argmax(1)).mean())

    t = random_draft_tensors(v, DRAFT_VOCAB, fc_norm=fc_norm)
    t["fc.weight"] = np.zeros((H, 3 * H), np.float32)
    t["fc.weight"][:, 2 * H :] = np.eye(H)  # pass the third captured state through
    t["layers.0.self_attn.o_proj.weight"][:] = 0  # the decoder layer adds nothing to it
    t["layers.0.mlp.down_proj.weight"][:] = 0
    t["lm_head.weight"] = np.ascontiguousarray(W.T, dtype=np.float32)
    t["d2t"] = kept.astype(np.int64) - np.arange(DRAFT_VOCAB, dtype=np.int64)
    t["t2d"] = np.isin(np.arange(V), kept)
    return t, expected, off_by_one


@pytest.fixture(scope="module")
def safailab_run(
    tmp_path_factory, bigram_verifier, source_writers, random_draft_tensors, vllm_engine, spec_cli
):
    """A SafeAILab EAGLE-3 .bin built for layers 2, 4, 5 (the EAGLE code's 2, L//2, L-3 of 8), converted and run:
    (draft dir, prompts, expected outputs, outputs, counters)."""
    root = tmp_path_factory.mktemp("safailab")
    verifier, prompts = bigram_verifier
    weights, expected, off_by_one = bigram_draft(verifier, prompts, 5, random_draft_tensors)
    assert off_by_one < 0.5, off_by_one  # fed layer 4 instead, this draft would be wrong
    src = source_writers["eagle3"](root / "src", verifier, draft_vocab=DRAFT_VOCAB, weights=weights)
    convert(spec_cli, src, "--verifier", verifier, "--out", root / "draft", "--k", 3)
    llm = vllm_engine("convert-safailab", root / "draft", disable_log_stats=False)
    outputs, counters = greedy(llm, [{"prompt_token_ids": p} for p in prompts])
    return root / "draft", prompts, expected, outputs, counters


def test_converted_safailab_draft_is_accepted_on_the_layers_it_was_built_for(safailab_run):
    _, _, expected, outputs, counters = safailab_run
    assert outputs == expected  # the verifier's own greedy continuation
    assert counters.draft_tokens == 3 * counters.drafts > 0, counters
    assert counters.acceptance_per_position[0] > 0.9, counters  # random drafts: 0


def test_round_trip_keeps_what_vllm_reads(tmp_path, safailab_run, bigram_verifier, spec_cli):
    """ours -> SafeAILab/SGLang layout -> ours: identical weight bytes and the same config.json apart from our
    own provenance metadata, so vLLM serves the same draft (no second engine needed to show it)."""
    draft, *_ = safailab_run
    convert(spec_cli, draft, "--to", "eagle3", "--out", tmp_path / "eagle3")
    convert(
        spec_cli, tmp_path / "eagle3", "--verifier", bigram_verifier[0], "--out", tmp_path / "back", "--k", 3
    )
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (
        draft / "model.safetensors"
    ).read_bytes()
    before, after = (json.loads((d / "config.json").read_text()) for d in (draft, tmp_path / "back"))
    for raw in (before, after):  # our own metadata, and the seal over the bytes it is part of
        raw.pop("spec", None), raw.pop("spec_sha256", None)
    assert after == before


def test_specforge_layer_ids_reach_vllm_shifted_by_one(
    tmp_path, bigram_verifier, source_writers, random_draft_tensors, vllm_engine, spec_cli
):
    """SpecForge's eagle_config [1, 3, 6] counts decoder-layer outputs: vLLM must capture 2, 4, 7. The draft
    (Eagle 3.1: per-layer fc norms) is built for layer 7, so only the shifted ids make vLLM accept it."""
    verifier, prompts = bigram_verifier
    weights, expected, off_by_one = bigram_draft(verifier, prompts, 7, random_draft_tensors, fc_norm=True)
    assert off_by_one < 0.5, off_by_one  # fed layer 6 (the unshifted id), the same draft would be wrong
    src = source_writers["specforge"](
        tmp_path / "src",
        verifier,
        draft_vocab=DRAFT_VOCAB,
        fc_norm=True,
        capture_layers=[1, 3, 6],
        weights=weights,
    )
    convert(spec_cli, src, "--verifier", verifier, "--out", tmp_path / "draft", "--k", 2)
    cfg = read_checkpoint(tmp_path / "draft")[0]
    assert cfg.fc_norm is True and cfg.eagle_aux_hidden_state_layer_ids == [2, 4, 7]
    llm = vllm_engine("convert-specforge", tmp_path / "draft", disable_log_stats=False)
    outputs, counters = greedy(llm, [{"prompt_token_ids": p} for p in prompts])
    assert outputs == expected
    assert counters.draft_tokens == 2 * counters.drafts > 0 and counters.acceptance_per_position[0] > 0.9, (
        counters
    )


def test_converted_modelopt_draft_on_smollm2_keeps_greedy_output(
    tmp_path, demo_model, source_writers, vllm_engine, spec_cli
):
    """A two-layer ModelOpt export for the real SmolLM2 (frequency-ordered d2t): it loads with the shapes
    vLLM expects, drafts, and the output equals plain greedy decoding."""
    src = source_writers["modelopt"](tmp_path / "src", demo_model, draft_vocab=4096, num_layers=2)
    res = convert(spec_cli, src, "--verifier", demo_model, "--out", tmp_path / "draft", "--k", 2)
    assert "layer ids [2, 15, 27]" in res.stdout  # ModelOpt [1, 14, 26] are decoder-layer outputs
    assert_lossless_on_smollm2(vllm_engine, demo_model, "convert-modelopt-smollm2", tmp_path / "draft", k=2)


def test_converted_speculators_peagle_on_smollm2_drafts_in_parallel(
    tmp_path, demo_model, source_writers, vllm_engine, spec_cli, same_tensors
):
    """A speculators P-EAGLE directory for the real SmolLM2, converted, is served as `vllm serve DIR`
    serves it (vLLM reads peagle as eagle3 + parallel drafting): k tokens per draft, output unchanged.
    The weights are random (any draft keeps greedy output), so the converted tensors are compared with the
    source's, bit for bit."""
    src = source_writers["speculators-peagle"](
        tmp_path / "src", demo_model, draft_vocab=4096, mask_token_id=2
    )
    convert(spec_cli, src, "--verifier", demo_model, "--out", tmp_path / "draft")
    same_tensors(src, tmp_path / "draft", dropped=("verifier_lm_head.weight",))  # the verifier's own head
    assert_lossless_on_smollm2(vllm_engine, demo_model, "convert-peagle-smollm2", tmp_path / "draft", k=4)
