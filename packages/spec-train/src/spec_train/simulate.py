"""Greedy speculative decoding simulated without vLLM (`spec eval --offline`).

The target runs in transformers: it generates its greedy continuation of each prompt, then one forward over
prompt + continuation gives the hidden states at the draft's auxiliary layers (vLLM's capture id k =
transformers' hidden_states[k]). Verification rounds are then replayed exactly as vLLM runs them: with the
context x_0..x_n, the draft proposes k tokens (its algorithm's `propose`, which matches vLLM's proposer token for
token); the longest prefix equal to the target's own tokens is accepted; the target adds one token; the next
round starts after it. The target's hidden states do not depend on speculation, so one forward serves every
round. Counting drafts and accepted tokens per position the way vLLM counts them gives the same mean
acceptance length, without a vLLM engine.
"""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec
import torch

from spec_datagen.runtime import SpecDecodeCounters


class SimulatedRun(msgspec.Struct):
    counters: SpecDecodeCounters
    generated_tokens: int
    per_prompt: list[SpecDecodeCounters] = []  # the same counters for each prompt alone (standard errors)
    # Every verification round: the context it drafted from (tokens) and how many drafts it accepted.
    round_contexts: list[int] = []
    round_accepted: list[int] = []

    @property
    def mean_acceptance_length(self) -> float:
        return self.counters.mean_acceptance_length

    def by_context(self) -> list:
        """Acceptance per context-length bucket (spec_train.buckets.Bucket)."""
        from spec_train.buckets import by_round

        return by_round(
            self.round_contexts,
            self.round_accepted,
            self.counters.draft_tokens // max(self.counters.drafts, 1),
        )


@torch.no_grad()
def greedy_continuations(
    target, prompts: list[list[int]], max_tokens: int, eos_ids: list[int], batch: int = 8
) -> list[list[int]]:
    """The target's greedy continuation of each prompt (stops after an end-of-turn id), batched with left
    padding. The pad id never reaches the model's view: the attention mask hides it."""
    outs: list[list[int]] = []
    for i in range(0, len(prompts), batch):
        group = prompts[i : i + batch]
        width = max(len(p) for p in group)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        gen = target.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
            eos_token_id=eos_ids, pad_token_id=eos_ids[0],
        )  # fmt: skip
        for row in gen[:, width:].tolist():
            cut = next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))
            outs.append(row[:cut])
    return outs


@torch.no_grad()
def aux_states(target, sequence: list[int], layer_ids: list[int]) -> torch.Tensor:
    """[T, len(layer_ids) * H]: the target's states at the aux capture ids (all < L), concatenated."""
    out = target(torch.tensor([sequence]), output_hidden_states=True)
    return torch.cat([out.hidden_states[k][0] for k in layer_ids], dim=-1)


@torch.no_grad()
def target_states(target, sequence: list[int]):
    """[L + 1, T, H]: the target's residual stream at every capture id 0..L (id L before the final norm,
    as vLLM captures it; transformers' hidden_states[L] is after it)."""
    grabbed = {}

    def hook(_module, _inputs, output):
        grabbed["last"] = output[0] if isinstance(output, tuple) else output

    handle = target.model.layers[-1].register_forward_hook(hook)
    try:
        out = target(torch.tensor([sequence]), output_hidden_states=True)
    finally:
        handle.remove()
    return torch.stack([*out.hidden_states[:-1], grabbed["last"]])[:, 0]


@torch.no_grad()
def simulate(
    draft, target, prompts: list[list[int]], continuations: list[list[int]], k: int,
    auxes: list[torch.Tensor] | None = None,
) -> SimulatedRun:  # fmt: skip
    """Replay vLLM's greedy verification rounds for each prompt; all prompts' rounds run as one batch.
    `auxes`: each sequence's aux_states at the draft's layers, where the caller has them already (a study
    measuring many drafts of the same target computes them once)."""
    from spec_train.algorithms import get_algorithm

    propose = get_algorithm(draft.config.algorithm).propose

    seqs = [p + c for p, c in zip(prompts, continuations)]
    if auxes is None:
        auxes = [aux_states(target, s, draft.config.aux_layer_ids) for s in seqs]
    # Context end n: tokens s[0..n] are known; the target's prefill already emitted s[len(prompt)].
    ends = [len(p) for p in prompts]
    drafts, accepted = 0, [0] * k
    prompt_drafts, prompt_accepted = [0] * len(seqs), [[0] * k for _ in seqs]
    round_contexts, round_accepted = [], []
    while True:
        live = [i for i, s in enumerate(seqs) if ends[i] + 1 < len(s)]
        if not live:
            break
        width = max(ends[i] for i in live)
        next_ids = torch.zeros(len(live), width, dtype=torch.long)
        aux = torch.zeros(len(live), width, auxes[0].shape[-1])
        for row, i in enumerate(live):
            n = ends[i]
            next_ids[row, :n] = torch.tensor(seqs[i][1 : n + 1])  # x_1..x_n
            aux[row, :n] = auxes[i][:n]  # a_0..a_{n-1}
        lengths = torch.tensor([ends[i] for i in live])
        proposals = propose(draft, next_ids, aux.to(draft.fc.weight.dtype), lengths, k).tolist()
        for row, i in enumerate(live):
            truth = seqs[i][ends[i] + 1 : ends[i] + 1 + k]
            n_acc = 0
            while n_acc < len(truth) and proposals[row][n_acc] == truth[n_acc]:
                accepted[n_acc] += 1
                prompt_accepted[i][n_acc] += 1
                n_acc += 1
            drafts += 1
            prompt_drafts[i] += 1
            round_contexts.append(ends[i] + 1)  # x_0..x_n known when drafting
            round_accepted.append(n_acc)
            ends[i] += n_acc + 1  # the accepted drafts plus the target's own next token
    counters = SpecDecodeCounters(
        drafts=drafts, draft_tokens=drafts * k, accepted=sum(accepted), accepted_per_position=accepted
    )
    per_prompt = [
        SpecDecodeCounters(drafts=d, draft_tokens=d * k, accepted=sum(a), accepted_per_position=a)
        for d, a in zip(prompt_drafts, prompt_accepted)
    ]
    return SimulatedRun(
        counters, sum(len(c) for c in continuations), per_prompt, round_contexts, round_accepted
    )


def simulate_draft(
    draft_dir: str | Path, verifier: str | Path, prompts: list[list[int]], k: int | None, max_tokens: int
) -> SimulatedRun:
    """Load the draft (spec-models) and the target (transformers, fp32) and simulate greedy decoding."""
    from transformers import AutoModelForCausalLM

    from spec_datagen.template import end_of_turn_ids, load_tokenizer
    from spec_models import load

    draft = load(draft_dir).float().eval()
    k = k or draft.config.speculative_tokens
    target = AutoModelForCausalLM.from_pretrained(verifier, dtype=torch.float32).eval()
    eos = end_of_turn_ids(verifier, load_tokenizer(verifier))
    print(
        f"[eval --offline] target greedy continuations of {len(prompts)} prompts", file=sys.stderr, flush=True
    )
    continuations = greedy_continuations(target, prompts, max_tokens, eos)
    print(f"[eval --offline] replaying verification rounds with k={k}", file=sys.stderr, flush=True)
    return simulate(draft, target, prompts, continuations, k)
