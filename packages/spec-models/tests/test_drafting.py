"""Incremental drafting: batching with padding, greedy feedback, the compiled one-token step."""

import pytest
import torch

from spec_models import KVCache, extend, forward_ttt, greedy_step, init_eagle3_from_verifier, propose

VOCAB, HIDDEN = 256, 64


@pytest.fixture
def random_model(random_draft):
    return lambda **kw: random_draft(init_eagle3_from_verifier, 0.2, **kw)


def inputs(B=4, L=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, L), generator=g), torch.randn(B, L, 3 * HIDDEN, generator=g) * 3


def test_batched_propose_equals_one_request_at_a_time(random_model):
    model = random_model(num_layers=2)
    ids, aux = inputs()
    lengths = torch.tensor([9, 3, 6, 1])
    batched = propose(model, ids, aux, lengths, 4)
    assert batched.shape == (4, 4) and batched.dtype == torch.long
    for b, n in enumerate(lengths.tolist()):
        alone = propose(model, ids[b : b + 1, :n], aux[b : b + 1, :n], torch.tensor([n]), 4)
        assert torch.equal(alone[0], batched[b])
    assert len(set(batched.flatten().tolist())) > 4  # proposals depend on the context
    assert bool(model.to_target(torch.arange(100)).unsqueeze(0).eq(batched.flatten()[:, None]).any(1).all())


def test_proposals_are_ttt_greedy_tokens_when_fed_back(random_model):
    """Feeding the draft's own greedy tokens as TTT step inputs reproduces propose(): the TTT forward
    with the target's greedy tokens as inputs is therefore an exact greedy-acceptance simulator."""
    model = random_model(layer_type="qwen3")
    ids, aux = inputs(B=1, L=8)
    drafts = propose(model, ids, aux, torch.tensor([8]), 3)[0]
    step_ids = torch.stack([ids, torch.full_like(ids, drafts[0]), torch.full_like(ids, drafts[1])])
    with torch.no_grad():
        normed = forward_ttt(model, step_ids, aux)
    assert model.greedy(normed[:, 0, 7]).tolist() == drafts.tolist()


def test_one_token_step_compiles_fullgraph_and_writes_the_cache(random_model):
    model = random_model(num_layers=1)
    ids, aux = inputs(B=3, L=6)
    lengths = torch.tensor([6, 2, 4])

    def run(step):
        with torch.no_grad():
            cache = KVCache.empty(model, 3, 6 + 3)
            normed, hidden = extend(model, cache, ids, model.combine(aux), torch.arange(6).expand(3, 6))
            after_prefill = cache.k[0].clone()
            rows, pos = torch.arange(3), lengths - 1
            token, hidden = model.greedy(normed[rows, pos]), hidden[rows, pos]
            tokens = [token]
            for _ in range(2):
                pos = pos + 1
                token, hidden = step(model, cache, token, hidden, pos)
                tokens.append(token)
        return torch.stack(tokens, 1), cache, after_prefill

    eager, eager_cache, prefilled = run(greedy_step)
    # fullgraph: a graph break (a host sync, a data-dependent shape) fails; aot_eager skips inductor's code
    # generation (most of the time on two cores; tools/gpu_check.py runs inductor on a GPU).
    compiled, compiled_cache, _ = run(torch.compile(greedy_step, fullgraph=True, backend="aot_eager"))
    assert torch.equal(eager, compiled)
    assert torch.equal(eager, propose(model, ids, aux, lengths, 3))
    for a, b in zip(eager_cache.k + eager_cache.v, compiled_cache.k + compiled_cache.v):
        torch.testing.assert_close(a, b)
    # The two steps wrote exactly at positions length and length+1 of each request (request 1: 2, 3).
    changed = (eager_cache.k[0] != prefilled).any(-1).any(1)  # [B, max_len]
    assert changed.nonzero().tolist() == [[0, 6], [0, 7], [1, 2], [1, 3], [2, 4], [2, 5]]
