"""Online training (`spec train --online TARGET --data CONVERSATIONS`): vLLM captures hidden states while
the trainer runs; no dataset on disk (unless --cache DIR).

    trainer process                                  capture process (spawned; its vLLM engine core is
                                                     its child, as under spec datagen)
    tokenize every row, no capture (OnlineData):     tokenize the same rows the same way, start the
      lengths, ids, masks, token counts for the        capture engine (spec datagen's path and settings),
      draft vocabulary                                 capture the jobs in order, each sample's states
    split / Stream / pack exactly as offline           as bf16 bits (what spec datagen stores) into a
    jobs: the samples it will read, in order  ---->    bounded queue; --cache: also into a DatasetWriter
    RowLoader pulls each sample off the queue  <----

So an online run sees the samples, rows and order of an offline run on the same rows (`spec datagen`, then
`spec train` on its dataset): same split, same packing, same vocabulary; only the capture's own numerical
noise differs. A resumed run recomputes its jobs from its step. With --cache, the first epoch's samples (and
all validation samples) are written as a spec-format dataset in capture order (an unordered DatasetWriter:
complete shards only, so `spec validate --deep` accepts it after any stop) and later epochs read it.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path

import msgspec
import numpy as np

from spec_format.errors import SpecError
from spec_format.fingerprint import TargetInfo, fingerprint_model_dir, read_model_config

Job = tuple[int, bool, bool]  # (sample index, send it to the trainer, write it to the cache)


class OnlineManifest(msgspec.Struct):
    """What the trainer reads of a dataset manifest (spec_train.data.layer_indices, RowLoader)."""

    target: TargetInfo
    layer_ids: list[int]
    dtype: str = "bf16"


def layer_ids_for(algorithm: str, target: str) -> list[int]:
    """The capture ids spec datagen --algorithm ALGORITHM would capture (sorted, as vLLM returns them)."""
    from spec_datagen.capture import validate_layer_ids
    from spec_format.algorithms import default_layers

    n = read_model_config(target)["num_hidden_layers"]
    return validate_layer_ids(default_layers(algorithm, n), n)


def tokenize(target: str, data: list[str], max_len: int, long: str, on_error: str, report=None) -> list:
    """Every usable row of `data` rendered and masked exactly as spec datagen does (FILE:LINE reports,
    --on-error policy and its default held-out filter included: rows near the built-in evaluation prompts
    are dropped): [TokenizedSample], sample k = the k-th usable row."""
    from spec_datagen.heldout import HeldOut, default_sets
    from spec_datagen.pipeline import tokenized_samples
    from spec_datagen.template import ChatRenderer

    kwargs = {} if report is None else {"report": report}
    renderer = ChatRenderer.for_model(target)
    held_out = HeldOut.of(default_sets())
    return list(
        tokenized_samples(
            list(data), renderer, max_len=max_len, long=long, on_error=on_error, held_out=held_out, **kwargs
        )  # fmt: skip
    )


class OnlineData:
    """The samples of an online run without their hidden states: what train.py reads of a Dataset."""

    def __init__(self, target: str, data: list[str], algorithm: str, max_len: int, long: str, on_error: str):
        from spec_format.console import say

        self.path = Path(target)
        self.samples = tokenize(target, data, max_len, long, on_error, report=lambda m: say(m, "spec train"))
        if not self.samples:
            raise SpecError(f"--data {' '.join(data)}: no usable rows to train on")
        self.manifest = OnlineManifest(fingerprint_model_dir(target), layer_ids_for(algorithm, target))
        self.lengths = np.array([len(s.token_ids) for s in self.samples], dtype=np.int64)
        self.supervised_lengths = np.array([int(s.loss_mask.sum()) for s in self.samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def token_frequencies(self, vocab_size: int) -> np.ndarray:
        """int64 [vocab_size]: supervised-token counts over every sample, as a dataset manifest keeps them."""
        ids = np.concatenate([s.token_ids[s.loss_mask] for s in self.samples]).astype(np.int64)
        return np.bincount(ids, minlength=vocab_size)


class ShardedStream:
    """The global rows of an online run under torchrun, where rank r trains on its own capture share (the
    rows spec datagen --shard-index r --num-shards W would capture), each share its own Stream: global row
    g (step g // G, rank (g % G) // A, micro-batch g % A; data.step_rows) is row (g // G) * A + g % A of
    rank r's stream. Epoch bookkeeping (locate, the train-acceptance rows) follows rank 0's stream."""

    def __init__(self, streams: list, accum: int):
        self.streams, self.accum, self.G = streams, accum, len(streams) * accum

    def local(self, g: int) -> tuple[int, int]:
        """(rank, row of that rank's stream) of global row g."""
        s, o = divmod(g, self.G)
        r, m = divmod(o, self.accum)
        return r, s * self.accum + m

    def row(self, g: int) -> list[tuple[int, int]]:
        r, j = self.local(g)
        return self.streams[r].row(j)

    def locate(self, g: int) -> tuple[int, int]:
        return self.streams[0].locate(self.local(g)[1])

    def epoch(self, e: int):
        return self.streams[0].epoch(e)

    def rows_for_epochs(self, epochs: float) -> int:
        """Global rows of `epochs` epochs of the smallest share (every rank takes as many steps)."""
        return min(s.rows_for_epochs(epochs) for s in self.streams) // self.accum * self.G


def sharded_stream(data: OnlineData, train: np.ndarray, cfg, world: int) -> ShardedStream:
    """Per-rank streams over each rank's share of the training samples (spec datagen's split by input row)."""
    from spec_datagen.pipeline import in_shard
    from spec_train.data import Stream

    streams = []
    for r in range(world):
        share = np.array(
            [k for k in train if in_shard(data.samples[k].source_index, r, world)], dtype=np.int64
        )
        if not len(share):
            raise SpecError(
                f"--nproc {world}: rank {r}'s share of the rows holds no training sample; use fewer"
            )
        streams.append(Stream(share, data.lengths, cfg.batch_tokens, cfg.seed))
    return ShardedStream(streams, cfg.grad_accum)


def capture_jobs(val: np.ndarray, held: list[int], stream, first_row: int, end_row: int, cached: int | None):
    """The capture process's work, in order: [(sample, send, write)].

    First every sample the evaluations read (`held`: validation rows, then the train-acceptance rows),
    which the trainer keeps; then the samples of global rows [first_row, end_row). With a cache holding
    `cached` samples, its content is W = all validation samples ++ the first epoch's samples in row order:
    positions of W at or past `cached` are written, and rows after the first epoch are read from it."""
    rows = lambda a, b: [i for r in range(a, b) for i, _ in stream.row(r)]  # noqa: E731
    if cached is None:
        return [(i, True, False) for i in held] + [(i, True, False) for i in rows(first_row, end_row)]
    in_val = set(val.tolist())
    n_held_val = sum(1 for i in held if i in in_val)  # held starts with a prefix of val (Rows keeps order)
    jobs = [(int(i), q < n_held_val, q >= cached) for q, i in enumerate(val)]
    jobs += [(i, True, False) for i in held[n_held_val:]]
    e0_rows = min(end_row, stream.epoch_start(1))
    e0 = rows(0, e0_rows)
    p = len(rows(0, min(first_row, e0_rows)))  # the first epoch-0 sample the trainer still reads
    for j in range(min(p, max(cached - len(val), 0)), len(e0)):
        jobs.append((e0[j], j >= p, len(val) + j >= cached))
    return [j for j in jobs if j[1] or j[2]]


def capture_main(target, data, layer_ids, max_len, long, jobs, out, cache, cache_kwargs, parent, gpu) -> None:
    """The capture process: (sample index, bf16 bits [T, n_layers, H] uint16) for each job to send, then
    ("done", None); ("error", message) if anything fails. Stops when the trainer (pid `parent`) is gone.
    `gpu`: the CUDA device its engine uses (the rank's own), None on a CPU."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    # A process group of its own, which its vLLM engine processes join: they outlive a capture process
    # that is killed (measured: 4.6 GB held by the orphaned EngineCore and Worker), so the trainer kills
    # the group once this process is gone (kill_capture_group).
    os.setpgid(0, 0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # Feed.close: leave through `with`, engine stopped
    from spec_datagen.capture import capture
    from spec_datagen.pipeline import Capturer
    from spec_format.dataset import DatasetWriter
    from spec_format.diagnostics import kill_point
    from spec_format.tensors import float32_to_bf16_bits

    def put(item) -> None:
        while True:
            try:
                return out.put(item, timeout=1.0)
            except queue_mod.Full:
                if os.getppid() != parent:
                    raise SystemExit(1) from None

    writer = None
    try:
        samples = tokenize(target, data, max_len, long, "skip")
        with Capturer(target, layer_ids=layer_ids, max_len=max_len) as cap:
            if cache is not None:
                writer = DatasetWriter(cache, target=fingerprint_model_dir(target), layer_ids=cap.layer_ids,
                                       hidden_size=cap.hidden_size, dtype="bf16", resume=True, ordered=False,
                                       **cache_kwargs)  # fmt: skip
            n_send, sent = sum(send for _, send, _ in jobs), 0
            for (k, send, write), s in zip(jobs, capture(cap.llm, (samples[k] for k, _, _ in jobs))):
                if os.getppid() != parent:  # the trainer is gone: write nothing more into its cache
                    raise SystemExit(1)
                if write:
                    writer.add(source_index=s.source_index, token_ids=s.token_ids, loss_mask=s.loss_mask,
                               hidden=s.hidden)  # fmt: skip
                if send:
                    sent += 1
                    kill_point("send", sent, "SPEC_CAPTURE_KILL_AT")  # fault injection (diagnostics)
                    kill_point("send", sent - 1 - n_send, "SPEC_CAPTURE_KILL_AT")  # -1: the last
                    put((k, float32_to_bf16_bits(s.hidden)))
            if writer is not None:
                writer.close()
        put(("done", None))
    except SystemExit:
        raise
    except BaseException as e:  # the trainer reports it (one line) and stops
        if writer is not None:
            writer.abort()
        put(("error", str(e) if isinstance(e, SpecError) else f"{type(e).__name__}: {e}"))


def kill_capture_group(pid: int) -> None:
    """Stop what is left of capture process `pid`'s process group (its engine processes): SIGTERM, which
    lets them release their shared memory (else the resource tracker warns at exit), SIGKILL after 10 s;
    returns once the group is empty (or 5 s after the SIGKILL)."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.1)


class Inbox:
    """What a capture process puts on its queue, in order, or one line when the process dies.

    A process killed in the middle of a message leaves part of it in the pipe, and Queue.get then waits
    in recv for the rest for ever (the reader holds the pipe's write end too, so no EOF comes): a trainer
    that hung. So a daemon thread does the blocking reads, and get() waits on its one-item hand-off (the
    queue's bound stays) with a timeout, checking that the process lives. A thread stuck on a dead writer
    does not keep the trainer from exiting."""

    def __init__(self, q, proc):
        self.proc, self._handoff = proc, queue_mod.Queue(maxsize=1)
        threading.Thread(target=self._read, args=(q,), name="spec-capture-reader", daemon=True).start()

    def _read(self, q) -> None:
        while True:
            item = q.get()
            self._handoff.put(item)
            if item[0] in ("done", "error"):
                return

    def get(self):
        while True:
            try:
                return self._handoff.get(timeout=1.0)
            except queue_mod.Empty:
                if not self.proc.is_alive():
                    try:  # what it put whole before it ended (its "error", say) is still on its way
                        return self._handoff.get(timeout=1.0)
                    except queue_mod.Empty:
                        pass
                    kill_capture_group(self.proc.pid)
                    raise SpecError(
                        f"the capture engine (process {self.proc.pid}) died (exit code {self.proc.exitcode}) "
                        "while training; the last checkpoint is intact: run the same command with --resume"
                    ) from None


class Feed:
    """The trainer's end of the capture process: captured samples in job order."""

    def __init__(self, cfg, data: OnlineData, jobs: list[Job], cache_kwargs: dict, gpu: int | None):
        ctx = mp.get_context("spawn")  # a fresh interpreter: vLLM and torch threads do not fork well
        self.queue = ctx.Queue(maxsize=cfg.online_queue)
        self.expected = deque(k for k, send, _ in jobs if send)
        self.done = False
        args = (cfg.online, list(cfg.data), list(data.manifest.layer_ids), cfg.max_len, cfg.long, jobs,
                self.queue, cfg.cache, cache_kwargs, os.getpid(), gpu)  # fmt: skip
        self.proc = ctx.Process(target=capture_main, args=args, name="spec-capture")
        self.proc.start()
        atexit.register(
            self.close
        )  # also when training stops with an error (before multiprocessing joins it)
        self.inbox = Inbox(self.queue, self.proc)

    @property
    def exhausted(self) -> bool:
        return not self.expected

    def next(self, k: int) -> np.ndarray:
        """The bf16 bits of sample k, which must be the next job the trainer reads."""
        want = self.expected.popleft() if self.expected else None
        if want != k:
            raise RuntimeError(
                f"online data out of order: the trainer reads sample {k}, capture sends {want}"
            )
        got, bits = self.inbox.get()
        if got == "error":
            raise SpecError(f"capture failed: {bits}")
        if got != k:
            raise RuntimeError(f"online data out of order: expected sample {k}, got {got}")
        return bits

    def wait_done(self) -> None:
        """Block until the capture process has finished (its cache committed)."""
        if not self.done:
            kind, msg = self.inbox.get()
            if kind == "error":
                raise SpecError(f"capture failed: {msg}")
            self.done = True
            self.proc.join()

    def close(self) -> None:
        atexit.unregister(self.close)
        if self.proc.is_alive():
            self.proc.terminate()  # it leaves through `with`: its engine stopped, the cache's shards kept
        self.proc.join(timeout=30)
        kill_capture_group(self.proc.pid)  # whatever of its engine is left (it was killed, or hangs)


class OnlineSample:
    """A RawSample whose hidden states are fetched when read (the loader reads them once per row)."""

    def __init__(self, view, i: int):
        s = view.data.samples[i]
        self.token_ids, self.loss_mask, self._view, self._i = s.token_ids, s.loss_mask, view, i

    @property
    def hidden(self) -> np.ndarray:
        return self._view.hidden(self._i)


class HeldView:
    """Evaluation rows' samples, captured once at the start and kept in memory."""

    def __init__(self, data: OnlineData, held: dict[int, np.ndarray]):
        self.data, self.manifest, self.held = data, data.manifest, held

    def raw(self, i: int) -> OnlineSample:
        return OnlineSample(self, i)

    def hidden(self, i: int) -> np.ndarray:
        return self.held[i]


class StreamView:
    """Training rows' samples in stream order: off the capture queue, then (with --cache) from the cache."""

    def __init__(self, data: OnlineData, feed: Feed, cache: str | None):
        self.data, self.manifest, self.feed, self.cache = data, data.manifest, feed, cache
        self._cached = None

    def raw(self, i: int) -> OnlineSample:
        return OnlineSample(self, i)

    def hidden(self, i: int) -> np.ndarray:
        if not self.feed.exhausted:
            return self.feed.next(i)
        if self._cached is None:
            from spec_format.dataset import Dataset

            if self.cache is None:
                raise RuntimeError("online training read past the captured rows")
            self.feed.wait_done()
            ds = Dataset(self.cache)
            self._cached = (ds, {int(s): j for j, s in enumerate(ds.source_indices)})
        ds, where = self._cached
        return ds.raw(where[self.data.samples[i].source_index]).hidden


def cached_samples(cache: str, resume: bool) -> int:
    """Samples already committed to the --cache directory (0 for a new one)."""
    from spec_format.dataset import Dataset

    path = Path(cache)
    if not path.exists() or not any(path.iterdir()):
        return 0
    if not resume:
        raise SpecError(f"--cache {cache}: exists and is not empty; choose another directory (or --resume the run "
                        "that wrote it)")  # fmt: skip
    return len(Dataset(path))


def start(cfg, data: OnlineData, stream, val: np.ndarray, val_rows, train_eval_rows, first_step, end_step, d):
    """Start this rank's capture process and take the evaluation samples (every rank keeps all of them):
    (StreamView, HeldView, Feed). The process captures the samples of this rank's rows of the steps
    [first_step, end_step): under torchrun those of its own share's stream (ShardedStream)."""
    held = list(dict.fromkeys(i for row in [*val_rows, *train_eval_rows] for i, _ in row))
    cached = cached_samples(cfg.cache, cfg.resume) if cfg.cache else None
    A = cfg.grad_accum
    own, G = (stream.streams[d.rank], A) if isinstance(stream, ShardedStream) else (stream, d.world * A)
    jobs = capture_jobs(val, held, own, first_step * G, end_step * G, cached)
    cache_kwargs = {
        "samples_per_shard": cfg.samples_per_shard,
        "command": f"spec train --online {cfg.online}",
    }
    feed = Feed(cfg, data, jobs, cache_kwargs, d.device.index if d.device.type == "cuda" else None)
    try:
        kept = {i: feed.next(i) for i in held}
    except BaseException:
        feed.close()
        raise
    return StreamView(data, feed, cfg.cache), HeldView(data, kept), feed
