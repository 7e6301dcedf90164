"""Acceptance per context-length bucket: does the draft hold up on long contexts?

A draft trained on samples of at most N tokens has never seen rotary positions past N, nor attended over
that much context; acceptance often falls there. Buckets are powers of two of the context length in
tokens: [0, 128), [128, 256), [256, 512), ... The offline estimate (spec_train.simulate) files every
verification round under the context it drafted from (prompt + tokens generated so far); vLLM's
per-request counters have no per-step context, so `spec eval` in vLLM files each request's rounds under its
prompt's length.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from spec_datagen.runtime import SpecDecodeCounters

FIRST_EDGE = 128


class Bucket(msgspec.Struct):
    lo: int  # context tokens in [lo, hi)
    hi: int
    drafts: int
    mean_acceptance_length: float  # 1 + accepted / drafts
    acceptance_per_position: list[float]  # accepted at position i / drafts


def bucket_lo(context: int) -> int:
    """The lower edge of a context length's bucket: 0, 128, 256, 512, ..."""
    lo = FIRST_EDGE
    if context < lo:
        return 0
    while context >= 2 * lo:
        lo *= 2
    return lo


def _bucket(lo: int, c: SpecDecodeCounters) -> Bucket:
    return Bucket(
        lo=lo, hi=2 * lo if lo else FIRST_EDGE, drafts=c.drafts,
        mean_acceptance_length=c.mean_acceptance_length, acceptance_per_position=c.acceptance_per_position,
    )  # fmt: skip


def _pool(items: list[tuple[int, SpecDecodeCounters]]) -> list[Bucket]:
    pooled: dict[int, SpecDecodeCounters] = {}
    for context, c in items:
        lo = bucket_lo(context)
        pooled[lo] = pooled[lo] + c if lo in pooled else c
    return [_bucket(lo, pooled[lo]) for lo in sorted(pooled) if pooled[lo].drafts]


def round_counters(accepted: int, k: int) -> SpecDecodeCounters:
    """One verification round of k drafted tokens whose first `accepted` were accepted."""
    per_position = [1 if j < accepted else 0 for j in range(k)]
    return SpecDecodeCounters(drafts=1, draft_tokens=k, accepted=accepted, accepted_per_position=per_position)


def by_round(contexts: list[int], accepted: list[int], k: int) -> list[Bucket]:
    """Buckets of verification rounds: round r drafted from contexts[r] tokens and had accepted[r]."""
    return _pool([(n, round_counters(a, k)) for n, a in zip(contexts, accepted, strict=True)])


def by_prompt(prompt_lengths: list[int], per_prompt: list[SpecDecodeCounters]) -> list[Bucket]:
    """Buckets of requests by prompt length (vLLM's counters are per request, not per step)."""
    return _pool(list(zip(prompt_lengths, per_prompt, strict=True)))


def by_prompt_measured(prompt_lengths: list[int], measurements: dict[int, list]) -> list[Bucket]:
    """by_prompt over every measurement of one configuration (evaluate.Measurement per concurrency and
    round), each prompt's requests pooled."""
    per_prompt = [SpecDecodeCounters() for _ in prompt_lengths]
    for ms in measurements.values():
        for m in ms:
            per_prompt = [a + b for a, b in zip(per_prompt, m.per_prompt, strict=True)]
    return by_prompt(prompt_lengths, per_prompt)


def figure(series: dict[str, list[dict]], title: str):
    """Mean acceptance length per context-length bucket, one line per series; each point is labelled with
    its number of verification rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    edges = sorted({b["lo"] for buckets in series.values() for b in buckets})
    x = {lo: i for i, lo in enumerate(edges)}
    for name, buckets in series.items():
        xs = [x[b["lo"]] for b in buckets]
        ys = [b["mean_acceptance_length"] for b in buckets]
        ax.plot(xs, ys, marker="o", label=name)
        for xi, yi, b in zip(xs, ys, buckets):
            ax.annotate(str(b["drafts"]), (xi, yi), textcoords="offset points", xytext=(0, 5), fontsize="x-small",
                        ha="center")  # fmt: skip
    ax.set_xticks(
        range(len(edges)), [f"{lo}-{2 * lo if lo else FIRST_EDGE}" for lo in edges], fontsize="small"
    )
    ax.set(xlabel="context length (tokens)", ylabel="mean acceptance length", title=title)
    ax.set_ylim(bottom=1.0)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def write_chart(result: dict, out: str | Path, title: str) -> None:
    """acceptance_by_context.png beside eval.json, when the report has buckets."""
    buckets = result.get("acceptance_by_context")
    if not buckets:
        return
    import matplotlib.pyplot as plt

    name = "draft (offline)" if result.get("offline") else f"draft, k={result['k']} (by prompt length)"
    fig = figure({name: buckets}, title)
    fig.savefig(Path(out) / "acceptance_by_context.png", dpi=120)
    plt.close(fig)
