"""`spec eval`: how much faster vLLM serves the target with a draft, at identical output, and at which k.

Engines run the same prompts with the same sampling settings: the target alone (the baseline), the target
with the draft at every requested k, with n-gram speculation and, where `arctic_inference` is installed,
with suffix decoding (model-free baselines every draft must beat). Each runs one request at a time and at
the requested concurrencies.

Timing is interleaved: the baseline engine stays up, the speculative ones are started in groups of
`max_engines - 1` beside it, and every round measures the baseline and each engine of the group in turn
(the order rotating each round), so a change of load on the machine hits them alike. A speed-up is a
configuration's tokens/s over the baseline's in the same round; figures are medians over rounds with the
spread (max - min). Suffix decoding learns from every output it has seen, so it gets a fresh engine for
each measurement. Every engine first generates a warm-up prompt that is not in the measured set.

Acceptance comes from vLLM's per-request spec-decode metrics (`per_request_spec_decode_metrics`: a histogram
of accepted draft tokens per verification step, per request): mean acceptance length = 1 + accepted / drafts
(tokens per target forward), per-position rate = accepted at position i / drafts, both pooled over every
measured request; the standard error is over prompts (each prompt's requests pooled), by the ratio estimator.
"""

from __future__ import annotations

import functools
import importlib.util
import statistics
import time
from pathlib import Path

import msgspec

from spec_datagen.runtime import SpecDecodeCounters, make_llm, request_counters, shutdown_llm
from spec_format.algorithms import vllm_speculative_config
from spec_format.checkpoint import read_config
from spec_format.console import say
from spec_format.errors import SpecError
from spec_train.buckets import Bucket, by_prompt_measured, write_chart


class RunResult(msgspec.Struct):
    """One configuration at one concurrency, over the rounds."""

    concurrency: int
    output_tokens: int  # of one pass over the prompts
    seconds: float  # median over rounds
    tokens_per_second: float  # median over rounds
    tokens_per_second_spread: float = 0.0  # max - min over rounds
    tokens_per_second_rounds: list[float] = []


class ConfigResult(msgspec.Struct):
    name: str
    runs: list[RunResult]
    k: int | None = None  # draft tokens per step (None: the baseline; suffix decoding's is a maximum)
    mean_acceptance_length: float | None = None
    acceptance_length_stderr: float | None = None  # over prompts
    acceptance_per_position: list[float] | None = None
    # Of the target's decode steps, the share that checked a draft: 1 for a draft model; n-gram and suffix
    # decoding propose only on a match, and their rates are over those steps alone.
    drafted_share: float | None = None
    counters: SpecDecodeCounters | None = None
    speedup: dict[
        str, float
    ] = {}  # concurrency (as str) -> median over rounds of tokens/s over the baseline's
    speedup_spread: dict[str, float] = {}  # concurrency -> max - min of the per-round speed-ups


class KSpeed(msgspec.Struct):
    tokens_per_second: float
    tokens_per_second_spread: float
    speedup: float
    speedup_spread: float


class PerK(msgspec.Struct):
    """The draft at one k."""

    k: int
    mean_acceptance_length: float
    acceptance_length_stderr: float
    acceptance_per_position: list[float]
    per_concurrency: dict[str, KSpeed]


class Mismatch(msgspec.Struct):
    """The first token where a speculative configuration's greedy output left the target's own."""

    config: str
    prompt: int  # index in the measured set
    source: str  # FILE:LINE of that prompt
    position: int  # output token index
    expected: int | None  # the target's token (None: its output had ended)
    got: int | None
    concurrency: int
    round: int


class EvalReport(msgspec.Struct):
    draft: ConfigResult  # at `k`, the best single-stream k when several were measured
    baseline: ConfigResult
    ngram: ConfigResult | None
    outputs_identical: bool | None  # None when sampling (temperature > 0): outputs may differ by design
    num_prompts: int
    k: int
    max_tokens: int
    temperature: float
    verifier: str
    draft_dir: str
    rounds: int = 1
    best_k: int = 0  # the k of the highest median single-stream speed-up (what --write-k writes)
    best_k_by_concurrency: dict[str, int] = {}
    per_k: list[PerK] = []
    suffix: ConfigResult | None = None
    mismatches: list[Mismatch] = []  # over every speculative configuration
    written_k: dict | None = None  # {"path", "old", "new"} when --write-k wrote the draft's k
    acceptance_by_context: list[Bucket] = []  # the draft at `k`, its requests by prompt length


class OfflineDraft(msgspec.Struct):
    mean_acceptance_length: float
    acceptance_length_stderr: float  # over prompts
    acceptance_per_position: list[float]
    counters: SpecDecodeCounters


class OfflineReport(msgspec.Struct, kw_only=True):
    """`spec eval --offline`: acceptance from verification rounds replayed with the target in
    transformers (spec_train.simulate), no vLLM and no timing."""

    offline: bool = True
    num_prompts: int
    k: int
    max_tokens: int
    generated_tokens: int
    draft: OfflineDraft
    acceptance_by_context: list[Bucket] = []  # by the context each verification round started from


class Config(msgspec.Struct):
    """One engine configuration to measure."""

    name: str
    spec: dict | None  # vLLM speculative_config; None = the target alone
    k: int | None = None
    fresh: bool = False  # learns across requests: a new engine for every measurement


class Measurement(msgspec.Struct):
    outputs: list[list[int]]
    seconds: float
    per_prompt: list[SpecDecodeCounters] | None  # None without speculation


def _log(msg: str) -> None:
    say(msg, "eval")


def suffix_available() -> bool:
    """vLLM's suffix decoding needs `arctic_inference` (an optional extra, docs/eval.md)."""
    return importlib.util.find_spec("arctic_inference") is not None


def speculative_configs(
    draft_dir: str | Path, ks: list[int], baseline_k: int, *, ngram: bool, suffix: bool
) -> list[Config]:
    """What to measure besides the target alone. Validates every k (SpecError) before any engine starts."""
    cfg = read_config(draft_dir)[0]
    configs = [Config(f"draft k={k}", vllm_speculative_config(cfg, str(draft_dir), k), k) for k in ks]
    if ngram:
        spec = {
            "method": "ngram",
            "num_speculative_tokens": baseline_k,
            "prompt_lookup_max": 4,
            "prompt_lookup_min": 2,
        }
        configs.append(Config("ngram", spec, baseline_k))
    if suffix:
        # vLLM's default tree depth (24) caps the tokens it proposes; it chooses how many per step.
        configs.append(Config("suffix", {"method": "suffix"}, None, fresh=True))
    return configs


def _start(
    config: Config, *, verifier: str, max_seqs: int, warmup: list[int], params, concurrencies: list[int]
):
    _log(f"{config.name}: starting vLLM" + (f" with {config.spec}" if config.spec else ""))
    kwargs = {"max_num_seqs": max_seqs}
    if config.spec:
        kwargs.update(speculative_config=config.spec, per_request_spec_decode_metrics="summary")
    start = time.perf_counter()
    llm = make_llm(verifier, **kwargs)
    # Warm-up on a prompt outside the measured set, alone and in a batch of the largest concurrency.
    for c in sorted({1, max(concurrencies)}):
        llm.generate([{"prompt_token_ids": warmup}] * c, params, use_tqdm=False)
    _log(f"{config.name}: ready in {time.perf_counter() - start:.0f} s")
    return llm


def _measure(llm, *, prompts: list[list[int]], params, concurrency: int, spec: bool) -> Measurement:
    """Generate in groups of `concurrency` requests, one group at a time; only generate() is timed."""
    outputs, per_prompt, seconds = [], [], 0.0
    for i in range(0, len(prompts), concurrency):
        group = [{"prompt_token_ids": p} for p in prompts[i : i + concurrency]]
        start = time.perf_counter()
        results = llm.generate(group, params, use_tqdm=False)
        seconds += time.perf_counter() - start
        for out in results:
            outputs.append(list(out.outputs[0].token_ids))
            if spec:
                per_prompt.append(request_counters(out.outputs[0].spec_decode_metrics))
    return Measurement(outputs, seconds, per_prompt if spec else None)


def _interleaved(base_cfg: Config, configs: list[Config], concurrencies: list[int], rounds: int, group_size: int,
                 start, measure) -> tuple[dict, dict]:  # fmt: skip
    """The baseline engine stays up; the speculative configurations go in groups of `group_size` engines
    beside it, and each round measures the baseline and every configuration of the group in turn (the order
    rotated each round). Returns measured[name][concurrency] -> [Measurement] (the baseline's: one per round
    per group) and speedups[name][concurrency] -> [tokens/s over the same round's baseline]."""
    measured = {c.name: {n: [] for n in concurrencies} for c in [base_cfg, *configs]}
    speedups = {c.name: {n: [] for n in concurrencies} for c in configs}
    baseline = start(base_cfg)
    try:
        for g in range(0, len(configs), group_size):
            group = configs[g : g + group_size]
            live = {c.name: start(c) for c in group if not c.fresh}
            try:
                for r in range(rounds):
                    order = [base_cfg, *group]
                    tps: dict[str, dict[int, float]] = {c.name: {} for c in order}
                    for config in order[r % len(order) :] + order[: r % len(order)]:
                        for n in concurrencies:
                            llm = baseline if config is base_cfg else live.get(config.name) or start(config)
                            try:
                                m = measure(llm, concurrency=n, spec=config.spec is not None)
                            finally:
                                if config.fresh:
                                    shutdown_llm(llm)
                            measured[config.name][n].append(m)
                            tokens = sum(len(o) for o in m.outputs)
                            tps[config.name][n] = tokens / m.seconds if m.seconds else 0.0
                            _log(f"round {r + 1}/{rounds}: {config.name} @ concurrency {n}: {tokens} tokens in "
                                 f"{m.seconds:.1f} s = {tps[config.name][n]:.1f} tok/s")  # fmt: skip
                    for config in group:
                        for n, b in tps["baseline"].items():
                            speedups[config.name][n].append(tps[config.name][n] / b if b else 0.0)
            finally:
                for llm in live.values():
                    shutdown_llm(llm)
    finally:
        shutdown_llm(baseline)
    return measured, speedups


def _spread(values: list[float]) -> float:
    return max(values) - min(values) if values else 0.0


def first_difference(reference: list[list[int]], outputs: list[list[int]]) -> tuple[int, int] | None:
    """(prompt index, token position) of the first token where `outputs` leaves `reference`, or None."""
    for i, (ref, out) in enumerate(zip(reference, outputs, strict=True)):
        if ref != out:
            pos = next((j for j, (a, b) in enumerate(zip(ref, out)) if a != b), min(len(ref), len(out)))
            return i, pos
    return None


def acceptance_stderr(per_prompt: list[SpecDecodeCounters]) -> float:
    """Standard error over prompts of the pooled acceptance length 1 + sum(a) / sum(d) (ratio estimator:
    sqrt(sum((a_i - r d_i)^2) / (n (n - 1))) / mean(d))."""
    n = len(per_prompt)
    drafts = sum(c.drafts for c in per_prompt)
    if n < 2 or drafts == 0:
        return 0.0
    r = sum(c.accepted for c in per_prompt) / drafts
    var = sum((c.accepted - r * c.drafts) ** 2 for c in per_prompt) / (n * (n - 1))
    return var**0.5 / (drafts / n)


def evaluate(
    draft_dir: str | Path,
    verifier: str,
    prompts: list[list[int]],
    *,
    ks: list[int],
    warmup: list[int],
    sources: list[str] | None = None,
    baseline_k: int | None = None,
    max_tokens: int = 128,
    temperature: float = 0.0,
    concurrencies: list[int] = (1,),
    ngram: bool = True,
    suffix: bool = False,
    rounds: int = 3,
    max_engines: int = 3,
    seed: int = 0,
) -> EvalReport:
    """Measure the target alone, the draft at every k in `ks`, n-gram (at `baseline_k`, default ks[0])
    and suffix decoding on `prompts` (token ids) in interleaved rounds, and compare."""
    from vllm import SamplingParams

    if warmup in prompts:
        raise SpecError("the warm-up prompt is one of the measured prompts; pick another")
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed)
    concurrencies = sorted(
        {1, *concurrencies}
    )  # single-stream figures always (best_k is the single-stream best)
    baseline_k = baseline_k or ks[0]
    configs = speculative_configs(draft_dir, ks, baseline_k, ngram=ngram, suffix=suffix)
    base_cfg = Config("baseline", None)
    start = functools.partial(_start, verifier=verifier, max_seqs=max(concurrencies), warmup=warmup, params=params,
                              concurrencies=concurrencies)  # fmt: skip
    measure = functools.partial(_measure, prompts=prompts, params=params)
    measured, speedups = _interleaved(
        base_cfg, configs, concurrencies, rounds, max(max_engines - 1, 1), start, measure
    )

    results = {c.name: _summarise(c, measured[c.name], speedups.get(c.name)) for c in [base_cfg, *configs]}
    draft_results = [results[f"draft k={k}"] for k in ks]
    per_k = [
        PerK(
            k=d.k, mean_acceptance_length=d.mean_acceptance_length, acceptance_length_stderr=d.acceptance_length_stderr,
            acceptance_per_position=d.acceptance_per_position,
            per_concurrency={
                str(run.concurrency): KSpeed(run.tokens_per_second, run.tokens_per_second_spread,
                                             d.speedup[str(run.concurrency)], d.speedup_spread[str(run.concurrency)])
                for run in d.runs
            },
        )
        for d in draft_results
    ]  # fmt: skip
    # Highest median speed-up; ties go to the smaller k (cheaper to draft).
    best = {
        str(n): max(per_k, key=lambda p: (p.per_concurrency[str(n)].speedup, -p.k)).k for n in concurrencies
    }
    mismatches = []
    if temperature == 0.0:
        mismatches = find_mismatches(measured, [c.name for c in configs], sources)
        for m in mismatches:
            _log(
                f"greedy output with {m.config} differs from the target's: prompt {m.prompt} ({m.source}), token {m.position}, concurrency {m.concurrency}, round {m.round}"
            )
    draft = results[f"draft k={best['1']}"]
    return EvalReport(
        draft=draft, baseline=results["baseline"], ngram=results.get("ngram"), suffix=results.get("suffix"),
        outputs_identical=None if temperature else not mismatches, num_prompts=len(prompts), k=draft.k,
        max_tokens=max_tokens, temperature=temperature, verifier=str(verifier), draft_dir=str(draft_dir),
        rounds=rounds, best_k=best["1"], best_k_by_concurrency=best, per_k=per_k, mismatches=mismatches,
        acceptance_by_context=by_prompt_measured([len(p) for p in prompts], measured[draft.name]),
    )  # fmt: skip


def offline_report(
    draft_dir, verifier: str, prompts: list[list[int]], k: int, max_tokens: int
) -> OfflineReport:
    """`spec eval --offline`: the draft's acceptance at k over `prompts`, the target in transformers."""
    from spec_train.simulate import simulate_draft

    run = simulate_draft(draft_dir, verifier, prompts, k, max_tokens)
    draft = OfflineDraft(
        mean_acceptance_length=run.mean_acceptance_length,
        acceptance_length_stderr=acceptance_stderr(run.per_prompt),
        acceptance_per_position=run.counters.acceptance_per_position,
        counters=run.counters,
    )
    return OfflineReport(num_prompts=len(prompts), k=k, max_tokens=max_tokens,
                         generated_tokens=run.generated_tokens, draft=draft,
                         acceptance_by_context=run.by_context())  # fmt: skip


def find_mismatches(
    measured: dict[str, dict[int, list[Measurement]]], names: list[str], sources: list[str] | None = None
) -> list[Mismatch]:
    """Every speculative configuration's outputs against the baseline's first pass at the same
    concurrency; the first difference of each configuration."""
    out = []
    for name in names:
        for n, ms in measured[name].items():
            reference = measured["baseline"][n][0].outputs
            diff = next(
                ((r, d) for r, m in enumerate(ms) if (d := first_difference(reference, m.outputs))), None
            )
            if diff is None:
                continue
            r, (i, pos) = diff
            got = ms[r].outputs[i]
            out.append(Mismatch(
                config=name, prompt=i, source=sources[i] if sources else "", position=pos,
                expected=reference[i][pos] if pos < len(reference[i]) else None,
                got=got[pos] if pos < len(got) else None, concurrency=n, round=r + 1,
            ))  # fmt: skip
            break
    return out


def mismatch_message(m: Mismatch) -> str:
    where = f"prompt {m.prompt}" + (f" ({m.source})" if m.source else "")
    return (
        f"greedy output with {m.config} differs from the target alone at {where}, output token {m.position} "
        f"(target {m.expected}, with speculation {m.got}; concurrency {m.concurrency}, round {m.round}): "
        "vLLM's verification should keep it identical, so this is a numerical or engine problem "
        "(--allow-mismatch only warns)"
    )


def _summarise(
    config: Config, by_conc: dict[int, list[Measurement]], speedups: dict[int, list[float]] | None
) -> ConfigResult:
    runs = []
    for n, ms in by_conc.items():
        tps = [sum(len(o) for o in m.outputs) / m.seconds if m.seconds else 0.0 for m in ms]
        runs.append(RunResult(
            concurrency=n, output_tokens=sum(len(o) for o in ms[0].outputs),
            seconds=statistics.median(m.seconds for m in ms), tokens_per_second=statistics.median(tps),
            tokens_per_second_spread=_spread(tps), tokens_per_second_rounds=tps,
        ))  # fmt: skip
    result = ConfigResult(name=config.name, runs=runs, k=config.k)
    if config.spec is None:
        return result
    # Each prompt's requests over every round and concurrency, pooled.
    n_prompts = len(next(iter(by_conc.values()))[0].per_prompt)
    per_prompt = [SpecDecodeCounters() for _ in range(n_prompts)]
    for ms in by_conc.values():
        for m in ms:
            per_prompt = [a + b for a, b in zip(per_prompt, m.per_prompt)]
    total = sum(per_prompt, SpecDecodeCounters())
    result.counters = total
    result.mean_acceptance_length = total.mean_acceptance_length
    result.acceptance_per_position = total.acceptance_per_position
    result.acceptance_length_stderr = acceptance_stderr(per_prompt)
    # Each request's first token comes from its prefill; every decode step after it emits 1 + its accepted.
    every = [m for ms in by_conc.values() for m in ms]
    steps = (
        sum(len(o) for m in every for o in m.outputs) - sum(len(m.outputs) for m in every) - total.accepted
    )
    result.drafted_share = min(1.0, total.drafts / steps) if steps > 0 else None
    result.speedup = {str(n): statistics.median(v) for n, v in speedups.items()}
    result.speedup_spread = {str(n): _spread(v) for n, v in speedups.items()}
    _log(
        f"{config.name}: mean acceptance length {total.mean_acceptance_length:.3f} ± {result.acceptance_length_stderr:.3f}, "
        "per position " + ", ".join(f"{a:.3f}" for a in total.acceptance_per_position)
    )
    return result


def _axes(figsize=(6.4, 3.8)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def acceptance_series(result: dict) -> dict[str, list[float]]:
    """acceptance.png's lines of an eval report: label -> accepted / drafts at each draft position. Methods
    that draft only on a match say on which share of the steps they did: their rates are over those."""
    if result.get("offline"):
        return {"draft (offline)": result["draft"]["acceptance_per_position"]}
    out = {f"draft, k={p['k']}": p["acceptance_per_position"] for p in result["per_k"]}
    for name, label in (("ngram", "n-gram"), ("suffix", "suffix decoding")):
        r = result.get(name)
        if r:
            k, share = f", k={r['k']}" if r.get("k") else "", r.get("drafted_share")
            on = f"drafted on {share:.0%} of steps, " if share is not None else ""
            out[f"{label}{k} ({on}rates over those steps)"] = r["acceptance_per_position"]
    return out


def acceptance_figure(per_position: dict[str, list[float]], title: str):
    """Accepted / drafts at each draft position (integer ticks), one line per configuration (e.g. per k),
    each in its own style (metrics.STYLES: where k = 2, 3, 4 agree, a hollow marker a size smaller than the
    last shows inside it); a configuration that never drafted is named in the legend alone."""
    from spec_train.metrics import STYLES

    fig, ax = _axes()
    n = max((len(r) for r in per_position.values()), default=1)
    for i, (name, rates) in enumerate(per_position.items()):
        marker, dash = STYLES[i % len(STYLES)]
        if not rates:
            ax.plot([], [], " ", label=f"{name}: no drafts")
            continue
        ax.plot(range(1, len(rates) + 1), rates, marker=marker, linestyle=dash, markersize=10 - 1.5 * (i % 4),
                markerfacecolor="none", markeredgewidth=1.5, label=name)  # fmt: skip
    ax.set_xticks(range(1, n + 1))
    ax.set(xlabel="draft position", ylabel="accepted / drafts", ylim=(0, 1), xlim=(0.7, n + 0.3), title=title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def speed_figure(report: dict, title: str):
    """Median tokens/s against k: one line per method and concurrency (the draft over every k measured,
    n-gram at its k, the target alone and suffix decoding, which picks its own k, as horizontal lines);
    vertical bars span each point's spread over rounds."""
    fig, ax = _axes()
    ks = [p["k"] for p in report["per_k"]]
    ngram_k = [report["ngram"]["k"]] if report.get("ngram") else []
    lo, hi = min(ks + ngram_k), max(ks)
    for c in sorted(report["per_k"][0]["per_concurrency"], key=int):
        ys = [p["per_concurrency"][c]["tokens_per_second"] for p in report["per_k"]]
        spread = [p["per_concurrency"][c]["tokens_per_second_spread"] for p in report["per_k"]]
        (line,) = ax.plot(ks, ys, marker="o", label=f"draft, concurrency {c}")
        ax.vlines(
            ks,
            [y - s / 2 for y, s in zip(ys, spread)],
            [y + s / 2 for y, s in zip(ys, spread)],
            color=line.get_color(),
        )
        for name, style in (("baseline", "--"), ("suffix", ":")):
            entry = report.get(name)
            if entry:
                run = next(r for r in entry["runs"] if str(r["concurrency"]) == c)
                label = "target alone" if name == "baseline" else "suffix decoding"
                ax.plot(
                    [lo, hi],
                    [run["tokens_per_second"]] * 2,
                    style,
                    color=line.get_color(),
                    label=f"{label}, concurrency {c}",
                )
        if report.get("ngram"):
            run = next(r for r in report["ngram"]["runs"] if str(r["concurrency"]) == c)
            ax.plot(
                [report["ngram"]["k"]],
                [run["tokens_per_second"]],
                "s",
                color=line.get_color(),
                label=f"n-gram, concurrency {c}",
            )
    ax.set(xlabel="k (draft tokens per step)", ylabel="output tokens/s (median)", title=title)
    ax.set_xticks(sorted({*ks, *ngram_k}))
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    return fig


def write_report(result: dict, out: str | Path, title: str) -> None:
    """eval.json, acceptance.png (per position, every k and baseline) and, with vLLM timings, speed.png."""
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out / "eval.json")
    figures = {"acceptance.png": acceptance_figure(acceptance_series(result), title)}
    if not result.get("offline"):
        figures["speed.png"] = speed_figure(result, title)
    import matplotlib.pyplot as plt

    for name, fig in figures.items():
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
    write_chart(result, out, title)
