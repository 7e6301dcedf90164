"""The chunked loss (gradient computed chunk by chunk in forward) against a plain, unchunked autograd
reference: same value, same gradients, for KL, CE and the LK-style loss, any chunk size, with fixed step
weights and with D-PACE's per-chain weights."""

import math

import pytest
import torch

from spec_train.loss import chunked_loss, dpace_weights


def dpace_loop(q, valid, alpha):
    """D-PACE weights chain by chain, as the paper writes them: w_j = sum_{m>=j} prod_{i<=m} q~_i."""
    S, T = q.shape
    w = torch.zeros(S, T, dtype=torch.float64)
    for t in range(T):
        qs = [(1 - alpha) * float(q[i, t]) + alpha if valid[i, t] else 1.0 for i in range(S)]
        prefix = [math.prod(qs[: m + 1]) for m in range(S)]
        raw = [sum(prefix[j:]) if valid[j, t] else 0.0 for j in range(S)]
        for j in range(S):
            w[j, t] = raw[j] / sum(raw) if sum(raw) else 0.0
    return w


def reference(normed, weight, t_normed, t_weight, valid, scale, kind, alpha=None):
    """The [S, T, V] logits held whole, autograd for the gradient."""
    S, T, _ = normed.shape
    total = 0.0
    if alpha is not None:  # the draft's probability of the verifier's top-1 token per counted slot
        q = torch.zeros(S, T, dtype=torch.float64)
        for j in range(S):
            t = valid[j].nonzero().squeeze(1)
            top = (t_normed[t + 1 + j] @ t_weight.T).argmax(-1)
            q[j, t] = torch.softmax(normed[j, t].detach() @ weight.detach().T, -1).gather(1, top[:, None])[
                :, 0
            ]
        wgt = dpace_loop(q, valid, alpha)
    for j in range(S):
        t = valid[j].nonzero().squeeze(1)
        logq = torch.log_softmax(normed[j, t] @ weight.T, -1)
        logits = t_normed[t + 1 + j] @ t_weight.T
        logp = torch.log_softmax(logits, -1)
        if kind == "kl":
            per = (logp.exp() * (logp - logq)).sum(-1)
        elif kind == "lk":
            per = -torch.minimum(logp.exp(), logq.exp()).sum(-1).log()
        else:
            per = -logq.gather(1, logits.argmax(-1)[:, None]).squeeze(1)
        total = total + scale[j] * (per.sum() if alpha is None else (wgt[j, t] * per).sum())
    return total


class Head:
    def __init__(self, w):
        self.draft_weight = w


@pytest.mark.parametrize("alpha", [None, 0.5])
@pytest.mark.parametrize("kind", ["kl", "ce", "lk"])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_loss_matches_reference(kind, chunk, alpha):
    g = torch.Generator().manual_seed(0)
    S, T, H, V = 3, 23, 16, 40
    normed = torch.randn(S, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    t_normed = torch.randn(T, H, generator=g, dtype=torch.float64)
    t_weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    valid = torch.rand(S, T, generator=g) < 0.7
    for j in range(S):
        valid[j, T - 1 - j :] = False  # a target position must exist
    scale = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)

    want = reference(normed, weight, t_normed, t_weight, valid, scale, kind, alpha)
    gn, gw = torch.autograd.grad(want, (normed, weight))
    got, stats = chunked_loss(
        normed, weight, t_normed, Head(t_weight), valid, scale, chunk, kind, torch.float64, alpha
    )
    hn, hw = torch.autograd.grad(got * 2.0, (normed, weight))  # the upstream gradient is applied
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hn.double(), 2 * gn, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hw.double(), 2 * gw, rtol=1e-6, atol=1e-6)
    assert torch.equal(stats[2], valid.sum(-1).float())


def test_dpace_weights_move_to_later_depths_as_earlier_ones_firm_up():
    """One chain of 3 depths: an unsure first depth keeps the weight at the front (near the 0.8**j-like
    shape), a sure one moves it back; alpha = 1 weighs the depths by how many depths follow them; an
    uncounted depth weighs 0 and the chain's weights sum to 1."""
    valid = torch.ones(3, 1, dtype=torch.bool)
    unsure = dpace_weights(torch.tensor([[0.0], [0.0], [0.0]]), valid, 0.5)[:, 0]
    sure = dpace_weights(torch.tensor([[1.0], [1.0], [0.0]]), valid, 0.5)[:, 0]
    torch.testing.assert_close(unsure, torch.tensor([0.875, 0.375, 0.125]) / 1.375)  # q~ = 0.5 throughout
    torch.testing.assert_close(sure, torch.tensor([2.5, 1.5, 0.5]) / 4.5)
    assert sure[2] > unsure[2] and sure[0] < unsure[0]
    torch.testing.assert_close(
        dpace_weights(torch.rand(3, 1), valid, 1.0)[:, 0], torch.tensor([3.0, 2, 1]) / 6
    )
    part = dpace_weights(
        torch.full((3, 2), 0.5), torch.tensor([[True, True], [True, False], [False, False]]), 0.5
    )
    assert part[2].tolist() == [0, 0] and part[1, 1] == 0 and torch.allclose(part.sum(0), torch.ones(2))


def test_no_gradient_work_without_grad():
    S, T, H, V = 2, 9, 4, 6
    normed, weight = torch.randn(S, T, H), torch.randn(V, H)
    valid = torch.ones(S, T, dtype=torch.bool)
    valid[:, -3:] = False
    with torch.no_grad():
        loss, stats = chunked_loss(
            normed, weight, torch.randn(T, H), Head(torch.randn(V, H)), valid, torch.ones(S), 4
        )
    assert not loss.requires_grad and stats[2].tolist() == [6, 6]


def test_padded_rows_give_the_same_loss_and_gradients(tiny_model, tiny_dataset):
    """RowLoader(pad_multiple=...) (CPU bf16 training) appends an unsupervised padding document: the loss,
    its statistics and the gradients of every parameter are those of the unpadded row."""
    import numpy as np

    from spec_format.dataset import Dataset
    from spec_models import init_eagle3_from_verifier
    from spec_train.data import RowLoader, layer_indices
    from spec_train.loss import Objective
    from spec_train.targets import VerifierHead

    verifier, ds = tiny_model("llama"), Dataset(tiny_dataset("llama"))
    aux_idx, last_idx = layer_indices(ds, None, verifier)
    draft = init_eagle3_from_verifier(verifier, aux_layer_ids=[ds.manifest.layer_ids[i] for i in aux_idx])
    head = VerifierHead(verifier, np.arange(draft.spec.draft_vocab))
    objective = Objective(draft, head, steps=3, kind="kl", chunk=64, attn="sdpa")
    row = [(0, int(ds.lengths[0])), (1, int(ds.lengths[1]))]
    results = []
    for pad in (None, 128):
        batch = RowLoader(ds.path, aux_idx, last_idx, dataset=ds, pad_multiple=pad).load(row)
        draft.zero_grad()
        loss, stats = objective(batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None}
        results.append((batch["input_ids"].shape[0], loss.detach(), stats, grads))
    (n0, loss0, stats0, grads0), (n1, loss1, stats1, grads1) = results
    assert n0 % 128 != 0 and n1 % 128 == 0 and n1 > n0
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert torch.equal(stats1[2], stats0[2])  # the same counted slots: padding is never supervised
    assert grads0.keys() == grads1.keys() and "fc.weight" in grads0
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-6, msg=name)
