"""Acceptance without vLLM: the trainer's TTT estimate (one forward with the verifier's greedy tokens as step
inputs) counts the same chains as vLLM-style KV-cache drafting (spec_models.extend / greedy_step); the
acceptance-length formula; `spec eval --offline`'s replay of verification rounds (spec_train.simulate)."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from spec_models import init_eagle3_from_verifier
from spec_train.metrics import acceptance_length, chain_counts, estimate
from spec_train.offline import incremental_counts, ttt_counts
from spec_train.targets import VerifierHead


def small_vocab_verifier(path, vocab=3, hidden=32, layers=4, seed=0):
    """A verifier directory with a 3-token vocabulary: random drafts then match the verifier's greedy token
    a third of the time, so chains of every depth occur."""
    rng = np.random.default_rng(seed)
    path.mkdir()
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 64,
           "num_hidden_layers": layers, "vocab_size": vocab, "rms_norm_eps": 1e-5, "hidden_act": "silu",
           "max_position_embeddings": 512, "tie_word_embeddings": False}  # fmt: skip
    (path / "config.json").write_text(json.dumps(cfg))
    save_file({"model.embed_tokens.weight": rng.standard_normal((vocab, hidden)).astype(np.float32),
               "model.norm.weight": np.ones(hidden, np.float32),
               "lm_head.weight": rng.standard_normal((vocab, hidden)).astype(np.float32)},
              str(path / "model.safetensors"))  # fmt: skip
    return path


@pytest.fixture()
def setup(tmp_path):
    vdir = small_vocab_verifier(tmp_path / "verifier")
    torch.manual_seed(0)
    draft = init_eagle3_from_verifier(vdir, aux_layer_ids=[1, 2, 3])
    with torch.no_grad():  # larger random weights: varied predictions
        for name, p in draft.named_parameters():
            if "norm" not in name and name != "embed_tokens.weight":
                p.normal_(0, 0.3)
    draft.eval()
    head = VerifierHead(vdir, np.arange(3))
    return draft, head


def _sample(n, seed, supervised_from=3):
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 3, (n,), generator=g),
        "loss_mask": torch.arange(n) >= supervised_from,
        "position_ids": torch.arange(n),
        "aux": torch.randn(n, 96, generator=g),
        "last": torch.randn(n, 32, generator=g),
    }


@pytest.mark.parametrize("k", [1, 3, 5])
def test_ttt_and_incremental_drafting_count_the_same_chains(setup, k):
    draft, head = setup
    samples = [_sample(n, seed) for seed, n in enumerate([40, 61, 3, 75])]
    inc = [incremental_counts(draft, head, s, k, slots_per_batch=16) for s in samples]
    # The TTT estimate over one packed row of all four documents.
    packed = {key: torch.cat([s[key] for s in samples]) for key in samples[0]}
    a, r = ttt_counts(draft, head, packed, k)
    assert a.tolist() == [sum(x[0][j].item() for x in inc) for j in range(k)]
    assert r.tolist() == [sum(x[1][j].item() for x in inc) for j in range(k)]
    assert a[-1] > 0, "chains reach the last depth (the check is not vacuous)"


def test_chain_counts_and_length():
    match = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    eligible = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    accepted, reached = chain_counts(match, eligible)
    assert accepted.tolist() == [3, 2, 0]  # chain 3 stops at depth 2: no supervised token there
    assert reached.tolist() == [4, 3, 1]
    est = estimate(accepted.tolist(), reached.tolist())
    assert est.per_position == [0.75, 2 / 3, 0.0]
    assert est.mean_acceptance_length == pytest.approx(1 + 0.75 + 0.5)
    assert acceptance_length([1.0, 1.0, 1.0]) == 4.0


@pytest.mark.parametrize(
    ("right", "length", "per_position"),
    [(3, 4.0, [1.0, 1.0, 1.0]), (2, 3.0, [1.0, 1.0, 0.0]), (0, 1.0, [0.0, 0.0, 0.0])],
)
def test_offline_eval_replays_verification_rounds(tiny_model, monkeypatch, right, length, per_position):
    """spec eval --offline (simulate.simulate): with a proposer right for the first `right` of k = 3 tokens
    of every round, each round accepts those and the target adds one; the proposer sees exactly the context
    vLLM's would (x_1..x_n with the target's aux states a_0..a_{n-1})."""
    from transformers import AutoModelForCausalLM

    from spec_train.algorithms import ALGORITHMS, get_algorithm
    from spec_train.simulate import aux_states, simulate

    vdir = tiny_model("llama")
    target = AutoModelForCausalLM.from_pretrained(vdir, dtype=torch.float32).eval()
    draft = init_eagle3_from_verifier(vdir, aux_layer_ids=[2, 4, 5]).eval()
    # After the prefill's token 12 and 24 tokens remain: multiples of right + 1 for every `right`.
    prompts = [[5, 17, 23, 9], [6, 40, 41]]
    continuations = [list(range(100, 113)), list(range(200, 225))]
    seqs = [p + c for p, c in zip(prompts, continuations)]
    auxes = [aux_states(target, s, [2, 4, 5]) for s in seqs]

    def propose(model, next_ids, aux, lengths, k):
        out = torch.zeros(len(lengths), k, dtype=torch.long)
        for row, n in enumerate(lengths.tolist()):
            i = next(i for i, s in enumerate(seqs) if s[1] == next_ids[row, 0])
            assert next_ids[row, :n].tolist() == seqs[i][1 : n + 1]
            torch.testing.assert_close(aux[row, :n], auxes[i][:n])
            truth = seqs[i][n + 1 : n + 1 + k]
            out[row] = torch.tensor(
                [t if j < right else 0 for j, t in enumerate(truth)] + [0] * (k - len(truth))
            )
        return out

    algo = get_algorithm("eagle3")
    monkeypatch.setitem(ALGORITHMS, "eagle3", dataclasses.replace(algo, propose=propose))
    run = simulate(draft, target, prompts, continuations, k=3)
    assert run.counters.drafts == (12 + 24) // (right + 1)
    assert run.mean_acceptance_length == length
    assert run.counters.acceptance_per_position == per_position
    assert run.generated_tokens == 13 + 25
    # per prompt: 12 and 24 tokens after the prefill's, rounds of right + 1; they add up to the total
    assert [c.drafts for c in run.per_prompt] == [12 // (right + 1), 24 // (right + 1)]
    assert [c.accepted for c in run.per_prompt] == [12 // (right + 1) * right, 24 // (right + 1) * right]
    # each round filed under the context it drafted from: the prompt and prefill's token, then right + 1 more
    want = [len(p) + 1 + j * (right + 1) for p, n in zip(prompts, (12, 24)) for j in range(n // (right + 1))]
    assert sorted(run.round_contexts) == sorted(want) and sum(run.round_accepted) == run.counters.accepted
    (bucket,) = run.by_context()  # every context under 128 tokens
    assert (bucket.lo, bucket.drafts, bucket.mean_acceptance_length) == (0, len(want), length)


@pytest.mark.parametrize("k", [1, 4])
def test_peagle_one_forward_and_vllm_style_drafting_count_the_same_chains(setup, k):
    """P-EAGLE: training's one-forward simulation over a packed row (every chain, every depth) and
    KV-cache drafting per sample (spec_models.propose_parallel, as vLLM) agree exactly."""
    from spec_models import peagle_from_eagle3
    from spec_train.algorithms import get_algorithm

    eagle3, head = setup
    draft = peagle_from_eagle3(eagle3, mask_token_id=1).eval()
    algo = get_algorithm("peagle")
    samples = [_sample(n, seed) for seed, n in enumerate([40, 61, 3, 75])]
    inc = [algo.offline_counts(draft, head, s, k, slots_per_batch=16) for s in samples]
    packed = {key: torch.cat([s[key] for s in samples]) for key in samples[0]}
    a, r = algo.accept_counts(draft, head, packed, k)
    assert a.tolist() == [sum(x[0][j].item() for x in inc) for j in range(k)]
    assert r.tolist() == [sum(x[1][j].item() for x in inc) for j in range(k)]
    assert a[-1] > 0, "chains reach the last depth (the check is not vacuous)"
