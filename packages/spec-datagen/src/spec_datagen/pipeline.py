"""Conversations -> captured samples -> a spec-format dataset: selection, policies, cost estimate, summary.

`Capturer` is the library entry point: it owns a capture engine and yields `CapturedSample`s from any
conversation source (files, a `datasets.Dataset`, an iterable of row dicts), for online training or a
pipeline; `write_dataset()` puts spec-format's `DatasetWriter` on top of it. `spec datagen` (cli.py) is a
thin wrapper around both.

Row selection is by the row's index i in the full input stream (all sources concatenated, broken rows
included): a job takes the rows with i % num_shards == shard_index, at or after `start` (the writer's
resume point), and at most `max_rows` of them. So several jobs split one input deterministically, and a
resumed job continues exactly where its last committed shard ended.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from spec_datagen.capture import (
    CapturedSample,
    capture,
    capture_layer_ids,
    default_storage_dir,
    make_capture_llm,
    validate_layer_ids,
)
from spec_datagen.conversations import BadRow, RowError, iter_rows, normalise
from spec_datagen.heldout import HeldOut
from spec_datagen.template import ChatRenderer, TokenizedSample
from spec_format.console import say
from spec_format.dataset.manifest import DataInfo
from spec_format.errors import SpecError
from spec_format.fingerprint import default_eagle3_layers, read_model_config

LONG_POLICIES = ("truncate", "skip")
ERROR_POLICIES = ("skip", "fail")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp8": 1}


class Stats(msgspec.Struct):
    """What a run did; the generator updates it as it goes. `skipped` maps a reason to a row count."""

    rows: int = 0  # rows of this job's share that were looked at
    samples: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    truncated: int = 0
    unsupervised_turns: int = 0  # assistant turns the template rewrites later (left out of masks)
    held_out: list[int] = []  # input indices of rows dropped as near-duplicates of evaluation prompts
    skipped: dict[str, int] = msgspec.field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


class Summary(msgspec.Struct):
    stats: Stats
    seconds: float
    bytes_written: int
    tokens_per_s: float
    out_dir: str | None = None

    def lines(self) -> list[str]:
        s = self.stats
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(s.skipped.items())) or "none"
        out = [
            f"samples: {s.samples} (of {s.rows} rows read), tokens: {s.tokens} ({s.supervised_tokens} supervised)",
            f"skipped: {skipped}; truncated: {s.truncated}; assistant turns left unmasked: {s.unsupervised_turns}",
            f"time: {self.seconds:.1f} s, {self.tokens_per_s:.0f} tokens/s, written: {_human(self.bytes_written)}",
        ]
        if self.out_dir:
            out.append(f"dataset: {self.out_dir}")
        return out


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def in_shard(index: int, shard_index: int, num_shards: int) -> bool:
    """Whether input row `index` belongs to job `shard_index` of `num_shards` (spec datagen's split; spec
    train --online gives each torchrun rank its share the same way)."""
    return index % num_shards == shard_index


def tokenized_samples(
    source: Any,
    renderer: ChatRenderer,
    *,
    max_len: int,
    long: str = "truncate",
    on_error: str = "skip",
    shard_index: int = 0,
    num_shards: int = 1,
    start: int = 0,
    max_rows: int | None = None,
    stats: Stats | None = None,
    report: Callable[[str], None] | None = say,
    held_out: HeldOut | None = None,
) -> Iterator[TokenizedSample]:
    """This job's rows of `source`, rendered and masked, in input order. Rows that cannot be used are
    skipped and counted in `stats.skipped` by reason ("malformed", "held_out" (near an evaluation prompt
    of `held_out`), "too_long", "no_supervised_tokens");
    a malformed row is reported as "FILE:LINE: what is wrong" (on_error="skip") or raises SpecError
    (on_error="fail")."""
    if long not in LONG_POLICIES:
        raise SpecError(f"long={long!r}: choose one of {LONG_POLICIES}")
    if on_error not in ERROR_POLICIES:
        raise SpecError(f"on_error={on_error!r}: choose one of {ERROR_POLICIES}")
    if not 0 <= shard_index < num_shards:
        raise SpecError(
            f"--shard-index {shard_index} must be in 0..{num_shards - 1} (--num-shards {num_shards})"
        )
    stats = stats if stats is not None else Stats()
    taken = 0
    for index, (where, row) in enumerate(iter_rows(source)):
        if not in_shard(index, shard_index, num_shards):
            continue
        if max_rows is not None and taken >= max_rows:
            return
        taken += 1
        if index < start:
            continue
        stats.rows += 1
        try:
            if isinstance(row, RowError):
                raise BadRow(str(row))
            conv = normalise(row, where)
            if held_out is not None and held_out.near(conv):
                stats.skip("held_out")
                stats.held_out.append(index)
                continue
            sample = renderer.tokenize(conv, index)
        except BadRow as e:
            stats.skip("malformed")
            if on_error == "fail":
                raise SpecError(
                    f"{e} (stopped by --on-error fail; use --on-error skip to skip such rows)"
                ) from None
            if report is not None:
                report(str(e))
            continue
        stats.unsupervised_turns += sample.unsupervised_turns
        if len(sample.token_ids) > max_len:
            if long == "skip":
                stats.skip("too_long")
                continue
            sample.token_ids = sample.token_ids[:max_len]
            sample.loss_mask = sample.loss_mask[:max_len]
            stats.truncated += 1
        if not sample.loss_mask.any():
            stats.skip("no_supervised_tokens")
            continue
        yield sample


def check_max_len(model: str | os.PathLike, max_len: int) -> int | None:
    """The target's context (max_position_embeddings; None if its config has none); a SpecError when
    max_len exceeds it. Checked before any engine starts."""
    context = read_model_config(model).get("max_position_embeddings")
    if context and max_len > int(context):
        raise SpecError(
            f"--max-len {max_len} is longer than the target's context: max_position_embeddings is {context} in "
            f"{Path(model) / 'config.json'}; pass --max-len {context} or less"
        )
    return int(context) if context else None


class Capturer:
    """Captures hidden states of a target for conversations; a context manager that owns its engine.

        with Capturer("path/to/target", max_len=2048) as cap:
            for s in cap.samples("chats.jsonl"):  # CapturedSample: token_ids, loss_mask, hidden [T, n, H]
                ...

    `layer_ids` use vLLM's capture-id convention (default: EAGLE-3's 2, L/2, L-3 and L). Pass `llm` to
    reuse an engine made by `capture.make_capture_llm` (its layer ids are then used).
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        layer_ids: list[int] | None = None,
        max_len: int = 2048,
        chat_template: str | None = None,
        template_kwargs: dict[str, Any] | None = None,
        rewritten: str = "unmask",
        tensor_parallel_size: int = 1,
        engine_kwargs: dict[str, Any] | None = None,
        llm=None,
    ):
        self.model = Path(model)
        self.config = read_model_config(model)
        self.max_len = max_len
        context = check_max_len(model, max_len)
        self.renderer = ChatRenderer.for_model(
            model, chat_template, template_kwargs=template_kwargs, rewritten=rewritten
        )
        self._storage: Path | None = None
        self._own_llm = llm is None
        if llm is None:
            n = self.config["num_hidden_layers"]
            self.layer_ids = validate_layer_ids(layer_ids or default_eagle3_layers(n), n)
            self._engine_kwargs = dict(
                max_model_len=max_len + 1,  # the prompt plus the one sampled token
                tensor_parallel_size=tensor_parallel_size,
                **(engine_kwargs or {}),
            )
            if context is not None and max_len + 1 > context:
                # vLLM refuses a prompt as long as max_model_len (one token must be sampled), and a
                # max_model_len over the config's context unless model_max_length allows it. The sampled
                # token is never run through the model: every position computed stays below the context.
                hf = dict(self._engine_kwargs.get("hf_overrides") or {})
                self._engine_kwargs["hf_overrides"] = {"model_max_length": max_len + 1, **hf}
        else:
            self.layer_ids = capture_layer_ids(llm)
            if layer_ids is not None and sorted(layer_ids) != self.layer_ids:
                raise SpecError(f"the given engine captures layers {self.layer_ids}, not {sorted(layer_ids)}")
            limit = llm.llm_engine.vllm_config.model_config.max_model_len
            if max_len >= limit:
                raise SpecError(
                    f"max_len {max_len} needs an engine with max_model_len > {max_len} (it has {limit})"
                )
        self._llm = llm

    def start(self):
        """Start the capture engine unless it runs (35-50 s on two CPU cores); returns it. Done lazily, so
        that everything that can be checked without it (layers, rows, disk space) fails before it starts."""
        if self._llm is None:
            from spec_datagen.targets import check_target

            check_target(self.model, method="extract_hidden_states")
            self._storage = default_storage_dir()
            self._llm = make_capture_llm(self.model, self.layer_ids, self._storage, **self._engine_kwargs)
        return self._llm

    @property
    def llm(self):
        return self.start()

    @property
    def hidden_size(self) -> int:
        return self.config["hidden_size"]

    def tokenized(self, source: Any, **kwargs: Any) -> Iterator[TokenizedSample]:
        """`tokenized_samples` with this target's renderer and max_len."""
        return tokenized_samples(source, self.renderer, max_len=self.max_len, **kwargs)

    def samples(
        self, source: Any, *, max_inflight_tokens: int = 65536, **kwargs: Any
    ) -> Iterator[CapturedSample]:
        """CapturedSamples for this job's rows of `source`, in input order (kwargs: see tokenized_samples)."""
        stats = kwargs.setdefault("stats", Stats())
        report = kwargs.get("report", say)
        for sample in capture(
            self.llm, self.tokenized(source, **kwargs), max_inflight_tokens=max_inflight_tokens
        ):
            if not np.isfinite(sample.hidden).all():  # skipped and counted (docs/reliability.md)
                stats.skip("non_finite_states")
                if report is not None:
                    report(
                        f"input row {sample.source_index}: the target's hidden states hold NaN/Inf; skipped"
                    )
                continue
            stats.samples += 1
            stats.tokens += len(sample.token_ids)
            stats.supervised_tokens += int(sample.loss_mask.sum())
            yield sample

    def close(self) -> None:
        if self._own_llm and self._llm is not None:
            from spec_datagen.runtime import shutdown_llm

            shutdown_llm(self._llm)
            self._llm = None
        if self._storage is not None:
            shutil.rmtree(self._storage, ignore_errors=True)
            self._storage = None

    def __enter__(self) -> Capturer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bytes_per_token(n_layers: int, hidden_size: int, dtype: str) -> int:
    """Stored bytes per token, uncompressed: hidden states plus the int32 id and the bool mask."""
    return n_layers * hidden_size * DTYPE_BYTES[dtype] + 4 + 1


def estimate(samples: Iterator[TokenizedSample]) -> tuple[int, int]:
    """(samples, tokens) that a run will capture, from a dry pass over the tokenized rows."""
    n = tokens = 0
    for s in samples:
        n += 1
        tokens += len(s.token_ids)
    return n, tokens


def check_disk(out_dir: Path, needed: int, force: bool) -> int:
    """Free bytes where out_dir lives; raise SpecError when fewer than `needed` unless forced."""
    probe = out_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free and not force:
        raise SpecError(
            f"{out_dir}: the dataset needs about {_human(needed)} but only {_human(free)} is free there; "
            "free space, lower --max-samples/--max-len, use --dtype fp8 or --compress zstd, or pass --force"
        )
    return free


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


@contextlib.contextmanager
def _nothing_left_on_failure(out_dir: Path, num_shards: int):
    """A run into a new directory that fails before it commits a sample (the engine would not start, a
    check refused) removes the directory, rather than leave an empty dataset that validates. A directory
    shared by several jobs is left alone (another job may be writing it)."""
    fresh = num_shards == 1 and (not out_dir.exists() or not any(out_dir.iterdir()))
    try:
        yield
    except BaseException:
        if fresh and _num_committed(out_dir) == 0:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _num_committed(out_dir: Path) -> int:
    from spec_format.dataset import manifest

    try:
        return manifest.load(out_dir)[0].num_samples
    except SpecError:
        return 0


def write_dataset(
    capturer: Capturer,
    source: Any,
    out_dir: str | os.PathLike,
    *,
    target=None,
    dtype: str = "bf16",
    compression: str | None = None,
    samples_per_shard: int = 256,
    shard_index: int = 0,
    num_shards: int = 1,
    resume: bool = False,
    max_rows: int | None = None,
    long: str = "truncate",
    on_error: str = "skip",
    command: str = "",
    data: DataInfo | None = None,
    held_out: HeldOut | None = None,
    progress: bool = True,
    force: bool = False,
    report: Callable[[str], None] | None = say,
    max_inflight_tokens: int = 65536,
) -> Summary:
    """Capture `source` into a spec-format dataset at out_dir (see the module doc for row selection).
    `data` is recorded in the manifest, with the count of rows dropped as near `held_out` prompts.

    Before the engine starts, a dry pass renders this job's rows and counts the tokens to capture: it
    refuses to start when the disk cannot hold them (bytes_per_token x tokens) unless `force`, stops at
    the first broken row with on_error="fail", and gives the progress bar its total for the ETA. A
    one-shot iterator as source is read once, without that pass.
    """
    from tqdm import tqdm

    from spec_format.dataset import DatasetWriter
    from spec_format.fingerprint import fingerprint_model_dir

    if dtype not in DTYPE_BYTES:
        raise SpecError(f"--dtype {dtype}: choose one of {sorted(DTYPE_BYTES)}")
    out_dir = Path(out_dir)
    target = target or fingerprint_model_dir(capturer.model)
    select = dict(
        long=long, on_error=on_error, shard_index=shard_index, num_shards=num_shards, max_rows=max_rows,
        held_out=held_out,
    )  # fmt: skip
    before = dir_bytes(out_dir)
    with (
        _nothing_left_on_failure(out_dir, num_shards),
        DatasetWriter(
            out_dir,
            target=target,
            layer_ids=capturer.layer_ids,
            hidden_size=capturer.hidden_size,
            dtype=dtype,
            compression=compression,
            samples_per_shard=samples_per_shard,
            shard_index=shard_index,
            num_shards=num_shards,
            resume=resume,
            command=command,
            data=data,
        ) as writer,
    ):
        start = writer.next_source_index
        info = writer.manifest.data  # a resumed dataset's own, its held-out count so far included
        dropped = info.held_out_dropped if info is not None else 0
        per_token = bytes_per_token(len(capturer.layer_ids), capturer.hidden_size, dtype)
        n_expected = tokens_expected = None
        if not isinstance(source, Iterator):  # a one-shot iterator cannot be read twice
            n_expected, tokens_expected = estimate(
                capturer.tokenized(source, start=start, report=None, **select)
            )
            needed = per_token * tokens_expected
            free = check_disk(out_dir, needed, force)
        if report is not None:
            size = (
                f"{n_expected} samples, {tokens_expected} tokens x {per_token} B/token = about {_human(needed)}"
                f"{' before compression' if compression else ''}; {_human(free)} free"
                if tokens_expected is not None
                else f"{per_token} B/token; the input is a one-shot iterator, so its size and the disk check are skipped"
            )
            report(
                f"[datagen] {len(capturer.layer_ids)} layers x {capturer.hidden_size} x {dtype}: {size}"
                + (f"; resuming at input row {start}" if start else "")
            )
        capturer.start()  # after every check that does not need the engine
        stats = Stats()
        t0 = time.perf_counter()
        bar = tqdm(
            total=tokens_expected,
            unit="tok",
            unit_scale=True,
            desc="capture",
            disable=not progress,
            file=sys.stderr,
        )
        with bar:
            for sample in capturer.samples(
                source,
                start=start,
                stats=stats,
                report=report,
                max_inflight_tokens=max_inflight_tokens,
                **select,
            ):
                if info is not None:  # dropped rows before this sample: committed with it (exact on resume)
                    n = bisect.bisect_left(stats.held_out, sample.source_index)
                    writer.set_data(msgspec.structs.replace(info, held_out_dropped=dropped + n))
                writer.add(
                    source_index=sample.source_index,
                    token_ids=sample.token_ids,
                    loss_mask=sample.loss_mask,
                    hidden=sample.hidden,
                )
                bar.update(len(sample.token_ids))
                bar.set_postfix(samples=f"{stats.samples}/{n_expected or '?'}", refresh=False)
        if info is not None:
            writer.set_data(msgspec.structs.replace(info, held_out_dropped=dropped + len(stats.held_out)))
    seconds = time.perf_counter() - t0
    return Summary(
        stats=stats,
        seconds=seconds,
        bytes_written=dir_bytes(out_dir) - before,
        tokens_per_s=stats.tokens / seconds if seconds > 0 else 0.0,
        out_dir=str(out_dir),
    )
