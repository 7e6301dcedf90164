"""Prompt synthesis by the target itself (Magpie: Xu et al., 2024, "Magpie: Alignment Data Synthesis from
Scratch by Prompting Aligned LLMs with Nothing").

An aligned chat model given only its template's user-turn prefix (e.g. SmolLM2's
"<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n") writes a user message, and stops at its
end-of-turn token. The prefix is read off the chat template itself: a conversation with one sentinel user
message is rendered and cut before the sentinel, so any template works (a default system prompt that the
template adds comes along). With topics, each prompt is seeded by a system message naming its topic
(the seeding system message is not part of the written row). Small models ignore such a system message;
openers steer them instead: the user message starts with the opener's words ("Write a Python function
that") and the target writes the rest, so a mix of openers gives a mix of requests.

Every generated prompt passes filters before it counts: it must end at the end-of-turn token (not at
max_tokens), hold between min_words and max_words words, carry no template markup, not be degenerate
(repeated word 3-grams, long runs of one character, little text), and not duplicate an earlier prompt,
exactly (after case and whitespace folding) or nearly (MinHash over character 5-grams, estimated Jaccard
similarity at or above `near_dup`). Prompts are judged in the order they were requested and each is
sampled with a seed derived from (seed, attempt), so a run is reproducible whatever the batching.
"""

from __future__ import annotations

import hashlib
import os
import re
import statistics
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from spec_datagen.conversations import BadRow, Conversation, Message, write_rows
from spec_datagen.regenerate import Regenerator, RegenStats, RegenSummary, Sampling
from spec_datagen.runtime import default_context, make_llm, run_in_order, shutdown_llm
from spec_datagen.template import ChatRenderer
from spec_format.errors import SpecError

SENTINEL = "SPECUSERMESSAGEPROBE"
TOPIC_SYSTEM = "You are a helpful AI assistant. The user asks you about {topic}."
REJECT_REASONS = (
    "truncated",
    "empty",
    "markup",
    "too_short",
    "too_long",
    "repetitive",
    "not_text",
    "duplicate",
    "near_duplicate",
)
LENGTH_BINS = (5, 10, 20, 40, 80, 160)  # upper bounds (words) of the histogram's bins; the last is open


def user_turn_prefix(renderer: ChatRenderer, system: str | None = None) -> str:
    """The template's text up to where a user message starts (with `system` as the system message)."""
    if not renderer.has_template:
        raise SpecError(
            "the target's tokenizer has no chat template: prompt synthesis needs an aligned chat model, whose "
            "template's user-turn prefix makes it write a user message (pass --chat-template FILE otherwise)"
        )
    messages = [Message("system", system)] if system is not None else []
    try:
        text = renderer.render(Conversation(messages + [Message("user", SENTINEL)]))
    except BadRow as e:
        what = (
            "a system message (so --topics cannot seed it)" if system is not None else "a lone user message"
        )
        raise SpecError(f"the chat template does not accept {what}: {str(e).split(': ', 1)[-1]}") from None
    cut = text.find(SENTINEL)
    if cut < 0:
        raise SpecError(
            "the chat template does not write the user's message into its text; cannot synthesise"
        )
    return text[:cut]


# ---------------------------------------------------------------------------------------------
# Filters.


def fold(text: str) -> str:
    """Case- and whitespace-folded text without surrounding punctuation: the key of exact duplicates."""
    return " ".join(text.casefold().split()).strip(" .!?,;:\"'")


def quality_issue(text: str, *, min_words: int, max_words: int, markup: tuple[str, ...]) -> str | None:
    """Why a generated prompt is unusable (one of REJECT_REASONS), or None."""
    words = text.split()
    if not words:
        return "empty"
    if any(m in text for m in markup):
        return "markup"
    if len(words) < min_words:
        return "too_short"
    if len(words) > max_words:
        return "too_long"
    trigrams = list(zip(words, words[1:], words[2:]))
    if len(trigrams) >= 10 and len(set(trigrams)) < 0.5 * len(trigrams):
        return "repetitive"
    if re.search(r"(\S)\1{15,}", text):
        return "repetitive"
    visible = [c for c in text if not c.isspace()]
    if sum(c.isalpha() for c in visible) < 0.3 * len(visible):
        return "not_text"
    return None


class NearDuplicates:
    """MinHash (`num_perm` multiply-shift hashes over character 5-grams) with LSH banding: `seen(text)`
    says whether an earlier added text has estimated Jaccard similarity >= `threshold`."""

    def __init__(self, threshold: float = 0.7, num_perm: int = 128, band_rows: int = 4, shingle: int = 5):
        if num_perm % band_rows:
            raise ValueError("num_perm must be a multiple of band_rows")
        rng = np.random.default_rng(0x5EC)  # fixed: signatures must not depend on the run's seed
        self.a = rng.integers(1, 2**63, num_perm, dtype=np.uint64) | np.uint64(1)  # odd multipliers
        self.b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
        self.threshold, self.band_rows, self.shingle = threshold, band_rows, shingle
        self.signatures: list[np.ndarray] = []
        self.buckets: dict[tuple[int, bytes], list[int]] = {}

    def signature(self, text: str) -> np.ndarray:
        t = fold(text)
        grams = {t[i : i + self.shingle] for i in range(max(1, len(t) - self.shingle + 1))}
        x = np.array(
            [int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") for g in grams],
            dtype=np.uint64,
        )
        # [num_perm, n_grams] hashes (mod 2^64, top 32 bits), minimum per permutation -> [num_perm]
        return ((self.a[:, None] * x[None, :] + self.b[:, None]) >> np.uint64(32)).min(axis=1)

    def _bands(self, sig: np.ndarray) -> list[tuple[int, bytes]]:
        r = self.band_rows
        return [(i, sig[i * r : (i + 1) * r].tobytes()) for i in range(len(sig) // r)]

    def seen(self, text: str, add: bool = True) -> bool:
        """True when a near-duplicate was added before; otherwise remember `text` (when `add`)."""
        sig = self.signature(text)
        keys = self._bands(sig)
        candidates = {j for k in keys for j in self.buckets.get(k, ())}
        if any(np.mean(self.signatures[j] == sig) >= self.threshold for j in candidates):
            return True
        if add:
            for k in keys:
                self.buckets.setdefault(k, []).append(len(self.signatures))
            self.signatures.append(sig)
        return False


# ---------------------------------------------------------------------------------------------
# Diversity report.


class Diversity(msgspec.Struct):
    """distinct_n: distinct word n-grams / all word n-grams over the prompts (n = 1, 2, 3);
    histogram: (bin label, prompts) of lengths in words; first_words: the commonest first words."""

    prompts: int
    distinct_n: list[float]
    mean_words: float
    median_words: float
    histogram: list[tuple[str, int]]
    first_words: list[tuple[str, int]]

    def lines(self) -> list[str]:
        d = ", ".join(f"{n + 1}-gram {v:.3f}" for n, v in enumerate(self.distinct_n))
        out = [
            f"distinct n-grams (distinct/total): {d}",
            f"words per prompt: mean {self.mean_words:.1f}, median {self.median_words:g}",
        ]
        top = max((c for _, c in self.histogram), default=0) or 1
        out += [f"  {label:>8} words | {'#' * round(30 * c / top):<30} {c}" for label, c in self.histogram]
        if self.first_words:
            out.append("commonest first words: " + ", ".join(f"{w} {c}" for w, c in self.first_words))
        return out


def diversity(texts: list[str], top: int = 8) -> Diversity:
    tokenized = [fold(t).split() for t in texts]
    distinct = []
    for n in (1, 2, 3):
        grams = [tuple(w[i : i + n]) for w in tokenized for i in range(len(w) - n + 1)]
        distinct.append(len(set(grams)) / len(grams) if grams else 0.0)
    lengths = [len(t.split()) for t in texts]
    edges = (0, *LENGTH_BINS)
    labels = [f"{lo + 1}-{hi}" for lo, hi in zip(edges, edges[1:])] + [f"{LENGTH_BINS[-1] + 1}+"]
    counts = [0] * len(labels)
    for n_words in lengths:
        counts[next((i for i, hi in enumerate(LENGTH_BINS) if n_words <= hi), len(LENGTH_BINS))] += 1
    first = Counter(w[0] for w in tokenized if w).most_common(top)
    return Diversity(
        prompts=len(texts),
        distinct_n=distinct,
        mean_words=statistics.fmean(lengths) if lengths else 0.0,
        median_words=statistics.median(lengths) if lengths else 0.0,
        histogram=list(zip(labels, counts)),
        first_words=first,
    )


# ---------------------------------------------------------------------------------------------
# Synthesis.


class SynthStats(msgspec.Struct):
    attempts: int = 0  # prompts generated and judged
    accepted: int = 0
    generated_tokens: int = 0
    rejected: dict[str, int] = msgspec.field(default_factory=dict)

    def lines(self) -> list[str]:
        rejected = ", ".join(f"{k}: {v}" for k, v in sorted(self.rejected.items())) or "none"
        rate = self.accepted / self.attempts if self.attempts else 0.0
        return [
            f"prompts: {self.accepted} kept of {self.attempts} generated ({rate:.0%}); "
            f"{self.generated_tokens} tokens generated",
            f"rejected: {rejected}",
        ]


class SynthOptions(msgspec.Struct, kw_only=True):
    """Magpie's sampling (temperature 1, top_p 1) and the filters' limits."""

    seed: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256  # a prompt that needs more is rejected as truncated
    min_words: int = 3
    max_words: int = 200
    near_dup: float = 0.7  # estimated Jaccard similarity at which a prompt is a near-duplicate
    max_attempts: int | None = None  # default 20 n + 100


def synthesize(
    llm,
    renderer: ChatRenderer,
    n: int,
    *,
    options: SynthOptions | None = None,
    topics: list[str] | None = None,
    openers: list[str] | None = None,
    stats: SynthStats | None = None,
) -> Iterator[Conversation]:
    """Up to `n` synthesised user prompts as one-message Conversations (layout "messages"), each passing
    the filters and unlike every earlier one. Fewer come out when `max_attempts` generations do not give n
    (see stats.rejected). With topics, topic i % len(topics) seeds attempt i and is kept as row field
    "topic"; with openers, the message of attempt i starts with opener i % len(openers) (row field
    "opener")."""
    from vllm import SamplingParams

    opt = options or SynthOptions()
    stats = stats if stats is not None else SynthStats()
    max_attempts = opt.max_attempts or 20 * n + 100
    markup = tuple(t for t in renderer.tok.all_special_tokens if t) + (SENTINEL,)
    prefixes: dict[tuple[str | None, str], list[int]] = {}

    def prefix_ids(topic: str | None, opener: str = "") -> list[int]:
        """The template's user-turn prefix (with the topic's system message), then the opener's tokens."""
        if (topic, opener) not in prefixes:
            system = TOPIC_SYSTEM.format(topic=topic) if topic is not None else None
            ids = renderer.tok(user_turn_prefix(renderer, system), add_special_tokens=False)["input_ids"]
            opener_ids = renderer.tok(opener, add_special_tokens=False)["input_ids"] if opener else []
            prefixes[topic, opener] = ids + opener_ids
        return prefixes[topic, opener]

    def attempt(i: int):
        topic = topics[i % len(topics)] if topics else None
        opener = openers[i % len(openers)] if openers else ""
        params = SamplingParams(
            temperature=opt.temperature,
            top_p=opt.top_p,
            max_tokens=opt.max_tokens,
            seed=zlib.crc32(f"{opt.seed}:synth:{i}".encode()),
            stop_token_ids=renderer.end_ids,
            detokenize=False,
        )
        out = yield prefix_ids(topic, opener), params
        return topic, opener, out.outputs[0]

    if n <= 0:
        return
    prefix_ids(topics[0] if topics else None)  # template problems surface before any generation
    exact: set[str] = set()
    near = NearDuplicates(opt.near_dup)
    end = set(renderer.end_ids)
    # Attempts in flight: enough to keep the engine busy, not many more than n (the rest are thrown away).
    max_active = min(2 * llm.llm_engine.vllm_config.scheduler_config.max_num_seqs, 2 * n)
    tasks = (attempt(i) for i in range(max_attempts))
    for topic, opener, completion in run_in_order(llm, tasks, max_active=max_active):
        stats.attempts += 1
        ids = list(completion.token_ids)
        stats.generated_tokens += len(ids)
        while ids and ids[-1] in end:
            ids.pop()
        text = (opener + renderer.tok.decode(ids, skip_special_tokens=False)).strip()
        reason = "truncated" if completion.finish_reason == "length" else None
        reason = reason or quality_issue(
            text, min_words=opt.min_words, max_words=opt.max_words, markup=markup
        )
        if reason is None and fold(text) in exact:
            reason = "duplicate"
        if reason is None and near.seen(text):
            reason = "near_duplicate"
        if reason is not None:
            stats.rejected[reason] = stats.rejected.get(reason, 0) + 1
            continue
        exact.add(fold(text))
        stats.accepted += 1
        extra = {"topic": topic} if topic is not None else {}
        extra |= {"opener": opener} if opener else {}
        yield Conversation([Message("user", text)], extra=extra or None)
        if stats.accepted >= n:
            return


def read_topics(path, what: str = "topic") -> list[str]:
    """Topics (or openers), one per line (blank lines and lines starting with # are skipped)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text ({e.reason})") from None
    topics = [
        line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    if not topics:
        raise SpecError(f"{path}: no {what}s; write one {what} per line")
    return topics


def synthesize_with_progress(
    llm, renderer: ChatRenderer, n: int, *, progress: bool = True, **kwargs: Any
) -> list[Conversation]:
    """synthesize() into a list, with a progress bar (kept prompts, attempts, acceptance rate)."""
    from tqdm import tqdm

    stats = kwargs.setdefault("stats", SynthStats())
    out: list[Conversation] = []
    with tqdm(total=n, unit="prompt", desc="synth", disable=not progress, file=sys.stderr) as bar:
        for conv in synthesize(llm, renderer, n, **kwargs):
            out.append(conv)
            bar.update(1)
            bar.set_postfix(
                tried=stats.attempts, kept=f"{stats.accepted / max(stats.attempts, 1):.0%}", refresh=False
            )
    return out


def report_lines(stats: SynthStats, convs: list[Conversation]) -> list[str]:
    return stats.lines() + diversity([c.messages[0].content or "" for c in convs]).lines()


def synthesize_to_file(
    target: str | os.PathLike,
    out: str | os.PathLike,
    n: int,
    *,
    chat_template: str | None = None,
    replies: Sampling | None = None,
    max_model_len: int | None = None,
    engine_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> tuple[int, SynthStats, list[str]]:
    """`spec synth`: up to n prompts (kwargs: options, topics, openers, see `synthesize`) from a fresh engine
    of `target`, with `replies` the target's reply to each on the same engine (as spec regenerate would
    write it), into the JSONL file `out`. Returns (rows written, stats, report lines: filters, diversity,
    replies). The template is checked before the engine starts (a minute)."""
    from tqdm import tqdm

    Path(out).parent.mkdir(parents=True, exist_ok=True)  # now, not after minutes of generation
    renderer = ChatRenderer.for_model(target, chat_template)
    # A template that cannot seed topics, or none at all, is refused here.
    topics = kwargs.get("topics")
    user_turn_prefix(renderer, TOPIC_SYSTEM.format(topic=topics[0]) if topics else None)
    llm = make_llm(target, max_model_len=max_model_len or default_context(target), **(engine_kwargs or {}))
    try:
        stats = kwargs.setdefault("stats", SynthStats())
        convs = synthesize_with_progress(llm, renderer, n, progress=progress, **kwargs)
        lines = report_lines(stats, convs)
        if replies is not None and convs:
            regen = Regenerator(target, llm=llm, chat_template=chat_template, sampling=replies)
            rstats, t0 = RegenStats(), time.perf_counter()
            answered = regen.regenerate(convs, stats=rstats)
            convs = list(tqdm(answered, total=len(convs), desc="replies", unit="conv", disable=not progress,
                              file=sys.stderr))  # fmt: skip
            lines += RegenSummary(rstats, time.perf_counter() - t0, 0, replies.describe(), str(out)).lines()
    finally:
        shutdown_llm(llm)
    write_rows(out, convs)
    return len(convs), stats, lines
