"""DatasetWriter: streams samples into shards with bounded memory; a shard becomes visible only when complete.

Commit protocol for each shard: stream samples into `.shard-....bin.tmp`, append the index, fsync, rename
to the final name, fsync the directory, then rewrite this job's manifest atomically (temporary file, fsync,
rename). A writer killed at any point leaves the last manifest intact, and that manifest lists only
complete shards; the next `resume=True` run deletes the leftovers (a temporary file, or a renamed shard
whose manifest update never happened) and continues after the last listed shard.

One writer per job: an exclusive fcntl.flock on `.writer[-JOB-of-N].lock`, held until close.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import numpy as np

from spec_format.dataset.encoding import COMPRESSIONS, DTYPES, compress, encode_hidden
from spec_format.dataset.manifest import (
    MANIFEST,
    DataInfo,
    DatasetManifest,
    ExtraSpec,
    ShardInfo,
    TokenCounts,
    encode,
    fsync_dir,
    part_name,
    read_one,
    write_atomic,
)
from spec_format.dataset.shard import ShardBuilder
from spec_format.diagnostics import kill_point
from spec_format.errors import SpecError
from spec_format.fingerprint import LAYER_CONVENTION, TargetInfo

_EXTRA_NAME = re.compile(r"[A-Za-z0-9_]+")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def job_file_prefix(shard_index: int, num_shards: int) -> str:
    """Shard files of job i of n are <prefix>000000.bin, <prefix>000001.bin, ..."""
    return "shard-" if num_shards == 1 else f"shard-{shard_index:05d}-of-{num_shards:05d}-"


class DatasetWriter:
    """Write a dataset directory (see the package docstring for the API)."""

    def __init__(
        self,
        out_dir: str | Path,
        *,
        target: TargetInfo,
        layer_ids: list[int],
        hidden_size: int,
        dtype: str = "bf16",
        compression: str | None = None,
        samples_per_shard: int = 256,
        shard_bytes: int = 1 << 30,
        shard_index: int = 0,
        num_shards: int = 1,
        resume: bool = False,
        command: str = "",
        data: DataInfo | None = None,
        zstd_level: int = 1,
        ordered: bool = True,
    ):
        if dtype not in DTYPES:
            raise SpecError(f"dtype {dtype!r} is not one of {list(DTYPES)}")
        if compression not in COMPRESSIONS:
            raise SpecError(f"compression {compression!r} is not one of {list(COMPRESSIONS)}")
        if hidden_size != target.hidden_size:
            raise SpecError(f"hidden_size {hidden_size} != the target's hidden_size {target.hidden_size}")
        layer_ids = [int(k) for k in layer_ids]
        if not layer_ids or len(set(layer_ids)) != len(layer_ids):
            raise SpecError(f"layer_ids {layer_ids}: give one or more distinct capture ids")
        if min(layer_ids) < 0 or max(layer_ids) > target.num_hidden_layers:
            raise SpecError(
                f"layer_ids {layer_ids}: capture ids run from 0 to {target.num_hidden_layers} "
                f"(num_hidden_layers) for {target.name_or_path}"
            )
        if not 0 <= shard_index < num_shards:
            raise SpecError(f"shard_index {shard_index} must be in [0, num_shards={num_shards})")
        if samples_per_shard < 1 or shard_bytes < 1:
            raise SpecError("samples_per_shard and shard_bytes must be positive")
        self.path = Path(out_dir)
        self.samples_per_shard, self.shard_bytes, self.zstd_level = samples_per_shard, shard_bytes, zstd_level
        self.shard_index, self.num_shards = shard_index, num_shards
        # ordered=False: samples in any source order (spec train --online --cache writes them in training
        # order); resuming then continues after the committed samples, not after next_source_index.
        self.ordered = ordered
        self._vocab_size = target.vocab_size
        self._prefix = job_file_prefix(shard_index, num_shards)
        self._own_name = MANIFEST if num_shards == 1 else part_name(shard_index, num_shards)
        self._shard: ShardBuilder | None = None
        self._commits = 0  # shards committed by this writer (fault injection counts them)
        self._closed = False
        now = _now()
        fresh = DatasetManifest(
            target=target,
            layer_ids=layer_ids,
            layer_convention=LAYER_CONVENTION,
            hidden_size=hidden_size,
            dtype=dtype,
            compression=compression,
            num_jobs=num_shards,
            job_index=shard_index,
            command=command,
            data=data,
            created=now,
            updated=now,
        )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SpecError(f"{self.path}: cannot create the dataset directory ({e.strerror})") from None
        self._lock_fd = self._lock()
        try:
            self._manifest = self._open(fresh, resume)
        except BaseException:
            self._unlock()
            raise
        self._data = self._manifest.data  # set_data() changes it; written with the next commit
        self._extras_fixed = bool(self._manifest.shards)
        self._committed_counts = self._manifest.token_frequencies.dense(self._vocab_size)
        self._reset_shard_stats()

    # --- opening: lock, resume or start, clean up what a killed writer left ------------------------

    def _lock(self) -> int:
        n, i = self.num_shards, self.shard_index
        name = ".writer.lock" if n == 1 else f".writer-{i:05d}-of-{n:05d}.lock"
        fd = os.open(self.path / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "an unknown process"
            os.close(fd)
            raise SpecError(
                f"{self.path}: job {self.shard_index} of {self.num_shards} is being written by {holder}; "
                "wait for it to finish or stop it (two writers must not share a job)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {_now()}".encode(), 0)
        return fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _refuse_if_mismatched(self, path: Path, existing: DatasetManifest, fresh: DatasetManifest) -> None:
        problems = existing.settings_mismatches(fresh)
        if existing.num_jobs != fresh.num_jobs:
            problems.append(f"num_shards: {existing.num_jobs} != {fresh.num_jobs}")
        if problems:
            raise SpecError(
                f"{path}: the directory holds a dataset with other settings ({'; '.join(problems)} "
                "[directory != this writer]); write to a new directory or use the same settings"
            )

    def _open(self, fresh: DatasetManifest, resume: bool) -> DatasetManifest:
        if self.num_shards > 1:
            base = msgspec.structs.replace(
                fresh, job_index=None, parts=[part_name(j, self.num_shards) for j in range(self.num_shards)]
            )
            if not self._create_exclusive(MANIFEST, base):
                self._refuse_if_mismatched(self.path / MANIFEST, read_one(self.path / MANIFEST), fresh)
        own_path = self.path / self._own_name
        if not own_path.is_file():
            leftovers = sorted(p.name for p in self.path.iterdir() if self._is_own_file(p.name))
            if leftovers:
                raise SpecError(
                    f"{self.path}: holds shard files ({leftovers[0]}, ...) but no {self._own_name}; "
                    "it is not a dataset this writer can continue: choose another directory or remove them"
                )
            if self.num_shards == 1 and not self._create_exclusive(MANIFEST, fresh):
                raise SpecError(f"{own_path}: created by another writer just now; use another directory")
            if self.num_shards > 1:
                write_atomic(own_path, encode(fresh), f".{self._own_name}.tmp")
            return fresh
        existing = read_one(own_path)
        self._refuse_if_mismatched(own_path, existing, fresh)
        if existing.job_index != self.shard_index:
            raise SpecError(
                f"{own_path}: written by job {existing.job_index}, this writer is {self.shard_index}"
            )
        if existing.shards and not resume:
            raise SpecError(
                f"{own_path}: already holds {existing.num_samples} samples; pass resume=True to continue it "
                "or choose a new directory"
            )
        if not existing.shards and not resume:
            write_atomic(own_path, encode(fresh), f".{self._own_name}.tmp")
            existing = fresh
        listed = {s.file for s in existing.shards}
        for p in self.path.iterdir():  # what a killed writer of this job left behind
            if self._is_own_file(p.name) and p.name not in listed:
                p.unlink()
        (self.path / f".{self._own_name}.tmp").unlink(missing_ok=True)
        return existing

    def _is_own_file(self, name: str) -> bool:
        return re.fullmatch(rf"\.?{re.escape(self._prefix)}\d{{6}}\.bin(\.tmp)?", name) is not None

    def _create_exclusive(self, name: str, manifest: DatasetManifest) -> bool:
        """Create `name` only if absent (os.link is atomic, also on NFS). False if it already exists."""
        tmp = self.path / f".{name}.tmp-{self._prefix}{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(encode(manifest))
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, self.path / name)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.path)
        return True

    # --- writing -------------------------------------------------------------------------------------

    @property
    def next_source_index(self) -> int:
        """The first input row index this job has not committed: skip rows below it when resuming."""
        return max((s.max_source_index for s in self._manifest.shards), default=-1) + 1

    @property
    def manifest(self) -> DatasetManifest:
        """This job's committed manifest (for n jobs: its part; Dataset(path).manifest is the union)."""
        return self._manifest

    def set_data(self, data: DataInfo | None) -> None:
        """Replace the manifest's account of where the rows came from (e.g. its held-out count): written with
        the next committed shard, or at close."""
        self._data = data

    def _reset_shard_stats(self) -> None:
        self._pending_counts = np.zeros(self._vocab_size, dtype=np.int64)
        self._shard_tokens = self._shard_supervised = 0
        self._shard_sources: list[int] = []

    def _extras_spec(self, extra: dict, num_tokens: int) -> dict[str, np.ndarray]:
        """Validate `extra` against the dataset's extras (fixed by the first sample); little-endian arrays."""
        arrays = {}
        for name, value in (extra or {}).items():
            arr = np.asarray(value)
            if not _EXTRA_NAME.fullmatch(str(name)):
                raise SpecError(f"extra {name!r}: names use letters, digits and '_' only")
            if arr.dtype.kind not in "biuf":
                raise SpecError(f"extra '{name}': dtype {arr.dtype} is not numeric or bool")
            if arr.ndim < 1 or arr.shape[0] != num_tokens:
                raise SpecError(
                    f"extra '{name}': shape {arr.shape} must start with T={num_tokens} (per token)"
                )
            arrays[name] = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        specs = {n: ExtraSpec(a.dtype.str, list(a.shape[1:])) for n, a in arrays.items()}
        if not self._extras_fixed:
            self._manifest = msgspec.structs.replace(self._manifest, extras=specs)
            self._extras_fixed = True
        elif specs != self._manifest.extras:
            want = {n: (s.dtype, s.shape) for n, s in self._manifest.extras.items()}
            got = {n: (s.dtype, s.shape) for n, s in specs.items()}
            raise SpecError(f"extra arrays {got} differ from this dataset's {want} (dtype, shape after T)")
        return arrays

    def add(
        self,
        *,
        source_index: int,
        token_ids: np.ndarray,
        loss_mask: np.ndarray,
        hidden: np.ndarray,
        extra: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Append one sample. Rows must come in non-decreasing source_index order (one row may give
        several samples) unless the writer is unordered; a shard is only cut between rows, so a committed
        shard never holds half a row."""
        if self._closed:
            raise SpecError(f"{self.path}: the writer is closed")
        source_index = int(source_index)
        if self.ordered and source_index < self.next_source_index:
            raise SpecError(
                f"source_index {source_index} is already stored (next_source_index is "
                f"{self.next_source_index}); skip rows below writer.next_source_index when resuming"
            )
        if self.ordered and self._shard_sources and source_index < self._shard_sources[-1]:
            raise SpecError(
                f"source_index {source_index} after {self._shard_sources[-1]}: add rows in increasing order"
            )
        tok = np.asarray(token_ids)
        num_tokens = tok.shape[0] if tok.ndim == 1 else -1
        if tok.ndim != 1 or num_tokens < 1 or tok.dtype.kind not in "iu":
            raise SpecError(f"source_index {source_index}: token_ids must be a non-empty 1-D integer array, "
                            f"got {tok.dtype}{list(tok.shape)}")  # fmt: skip
        if tok.min() < 0 or tok.max() >= self._vocab_size:
            bad = int(tok[(tok < 0) | (tok >= self._vocab_size)][0])
            raise SpecError(
                f"source_index {source_index}: token id {bad} is outside the target's vocabulary "
                f"[0, {self._vocab_size}); the data does not belong to {self._manifest.target.name_or_path}"
            )
        mask = np.asarray(loss_mask)
        if mask.shape != (num_tokens,) or mask.dtype.kind not in "biu" or np.any((mask != 0) & (mask != 1)):
            raise SpecError(f"source_index {source_index}: loss_mask must be [T={num_tokens}] of 0/1 or bool, "
                            f"got {mask.dtype}{list(mask.shape)}")  # fmt: skip
        mask = mask.astype(bool)
        m = self._manifest
        want = (num_tokens, len(m.layer_ids), m.hidden_size)
        h = np.asarray(hidden)
        if h.shape != want or h.dtype.kind != "f":
            raise SpecError(f"source_index {source_index}: hidden must be float [T, n_layers, H] = "
                            f"{list(want)}, got {h.dtype}{list(h.shape)}")  # fmt: skip
        h = h.astype(np.float32, copy=False)
        if not (np.isfinite(h.min()) and np.isfinite(h.max())):  # NaN propagates through min/max
            raise SpecError(f"source_index {source_index}: hidden holds NaN or inf; the capture is broken")
        extras = self._extras_spec(extra, num_tokens)

        stored, scale = encode_hidden(h, m.dtype)
        blobs = [tok.astype("<i4"), mask, compress(stored, self.zstd_level) if m.compression else stored]
        if scale is not None:
            blobs.append(scale)
        blobs += [extras[name] for name in sorted(extras)]

        num_supervised = int(mask.sum())
        try:
            if (
                self._shard is not None
                and self._shard_full()
                and (not self.ordered or source_index != self._shard_sources[-1])
            ):
                self._commit_shard()
            if self._shard is None:
                name = self._shard_name()
                self._shard = ShardBuilder(self.path / f".{name}.tmp", self._manifest.shard_header())
            self._shard.add(source_index, num_tokens, num_supervised, blobs)
        except OSError as e:
            raise self._io_error(e) from None
        self._pending_counts += np.bincount(tok[mask], minlength=self._vocab_size)
        self._shard_tokens += num_tokens
        self._shard_supervised += num_supervised
        self._shard_sources.append(source_index)

    def _io_error(self, e: OSError) -> SpecError:
        return SpecError(
            f"{self.path}: writing failed ({e.strerror}); the {self._manifest.num_samples} samples "
            "committed so far are safe: fix the cause and run again with resume=True"
        )

    def _shard_full(self) -> bool:
        return self._shard.num_samples >= self.samples_per_shard or self._shard.num_bytes >= self.shard_bytes

    def _shard_name(self) -> str:
        listed = {s.file for s in self._manifest.shards}
        seq = len(listed)
        while f"{self._prefix}{seq:06d}.bin" in listed:
            seq += 1
        return f"{self._prefix}{seq:06d}.bin"

    def _commit_shard(self) -> None:
        builder, self._shard = self._shard, None
        try:
            num_bytes, checksum = builder.finish()
        except BaseException:
            builder.abort()
            raise
        final = builder.tmp_path.with_name(
            builder.tmp_path.name[1:-4]
        )  # ".shard-...bin.tmp" -> "shard-...bin"
        self._commits += 1
        kill_point("shard", self._commits, "SPEC_DATAGEN_KILL_AT")  # fault injection (diagnostics)
        os.replace(builder.tmp_path, final)
        fsync_dir(self.path)
        kill_point("manifest", self._commits, "SPEC_DATAGEN_KILL_AT")
        m = self._manifest
        info = ShardInfo(
            file=final.name,
            num_samples=builder.num_samples,
            num_tokens=self._shard_tokens,
            num_supervised=self._shard_supervised,
            num_bytes=num_bytes,
            checksum=checksum,
            min_source_index=min(self._shard_sources),
            max_source_index=max(self._shard_sources),
            job_index=self.shard_index,
        )
        counts = self._committed_counts + self._pending_counts
        self._manifest = msgspec.structs.replace(
            m,
            shards=[*m.shards, info],
            num_samples=m.num_samples + info.num_samples,
            num_tokens=m.num_tokens + info.num_tokens,
            num_supervised=m.num_supervised + info.num_supervised,
            num_bytes=m.num_bytes + info.num_bytes,
            token_frequencies=TokenCounts.from_dense(counts),
            data=self._data,
            updated=_now(),
        )
        write_atomic(self.path / self._own_name, encode(self._manifest), f".{self._own_name}.tmp")
        self._committed_counts = counts
        self._reset_shard_stats()

    def close(self) -> None:
        """Commit the last (partial) shard and release the lock."""
        if self._closed:
            return
        try:
            if self._shard is not None:
                self._commit_shard()
            elif self._data != self._manifest.data:  # e.g. held-out rows after the last sample
                self._manifest = msgspec.structs.replace(self._manifest, data=self._data, updated=_now())
                write_atomic(self.path / self._own_name, encode(self._manifest), f".{self._own_name}.tmp")
        except OSError as e:
            raise self._io_error(e) from None
        finally:
            self._closed = True
            self._unlock()

    def abort(self) -> None:
        """Drop samples not yet in a complete shard (they are redone on resume) and release the lock."""
        if self._shard is not None:
            self._shard.abort()
            self._shard = None
        self._closed = True
        self._unlock()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an exception the last row may be half-added: commit nothing of the open shard.
        if exc_type is None:
            self.close()
        else:
            self.abort()
