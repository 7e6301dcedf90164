"""`spec eval`: how much faster vLLM serves the target with a draft, at identical output.

Three engines run the same prompts with the same sampling settings: (a) the target alone, (b) the target
with the draft, (c) the target with n-gram speculation (a model-free baseline every draft must beat).
Each runs at a single stream (one request at a time) and at the requested concurrencies. vLLM's own
spec-decode counters give the acceptance: mean acceptance length = 1 + accepted / drafts (tokens per target
forward), per-position rate = accepted at position i / drafts.
"""

from __future__ import annotations

import time
from pathlib import Path

import msgspec

from spec_datagen.runtime import SpecDecodeCounters, make_llm, shutdown_llm, spec_decode_counters
from spec_format.algorithms import vllm_speculative_config
from spec_format.checkpoint import read_config
from spec_format.console import say

CONFIGS = ("baseline", "draft", "ngram")


class RunResult(msgspec.Struct):
    """One engine at one concurrency."""

    concurrency: int
    output_tokens: int
    seconds: float
    tokens_per_second: float


class ConfigResult(msgspec.Struct):
    name: str
    runs: list[RunResult]
    mean_acceptance_length: float | None = None
    acceptance_per_position: list[float] | None = None
    counters: SpecDecodeCounters | None = None
    speedup: dict[str, float] = {}  # concurrency (as str) -> tokens/s over the baseline's


class EvalReport(msgspec.Struct):
    draft: ConfigResult
    baseline: ConfigResult
    ngram: ConfigResult | None
    outputs_identical: bool | None  # None when sampling (temperature > 0): outputs may differ by design
    num_prompts: int
    k: int
    max_tokens: int
    temperature: float
    verifier: str
    draft_dir: str


def _log(msg: str) -> None:
    say(msg, "eval")


def _generate(llm, prompts: list[list[int]], params, concurrency: int) -> tuple[list[list[int]], RunResult]:
    """Generate in groups of `concurrency` requests (one group at a time); returns outputs in order."""
    outputs: list[list[int]] = []
    start = time.perf_counter()
    for i in range(0, len(prompts), concurrency):
        group = [{"prompt_token_ids": p} for p in prompts[i : i + concurrency]]
        for out in llm.generate(group, params, use_tqdm=False):
            outputs.append(list(out.outputs[0].token_ids))
    seconds = time.perf_counter() - start
    tokens = sum(len(o) for o in outputs)
    return outputs, RunResult(concurrency, tokens, seconds, tokens / seconds if seconds else 0.0)


def run_config(
    name: str,
    verifier: str,
    prompts: list[list[int]],
    params,
    concurrencies: list[int],
    speculative_config: dict | None,
) -> tuple[ConfigResult, list[list[int]]]:
    """Start one engine, warm it up, run every concurrency, read the counters, stop it."""
    _log(f"{name}: starting vLLM" + (f" with {speculative_config}" if speculative_config else ""))
    kwargs = {"disable_log_stats": False, "max_num_seqs": max(max(concurrencies), 1)}
    if speculative_config:
        kwargs["speculative_config"] = speculative_config
    llm = make_llm(verifier, **kwargs)
    try:
        _generate(llm, prompts[:1], params, 1)  # warm-up: first-call costs stay out of the timings
        before = spec_decode_counters(llm) if speculative_config else None
        runs, first_outputs = [], None
        for c in concurrencies:
            outputs, run = _generate(llm, prompts, params, c)
            first_outputs = first_outputs or outputs
            runs.append(run)
            _log(
                f"{name}: concurrency {c}: {run.output_tokens} tokens in {run.seconds:.1f} s = {run.tokens_per_second:.1f} tok/s"
            )
        result = ConfigResult(name=name, runs=runs)
        if speculative_config:
            counters = spec_decode_counters(llm) - before
            result.counters = counters
            result.mean_acceptance_length = counters.mean_acceptance_length
            result.acceptance_per_position = counters.acceptance_per_position
            _log(
                f"{name}: mean acceptance length {counters.mean_acceptance_length:.3f}, per position "
                + ", ".join(f"{a:.3f}" for a in counters.acceptance_per_position)
            )
        return result, first_outputs
    finally:
        shutdown_llm(llm)


def evaluate(
    draft_dir: str | Path,
    verifier: str,
    prompts: list[list[int]],
    *,
    k: int,
    max_tokens: int = 128,
    temperature: float = 0.0,
    concurrencies: list[int] = (1,),
    ngram: bool = True,
    seed: int = 0,
) -> EvalReport:
    """Run (a) baseline, (b) draft, (c) n-gram on `prompts` (token ids) and compare."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed)
    concurrencies = sorted(set(concurrencies))
    baseline, base_out = run_config("baseline", verifier, prompts, params, concurrencies, None)
    spec = vllm_speculative_config(read_config(draft_dir)[0], str(draft_dir), k)
    draft, draft_out = run_config("draft", verifier, prompts, params, concurrencies, spec)
    ngram_result = None
    if ngram:
        spec = {
            "method": "ngram",
            "num_speculative_tokens": k,
            "prompt_lookup_max": 4,
            "prompt_lookup_min": 2,
        }
        ngram_result, _ = run_config("ngram", verifier, prompts, params, concurrencies, spec)
    for result in (draft, ngram_result):
        if result is not None:
            result.speedup = {
                str(r.concurrency): r.tokens_per_second / b.tokens_per_second if b.tokens_per_second else 0.0
                for r, b in zip(result.runs, baseline.runs)
            }
    identical = None
    if temperature == 0.0:
        identical = base_out == draft_out
        if not identical:
            differ = sum(a != b for a, b in zip(base_out, draft_out))
            _log(
                f"WARNING: greedy outputs with the draft differ from those without it for {differ} of {len(prompts)} prompts"
            )
    return EvalReport(
        draft=draft, baseline=baseline, ngram=ngram_result, outputs_identical=identical, num_prompts=len(prompts),
        k=k, max_tokens=max_tokens, temperature=temperature, verifier=str(verifier), draft_dir=str(draft_dir),
    )  # fmt: skip


def plot_acceptance(per_position: dict[str, list[float]], path: str | Path, title: str) -> None:
    """Bar chart of per-position acceptance rates, one group of bars per method (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [n for n, v in per_position.items() if v]
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        rates = per_position[name]
        xs = [p + 1 + (i - (len(names) - 1) / 2) * width for p in range(len(rates))]
        ax.bar(xs, rates, width=width, label=name)
    ax.set_xlabel("draft position")
    ax.set_ylabel("accepted / drafts")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
