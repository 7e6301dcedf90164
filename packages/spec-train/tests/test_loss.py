"""The chunked loss (gradient computed chunk by chunk in forward) against a plain, unchunked autograd
reference: same value, same gradients, for KL, CE and the LK-style loss, any chunk size."""

import pytest
import torch

from spec_train.loss import chunked_loss


def reference(normed, weight, t_normed, t_weight, valid, scale, kind):
    """The [S, T, V] logits held whole, autograd for the gradient."""
    S, T, _ = normed.shape
    total = 0.0
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
        total = total + scale[j] * per.sum()
    return total


class Head:
    def __init__(self, w):
        self.draft_weight = w


@pytest.mark.parametrize("kind", ["kl", "ce", "lk"])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_loss_matches_reference(kind, chunk):
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

    want = reference(normed, weight, t_normed, t_weight, valid, scale, kind)
    gn, gw = torch.autograd.grad(want, (normed, weight))
    got, stats = chunked_loss(
        normed, weight, t_normed, Head(t_weight), valid, scale, chunk, kind, torch.float64
    )
    hn, hw = torch.autograd.grad(got * 2.0, (normed, weight))  # the upstream gradient is applied
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hn.double(), 2 * gn, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hw.double(), 2 * gw, rtol=1e-6, atol=1e-6)
    assert torch.equal(stats[2], valid.sum(-1).float())


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
