"""Test-time-training forward: masks, document boundaries, and equality with incremental drafting."""

import numpy as np
import pytest
import torch

from spec_models import KVCache, extend, forward_ttt, init_eagle3_from_verifier, ttt_input_ids, ttt_mask

VOCAB, HIDDEN = 256, 64


@pytest.fixture
def random_model(random_draft):
    return lambda **kw: random_draft(init_eagle3_from_verifier, 0.1, **kw)


def packed_batch(doc_lengths, steps, seed=0):
    """Two packed rows with the given documents: ids [B, T], aux [B, T, 3H], positions [B, T]."""
    g = torch.Generator().manual_seed(seed)
    T = sum(doc_lengths)
    ids = torch.randint(0, VOCAB, (2, T), generator=g)
    aux = torch.randn(2, T, 3 * HIDDEN, generator=g) * 3
    pos = torch.cat([torch.arange(n) for n in doc_lengths]).expand(2, T)
    return ttt_input_ids(ids, steps), aux, pos


def test_teacher_forced_inputs_shift_by_one_per_step():
    ids = torch.tensor([[10, 11, 12, 13]])
    assert ttt_input_ids(ids, 3, pad_id=-1)[:, 0].tolist() == [
        [11, 12, 13, -1],  # step 0, slot t: x_{t+1}
        [12, 13, -1, -1],  # step 1: x_{t+2}
        [13, -1, -1, -1],
    ]


def test_mask_step0_causal_within_document_then_diagonal_blocks():
    # Two documents of two tokens; step 1 sees step-0 keys of its document so far plus its own key.
    mask = ttt_mask(torch.tensor([[0, 1, 0, 1]]), steps=2)
    assert mask.shape == (1, 1, 4, 8)
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 1, 0, 0],
        [0, 0, 1, 0, 0, 0, 1, 0],
        [0, 0, 1, 1, 0, 0, 0, 1],
    ]


CONFIGS = [
    dict(layer_type="llama", num_layers=1),
    dict(layer_type="llama", num_layers=2, norm_before_residual=True),
    dict(layer_type="qwen3", num_layers=1, norm_output=True),
    dict(layer_type="qwen3", num_layers=3, norm_before_fc=True, fc_norm=True),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['layer_type']}-{c['num_layers']}")
def test_ttt_equals_incremental_drafting_fed_the_same_tokens(cfg, random_model):
    """Step j at slot t of the TTT forward is exactly the j-th draft forward vLLM runs after verifying
    the document up to slot t, when the drafts fed back are step_ids: this checks the masks."""
    S, docs = 3, [7, 5]
    model = random_model(**cfg)
    step_ids, aux, pos = packed_batch(docs, S)
    with torch.no_grad():
        ttt = forward_ttt(model, step_ids, aux, pos)  # [S, B, T, H]
    B, T = pos.shape
    # One request per (row, slot): its document's slots up to that slot, right-padded.
    starts = [s for s, n in zip(np.cumsum([0] + docs), docs) for _ in range(n)]
    L = max(docs)
    ids, hid, lengths, where = (
        torch.zeros(B * T, L, dtype=torch.long),
        torch.zeros(B * T, L, 3 * HIDDEN),
        [],
        [],
    )
    for b in range(B):
        for t in range(T):
            r, s = len(where), starts[t]
            ids[r, : t - s + 1], hid[r, : t - s + 1] = step_ids[0, b, s : t + 1], aux[b, s : t + 1]
            lengths.append(t - s + 1)
            where.append((b, t))
    lengths = torch.tensor(lengths)
    rows, last = torch.arange(B * T), lengths - 1
    with torch.no_grad():
        cache = KVCache.empty(model, B * T, L + S)
        normed, hidden = extend(model, cache, ids, model.combine(hid), torch.arange(L).expand(B * T, L))
        steps = [normed[rows, last]]
        hidden = hidden[rows, last]
        for j in range(1, S):
            forced = torch.stack([step_ids[j, b, t] for b, t in where])
            normed, hidden = extend(model, cache, forced[:, None], hidden[:, None], (last + j)[:, None])
            steps.append(normed[:, 0])
            hidden = hidden[:, 0]
    incremental = torch.stack(steps).view(S, B, T, HIDDEN)
    torch.testing.assert_close(ttt, incremental, rtol=1e-5, atol=1e-5)


def test_documents_do_not_see_each_other(random_model):
    model = random_model(num_layers=2)
    step_ids, aux, pos = packed_batch([6, 4], 3)
    aux.requires_grad_(True)
    out = forward_ttt(model, step_ids, aux, pos)
    out[:, :, 6:].sum().backward()  # every step's output in the second documents
    grad = aux.grad.abs().sum(-1)  # [B, T]
    assert (grad[:, :6] == 0).all() and (grad[:, 6:] > 0).all()


def test_flex_attention_matches_sdpa(random_model):
    pytest.importorskip("torch.nn.attention.flex_attention")
    model = random_model(num_layers=2, layer_type="qwen3")
    step_ids, aux, pos = packed_batch([5, 9, 2], 3)
    with torch.no_grad():  # flex attention has no CPU backward; GPUs train with it
        torch.testing.assert_close(
            forward_ttt(model, step_ids, aux, pos, attn="flex"), forward_ttt(model, step_ids, aux, pos)
        )


def test_training_forward_compiles_fullgraph(random_model):
    model = random_model(num_layers=1, layer_type="qwen3")
    step_ids, aux, pos = packed_batch([5, 3], 2)

    def loss_fn(model, step_ids, aux, pos):
        normed = forward_ttt(model, step_ids, aux, pos)
        return model.lm_head(normed).logsumexp(-1).mean()

    eager = loss_fn(model, step_ids, aux, pos)
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    # aot_eager traces forward and backward as one graph (a break fails fullgraph) without inductor's C++
    # code generation, which took most of this test's 30 s on two cores; tools/gpu_check.py runs inductor.
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(model, step_ids, aux, pos)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for n, g in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cfg", CONFIGS[1:3], ids=lambda c: f"{c['layer_type']}-{c['num_layers']}")
def test_blockwise_attention_equals_dense_mask_with_gradients(cfg, random_model, same_outputs_and_grads):
    """The blockwise path (per-document causal flash attention + the diagonal keys, merged by log-sum-exp)
    computes the dense mask's outputs and gradients (fp64), documents of several lengths packed in a row."""
    model = random_model(**cfg).double()
    step_ids, aux, pos = packed_batch([9, 1, 14], 3)
    aux = aux.double().requires_grad_(True)
    w = torch.randn(3, 2, 24, HIDDEN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    params = [aux] + [p for p in model.parameters() if p.requires_grad]

    def run(attn):
        out = forward_ttt(model, step_ids, aux, pos, attn=attn)
        return out, torch.autograd.grad((out * w).sum(), params, allow_unused=True)

    same_outputs_and_grads(run)


def test_blockwise_attention_in_bf16_autocast_agrees_with_the_dense_mask(random_model):
    """Training in bf16 (autocast, spec train's choice on AMX CPUs) runs the flash kernels in bf16: outputs
    and gradients within bf16's rounding of the dense mask's under the same autocast."""
    model = random_model(num_layers=1, layer_type="llama")
    step_ids, aux, pos = packed_batch([9, 1, 14], 3)
    aux = aux.requires_grad_(True)
    params = [aux] + [p for p in model.parameters() if p.requires_grad]
    runs = {}
    for attn in ("sdpa", "blockwise"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward_ttt(model, step_ids, aux, pos, attn=attn)
        grads = torch.autograd.grad(out.float().square().sum(), params, allow_unused=True)
        runs[attn] = (out.float(), grads)
    (o1, g1), (o2, g2) = runs["sdpa"], runs["blockwise"]
    assert (o2 - o1).norm() <= 2e-2 * o1.norm()
    pairs = [(a, b) for a, b in zip(g1, g2) if a is not None]
    assert len(pairs) > 5 and all((b - a).norm() <= 3e-2 * a.norm() for a, b in pairs)


@pytest.mark.parametrize("attn", ["sdpa", "blockwise"])
def test_gradient_checkpointing_gives_the_same_gradients(attn, random_model):
    """Activation checkpointing of the draft layers recomputes them in the backward: same gradients."""
    model = random_model(num_layers=2, layer_type="qwen3")
    step_ids, aux, pos = packed_batch([9, 6], 3)
    grads, calls = [], []
    model.layers[1].register_forward_pre_hook(lambda *_: calls.append(1))
    for on in (False, True):
        model.gradient_checkpointing = on
        calls.clear()
        out = forward_ttt(model, step_ids, aux, pos, attn=attn)
        model.zero_grad()
        model.lm_head(out).logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert len(calls) == (6 if on else 3)  # 3 TTT steps; checkpointed: each recomputed in the backward
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-6)
