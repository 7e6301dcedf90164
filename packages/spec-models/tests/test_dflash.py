"""The DFlash drafter: non-causal inside the block, causal to the context, batched proposals equal to one
request at a time, and a forward with no graph break (static shapes, no host sync)."""

import pytest
import torch

from spec_models import init_dflash_from_verifier, propose_dflash
from spec_models.dflash import block_inputs

VOCAB, HIDDEN, K = 256, 64, 4


@pytest.fixture
def random_dflash(random_draft):
    return lambda **kw: random_draft(
        init_dflash_from_verifier, 0.3, [1, 2], speculative_tokens=K, mask_token_id=3, **kw
    )


def inputs(B=4, L=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, L), generator=g), torch.randn(B, L, 2 * HIDDEN, generator=g) * 3


def test_batched_proposals_equal_one_request_at_a_time(random_dflash):
    model = random_dflash(num_layers=2)
    ids, aux = inputs()
    lengths = torch.tensor([9, 3, 6, 1])
    batched = propose_dflash(model, ids, aux, lengths)
    assert batched.shape == (4, K)
    for b, n in enumerate(lengths.tolist()):
        alone = propose_dflash(model, ids[b : b + 1, :n], aux[b : b + 1, :n], torch.tensor([n]))
        assert torch.equal(alone[0], batched[b])
    assert len(set(batched.flatten().tolist())) > 4


def _forward(model, ids, pos, ctx, ctx_pos, mask):
    with torch.no_grad():
        return model(ids, pos, ctx, ctx_pos, mask)


def test_block_is_non_causal_and_context_is_what_the_mask_shows(random_dflash):
    model = random_dflash()
    ids, aux = inputs(B=1, L=8)
    bids, bpos = block_inputs(model, ids[:, 5:6], torch.tensor([[5]]))
    ctx, cpos = model.combine(aux), torch.arange(8)[None]
    mask = torch.cat([cpos < 5, torch.ones(1, K + 1, dtype=torch.bool)], 1)[:, None, None].expand(
        1, 1, K + 1, 8 + K + 1
    )
    out = _forward(model, bids, bpos, ctx, cpos, mask)
    later = bids.clone()
    later[0, K] = 7  # the last slot's token: slot 1 sees it (no causal mask inside the block)
    assert not torch.allclose(_forward(model, later, bpos, ctx, cpos, mask)[0, 1], out[0, 1])
    hidden = ctx.clone()
    hidden[0, 6:] += 5  # context positions the mask hides: nothing changes
    assert torch.equal(_forward(model, bids, bpos, hidden, cpos, mask), out)


def test_forward_traces_without_graph_breaks(random_dflash):
    model = random_dflash()
    ids, aux = inputs(B=2, L=6)
    lengths = torch.tensor([6, 4])
    compiled = torch.compile(propose_dflash, backend="eager", fullgraph=True)
    assert torch.equal(compiled(model, ids, aux, lengths), propose_dflash(model, ids, aux, lengths))
