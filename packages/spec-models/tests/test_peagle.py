"""P-EAGLE: the one-forward training pass equals vLLM-style KV-cache drafting at every slot and depth,
for packed rows and for any nested subset of anchors (COD sampling); checkpoints keep mask_hidden."""

import pytest
import torch

from spec_format.validate import validate_checkpoint
from spec_models import forward_parallel, init_peagle_from_verifier, load, propose_parallel, save

VOCAB, HIDDEN = 256, 64


@pytest.fixture
def random_peagle(random_draft):
    return lambda **kw: random_draft(init_peagle_from_verifier, 0.2, mask_token_id=5, **kw)


def test_parallel_forward_is_kv_cache_drafting_for_every_slot(random_peagle):
    model = random_peagle(num_layers=2, layer_type="qwen3")
    k, T = 4, 14
    g = torch.Generator().manual_seed(1)
    ids, aux = torch.randint(0, VOCAB, (T,), generator=g), torch.randn(T, 3 * HIDDEN, generator=g) * 3
    pos = torch.tensor(list(range(8)) + list(range(6)))  # two packed documents
    with torch.no_grad():
        all_slots = [torch.arange(T)] * (k - 1)
        normed = forward_parallel(model, ids, aux, pos, all_slots).view(k, T, -1)
        tokens = model.greedy(normed)  # [k, T]
        for t in range(T):
            start = t - int(pos[t])  # the document's first slot
            n = t - start + 1
            ref = propose_parallel(
                model, ids[None, start : t + 1], aux[None, start : t + 1], torch.tensor([n]), k
            )
            assert tokens[:, t].tolist() == ref[0].tolist(), t
        # COD: a nested subset of anchors per depth gives the same outputs for the anchors it keeps.
        subsets = [torch.tensor([0, 3, 5, 9, 12]), torch.tensor([3, 9, 12]), torch.tensor([9])]
        sub = forward_parallel(model, ids, aux, pos, subsets)
        assert torch.allclose(sub[:T], normed[0], atol=1e-5)
        off = T
        for d, a in enumerate(subsets, start=1):
            assert torch.allclose(sub[off : off + len(a)], normed[d, a], atol=1e-5)
            off += len(a)
    assert len(set(tokens.flatten().tolist())) > 4  # proposals depend on the context


def test_checkpoint_roundtrip_keeps_mask_hidden(verifier, tmp_path, random_peagle):
    model = random_peagle()
    out = save(model, tmp_path / "draft")
    assert validate_checkpoint(out).ok
    back = load(out, verifier=model.config.verifier_name)
    assert back.mask_token_id == 5 and type(back).__name__ == "PEagleDraft"
    assert torch.allclose(back.mask_hidden, model.mask_hidden.to(torch.bfloat16).float())


def test_blockwise_parallel_forward_equals_dense_mask_with_gradients(random_draft, same_outputs_and_grads):
    """forward_parallel's blockwise attention (no [Q, Q] mask) gives the dense mask's outputs and
    gradients (fp64) with COD subsets per depth, packed documents and padding queries."""
    model = random_draft(init_peagle_from_verifier, 0.1, mask_token_id=3, num_layers=2).double()
    T = 14
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (T,), generator=g)
    aux = (torch.randn(T, 3 * HIDDEN, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    pos = torch.tensor(list(range(8)) + list(range(6)))
    subsets = [torch.tensor([0, 3, 5, 9, 12]), torch.tensor([3, 9, 12]), torch.tensor([9])]
    n = T + 9  # real queries; 5 padding queries follow
    w = torch.randn(n, HIDDEN, generator=g, dtype=torch.float64)
    params = [aux] + [p for p in model.parameters() if p.requires_grad]

    def run(attn):
        out = forward_parallel(model, ids, aux, pos, subsets, attn, padding=5)[:n]
        return out, torch.autograd.grad((out * w).sum(), params, allow_unused=True)

    same_outputs_and_grads(run)
