"""Response regeneration: every assistant turn rewritten by the target itself (on-policy training data).

A conversation is regenerated turn by turn on its regenerated history: the prompt of assistant turn i is
the chat template (with its generation prompt) over the messages before it, where earlier assistant turns
are the target's own replies. System, user and tool messages are kept as written; an assistant turn that
carries tool calls is kept too (the tool messages after it answer those exact calls); a conversation that
ends with a user or tool message gets one more reply, so prompt-only rows come out with answers.

Many conversations run at once on one engine (`runtime.run_in_order`): each is a small generator that yields a
request per turn, so vLLM always has every conversation's next turn queued, and results come back in
input order. Where the template keeps reasoning apart (a `reasoning_content` field rendered between tags,
e.g. Qwen3's <think>), a generated reply is split the same way.

Limits: a turn whose prompt leaves no room in the engine's max_model_len is not generated; the
conversation is cut before it (counted as "context_full"). A reply that hits max_tokens (or the context
limit) is kept as generated, without its end-of-turn token, and counted as truncated.

Sampling follows the target's generation_config.json (temperature, top_p, top_k, min_p,
repetition_penalty, max_new_tokens) as vLLM reads it; a config that sets none of these (or sets
do_sample false) means greedy decoding, as transformers does. Flags override single values.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from spec_datagen.conversations import (
    BadRow,
    Conversation,
    Message,
    RowError,
    normalise,
    read_conversations,
    to_row,
)
from spec_datagen.runtime import Request, run_in_order
from spec_datagen.template import ChatRenderer
from spec_format.console import say
from spec_format.errors import SpecError

DEFAULT_MAX_TOKENS = 1024
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
# Probe strings for reading a template's reasoning tags.
_REASONING_PROBE = "SPECREASONINGPROBE"
_CONTENT_PROBE = "SPECCONTENTPROBE"


class Sampling(msgspec.Struct, kw_only=True):
    """Sampling of generated turns; `origin` says where the values came from (for the summary)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = DEFAULT_MAX_TOKENS
    seed: int = 0
    origin: str = "defaults"

    def describe(self) -> str:
        if self.temperature == 0:
            head = "greedy"
        else:
            head = f"temperature={self.temperature:g}, top_p={self.top_p:g}"
            head += f", top_k={self.top_k}" if self.top_k > 0 else ""
            head += f", min_p={self.min_p:g}" if self.min_p > 0 else ""
            head += f", seed={self.seed}"
        if self.repetition_penalty != 1.0:
            head += f", repetition_penalty={self.repetition_penalty:g}"
        return f"{head}, max_tokens={self.max_tokens} ({self.origin})"

    def params(self, end_ids: list[int], max_tokens: int, seed_key: str):
        """vLLM SamplingParams for one request; the seed is derived from `seed_key` (row and turn) so that
        a sampled reply does not depend on batching or on where a resumed run started."""
        from vllm import SamplingParams

        seed = zlib.crc32(f"{self.seed}:{seed_key}".encode()) if self.temperature > 0 else None
        return SamplingParams(
            **{k: getattr(self, k) for k in SAMPLING_KEYS},
            max_tokens=max_tokens,
            seed=seed,
            stop_token_ids=list(end_ids),
            detokenize=False,  # replies are decoded here, special tokens and all
        )


def default_sampling(model: str | os.PathLike, **overrides: Any) -> Sampling:
    """The target's sampling from its generation_config.json, then `overrides` (None values ignored)."""
    path = Path(model) / "generation_config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    found = {k: cfg[k] for k in SAMPLING_KEYS if cfg.get(k) is not None}
    values: dict[str, Any] = {}
    if not path.is_file():
        values["origin"] = "the target has no generation_config.json: greedy by default"
    elif cfg.get("do_sample") is False:
        values["origin"] = "generation_config.json sets do_sample false: greedy"
    elif not found:
        values["origin"] = "generation_config.json sets no sampling values: greedy by default"
    else:
        values = dict(found, origin="generation_config.json")
    if isinstance(cfg.get("max_new_tokens"), int):
        values["max_tokens"] = cfg["max_new_tokens"]
    given = {k: v for k, v in overrides.items() if v is not None}
    values.update(given)
    if given.keys() - {"seed"}:
        values["origin"] += "; flags set " + ", ".join(sorted(given.keys() - {"seed"}))
    try:
        return msgspec.convert(values, Sampling)
    except msgspec.ValidationError as e:
        raise SpecError(f"{path}: unusable sampling values ({e})") from None


# ---------------------------------------------------------------------------------------------
# Reasoning kept apart.


class ReasoningTags(msgspec.Struct, frozen=True):
    """How a template writes `reasoning_content`: between `open` and `close`; `prompt_opens` when the
    generation prompt itself already opens it (the reply starts inside the reasoning)."""

    open: str
    close: str
    prompt_opens: bool = False


def reasoning_tags(renderer: ChatRenderer) -> ReasoningTags | None:
    """The template's reasoning tags, read from a probe conversation; None when it does not render
    `reasoning_content` apart from the content (most templates)."""
    if not renderer.has_template:
        return None
    user = Conversation([Message("user", "hi")])
    probe = Conversation(
        user.messages + [Message("assistant", _CONTENT_PROBE, reasoning_content=_REASONING_PROBE)]
    )
    try:
        text = renderer.render(probe)
        base = renderer.render(user)
        prompt = renderer.render(user, generation_prompt=True)
    except BadRow:
        return None
    r, c = text.find(_REASONING_PROBE), text.find(_CONTENT_PROBE)
    if r < 0 or c < r:
        return None
    close = text[r + len(_REASONING_PROBE) : c].strip()
    if not close:
        return None
    gen_tail = prompt[len(base) :] if prompt.startswith(base) else ""
    if close.startswith("</") and close.endswith(">"):
        open_ = "<" + close[2:]  # <think>...</think> and its kin
    else:
        seg = text[len(base) : r] if text.startswith(base) else ""
        open_ = seg[len(gen_tail) :].strip() if seg.startswith(gen_tail) else ""
    # Some generation prompts open the reasoning themselves ("...assistant\n<think>\n").
    prompt_opens = bool(open_) and gen_tail.rfind(open_) > gen_tail.rfind(close)
    return ReasoningTags(open_, close, prompt_opens)


def split_reasoning(text: str, tags: ReasoningTags | None) -> tuple[str | None, str]:
    """(reasoning, content) of a generated reply; (None, text) when the template has no reasoning tags
    or the reply has none."""
    if tags is None:
        return None, text
    head, sep, tail = text.partition(tags.close)
    stripped = head.lstrip()
    opened = tags.prompt_opens or (tags.open and stripped.startswith(tags.open))
    if tags.open and stripped.startswith(tags.open):
        stripped = stripped[len(tags.open) :]
    if sep:
        return stripped.strip("\n"), tail.lstrip("\n")
    if opened:  # the reply stopped inside its reasoning (truncated)
        return stripped.strip("\n"), ""
    return None, text


# ---------------------------------------------------------------------------------------------
# Regeneration.


class RegenStats(msgspec.Struct):
    """What a run did (updated as it goes). `cut` maps a reason to the number of conversations cut short
    before a turn that could not be generated."""

    conversations: int = 0
    turns: int = 0  # assistant turns generated
    prompt_tokens: int = 0
    generated_tokens: int = 0
    truncated: int = 0  # turns that ended at max_tokens or the context limit, not at end-of-turn
    kept_tool_call_turns: int = 0
    finish_reasons: dict[str, int] = msgspec.field(default_factory=dict)
    cut: dict[str, int] = msgspec.field(default_factory=dict)
    malformed: int = 0  # input rows skipped (reported as FILE:LINE)

    def count(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1


class Regenerator:
    """Rewrites assistant turns with the target; a context manager that owns its engine.

        with Regenerator("path/to/target", max_tokens=512) as regen:
            for conv in regen.regenerate(rows):  # rows: Conversations or row dicts in any layout
                print(to_row(conv))

    Pass `llm` to share an engine made by `runtime.make_llm` (its max_model_len is used). Sampling
    values given here override the target's generation config (see `default_sampling`).
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        llm=None,
        sampling: Sampling | None = None,
        max_model_len: int = 2048,
        chat_template: str | None = None,
        template_kwargs: dict[str, Any] | None = None,
        engine_kwargs: dict[str, Any] | None = None,
        **sampling_overrides: Any,
    ):
        self.model = Path(model)
        self.renderer = ChatRenderer.for_model(model, chat_template, template_kwargs=template_kwargs)
        self.sampling = sampling or default_sampling(model, **sampling_overrides)
        self.tags = reasoning_tags(self.renderer)
        self._own_llm = llm is None
        if llm is None:
            from spec_datagen.runtime import make_llm

            llm = make_llm(model, max_model_len=max_model_len, **(engine_kwargs or {}))
        self.llm = llm
        self.max_model_len = llm.llm_engine.vllm_config.model_config.max_model_len

    def regenerate(
        self,
        conversations: Iterable[Conversation | dict],
        *,
        stats: RegenStats | None = None,
        first_index: int = 0,
        on_error: str = "skip",
        report: Callable[[str], None] | None = None,
    ) -> Iterator[Conversation]:
        """One regenerated Conversation per input, in input order. `first_index` numbers the inputs (it
        seeds sampling, so a resumed run continues as the first one would have). A turn the template
        cannot render cuts its conversation there (reported; on_error="fail" raises SpecError)."""
        stats = stats if stats is not None else RegenStats()
        tasks = (
            self._task(c if isinstance(c, Conversation) else normalise(c, f"<data>:{first_index + i + 1}"),
                       first_index + i, stats, on_error, report)
            for i, c in enumerate(conversations)
        )  # fmt: skip
        for conv in run_in_order(self.llm, tasks):
            stats.conversations += 1
            yield conv

    def _task(
        self, conv: Conversation, index: int, stats: RegenStats, on_error: str, report
    ) -> Generator[Request, Any, Conversation]:
        out: list[Message] = []
        split = conv.layout != "sharegpt"  # ShareGPT rows have no field for reasoning
        pending = list(conv.messages)
        turn = 0
        while True:
            if pending and (pending[0].role != "assistant" or pending[0].tool_calls):
                m = pending.pop(0)
                if m.role == "assistant":
                    stats.kept_tool_call_turns += 1
                out.append(m)
                continue
            if not pending and not (out and out[-1].role in ("user", "tool")):
                return msgspec.structs.replace(conv, messages=out)
            # Generate the assistant turn at this point (replacing the original one, if any).
            head = msgspec.structs.replace(conv, messages=out)
            try:
                ids = self.renderer.prompt_ids(head)
            except BadRow as e:
                if on_error == "fail":
                    raise SpecError(f"{e} (stopped by --on-error fail)") from None
                if report is not None:
                    report(f"{e}; the conversation is cut before assistant turn {turn}")
                stats.count(stats.cut, "template_error")
                return head
            room = self.max_model_len - len(ids)
            if room < 1:
                stats.count(stats.cut, "context_full")
                return head
            max_tokens = min(self.sampling.max_tokens, room)
            params = self.sampling.params(self.renderer.end_ids, max_tokens, f"{index}:{turn}")
            result = yield ids, params
            out.append(self._message(result.outputs[0], split, stats))
            stats.prompt_tokens += len(ids)
            if pending:
                pending.pop(0)
            turn += 1

    def _message(self, completion, split: bool, stats: RegenStats) -> Message:
        token_ids = list(completion.token_ids)
        stats.turns += 1
        stats.generated_tokens += len(token_ids)
        reason = completion.finish_reason or "unknown"
        stats.count(stats.finish_reasons, reason)
        if reason == "length":
            stats.truncated += 1
        end = set(self.renderer.end_ids)
        while token_ids and token_ids[-1] in end:
            token_ids.pop()
        text = self.renderer.tok.decode(token_ids, skip_special_tokens=False)
        reasoning, content = split_reasoning(text, self.tags if split else None)
        return Message("assistant", content, reasoning_content=reasoning)

    def close(self) -> None:
        if self._own_llm and self.llm is not None:
            from spec_datagen.runtime import shutdown_llm

            shutdown_llm(self.llm)
        self.llm = None

    def __enter__(self) -> Regenerator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Files: input order, periodic flush, resume.


class RegenSummary(msgspec.Struct):
    stats: RegenStats
    seconds: float
    resumed_rows: int
    sampling: str
    out: str

    def lines(self) -> list[str]:
        s = self.stats
        rate = s.generated_tokens / self.seconds if self.seconds > 0 else 0.0
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s.finish_reasons.items())) or "none"
        cut = ", ".join(f"{k}: {v}" for k, v in sorted(s.cut.items())) or "none"
        head = f"conversations: {s.conversations}"
        head += f" (after {self.resumed_rows} rows already written)" if self.resumed_rows else ""
        return [
            f"{head}; assistant turns generated: {s.turns}; tool-call turns kept: {s.kept_tool_call_turns}",
            f"tokens: {s.prompt_tokens} prompt, {s.generated_tokens} generated ({rate:.0f} generated tokens/s)",
            f"finish reasons: {reasons}; truncated turns: {s.truncated}",
            f"conversations cut short: {cut}; malformed rows skipped: {s.malformed}",
            f"sampling: {self.sampling}",
            f"time: {self.seconds:.1f} s; output: {self.out}",
        ]


def _prompt_part(messages: list) -> list:
    """The messages before the first assistant turn: what regeneration keeps of a row's start."""
    cut = next((i for i, m in enumerate(messages) if m.role == "assistant"), len(messages))
    return [(m.role, m.content) for m in messages[:cut]]


def complete_rows(out: Path) -> tuple[int, int, dict | None]:
    """(complete rows, byte length of them, the last complete row) of a JSONL output file. A last line
    without its newline (a run killed while writing) does not count; any other broken line is an error."""
    rows, good, last = 0, 0, None
    with open(out, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break  # the partial last line
            try:
                last = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise SpecError(
                    f"{out}:{lineno}: not a complete JSON row, so this file was not written by spec regenerate "
                    "or is damaged; remove it, or pass another --out"
                ) from None
            rows += 1
            good += len(line)
    return rows, good, last


def write_regenerated(
    regen: Regenerator,
    source: Any,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    max_rows: int | None = None,
    on_error: str = "skip",
    progress: bool = True,
    report: Callable[[str], None] | None = say,
    fsync_every_s: float = 10.0,
) -> RegenSummary:
    """Regenerate every row of `source` (paths, or a sequence of row dicts: it is read twice) into the JSONL file `out`:
    one row per readable input row, in input order, in the row's own layout. Malformed rows are reported
    as FILE:LINE and skipped (on_error="fail": SpecError). Rows are flushed as they are written; with
    `resume`, the complete rows already in `out` are kept (a partial last line is dropped) and the run
    continues with the next input row. `max_rows` limits the readable rows used (resumed ones count)."""
    from tqdm import tqdm

    if on_error not in ("skip", "fail"):
        raise SpecError(f"on_error={on_error!r}: choose skip or fail")
    out = Path(out)
    done, keep_bytes, last_row = 0, 0, None
    if out.exists():
        if not resume:
            raise SpecError(f"{out}: already exists; pass --resume to continue it, or remove it")
        done, keep_bytes, last_row = complete_rows(out)
    stats = RegenStats()

    def readable() -> Iterator[Conversation]:
        for item in read_conversations(source):
            if isinstance(item, RowError):
                stats.malformed += 1
                if on_error == "fail":
                    raise SpecError(
                        f"{item} (stopped by --on-error fail; use --on-error skip to skip such rows)"
                    )
                if report is not None:
                    report(str(item))
                continue
            yield item

    # Count the rows to do (cheap next to generation) and check that a resumed file matches the input.
    total, previous = 0, None
    for conv in read_conversations(source):
        if isinstance(conv, Conversation):
            if total == done - 1:
                previous = conv
            total += 1
    if max_rows is not None:
        total = min(total, max_rows)
    if done > total:
        raise SpecError(
            f"{out}: holds {done} rows but the input has only {total}; was it made from other data?"
        )
    if last_row is not None and previous is not None:
        try:
            written = normalise(last_row, f"{out}:{done}")
        except BadRow as e:
            raise SpecError(f"{e}; cannot resume this file") from None
        if _prompt_part(written.messages) != _prompt_part(previous.messages):
            raise SpecError(
                f"{out}:{done}: this row does not start like input row {previous.source}; the file was made from "
                "other data (or other options): remove it, or pass another --out"
            )
    if done and report is not None:
        report(f"[regenerate] resuming: {done} of {total} rows already in {out}")

    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(out, "ab" if done else "wb") as f:
        f.truncate(keep_bytes)  # drops a partially written last line
        rows = readable()
        for _ in range(done):
            next(rows)
        todo = itertools.islice(rows, total - done)
        bar = tqdm(
            total=total, initial=done, unit="conv", desc="regenerate", disable=not progress, file=sys.stderr
        )
        synced = time.monotonic()
        with bar:
            for conv in regen.regenerate(
                todo, stats=stats, first_index=done, on_error=on_error, report=report
            ):
                f.write((json.dumps(to_row(conv), ensure_ascii=False) + "\n").encode())
                f.flush()  # a killed run keeps every row written so far
                bar.update(1)
                elapsed = time.perf_counter() - t0
                bar.set_postfix(tok_s=f"{stats.generated_tokens / max(elapsed, 1e-9):.0f}", refresh=False)
                if time.monotonic() - synced > fsync_every_s:
                    os.fsync(f.fileno())
                    synced = time.monotonic()
        os.fsync(f.fileno())
    return RegenSummary(
        stats=stats,
        seconds=time.perf_counter() - t0,
        resumed_rows=done,
        sampling=regen.sampling.describe(),
        out=str(out),
    )
