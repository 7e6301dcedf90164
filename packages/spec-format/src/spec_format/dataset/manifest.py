"""The dataset manifest: what the directory holds, which target and layers made it, and every shard's counts
and checksum. One JSON file, replaced atomically (write a temporary file, fsync, rename).

A directory written by one job has `manifest.json` with everything. A directory written by n jobs at once
(shared filesystem) has `manifest.json` holding only the settings and the list `parts` of per-job manifest
files `manifest.job-0000i-of-0000n.json`; each job rewrites only its own part, so jobs never contend for a
file. Readers take the union of the parts that exist.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import msgspec
import numpy as np

from spec_format.dataset.shard import SHARD_VERSION, ShardHeader, shard_columns
from spec_format.errors import SpecError
from spec_format.files import seal_json, seal_problem
from spec_format.fingerprint import LAYER_CONVENTION, TargetInfo

FORMAT = "spec-dataset"
FORMAT_VERSION = 2  # 2: the file is sealed (spec_format.files.seal_json); 1 (unsealed) is still read
MANIFEST = "manifest.json"
SEAL = "manifest_sha256"


class ShardInfo(msgspec.Struct, kw_only=True):
    file: str  # name inside the dataset directory
    num_samples: int
    num_tokens: int
    num_supervised: int  # tokens with loss_mask == 1
    num_bytes: int  # file size
    checksum: str  # "sha256:<hex>" of the whole file
    min_source_index: int
    max_source_index: int
    job_index: int = 0


class ExtraSpec(msgspec.Struct):
    """An extra named per-token array stored with every sample: [T, *shape]."""

    dtype: str  # numpy dtype string, little-endian
    shape: list[int]  # after the leading T


class TokenCounts(msgspec.Struct):
    """Sparse counts of supervised target tokens (loss_mask == 1): ids ascending, counts > 0."""

    ids: list[int] = []
    counts: list[int] = []

    def dense(self, vocab_size: int) -> np.ndarray:
        out = np.zeros(vocab_size, dtype=np.int64)
        out[np.asarray(self.ids, dtype=np.int64)] = self.counts
        return out

    @staticmethod
    def from_dense(counts: np.ndarray) -> TokenCounts:
        ids = np.flatnonzero(counts)
        return TokenCounts(ids.tolist(), counts[ids].tolist())


class DataSource(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One --data source as given; for a Hub dataset (`hf:`) also what `datasets` resolved."""

    source: str
    dataset_id: str | None = None  # the Hub id (a local directory in the Hub's layout: its path)
    config: str | None = None
    split: str | None = None
    revision: str | None = None  # the commit the Hub resolved (None for a local directory)
    seed: int | None = None  # rows shuffled with this seed (spec datagen --seed)


class DataInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Where the rows came from. Optional: datasets written before it have none."""

    sources: list[DataSource] = []
    max_samples: int | None = None  # rows of each job's share taken (spec datagen --max-samples)
    held_out: list[str] = []  # evaluation sets whose near-duplicates were kept out of the data
    held_out_dropped: int = 0  # rows dropped as near-duplicates of them (before the last committed sample)


class DatasetManifest(msgspec.Struct, kw_only=True):
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    target: TargetInfo
    layer_ids: list[int]  # hidden[:, j] is capture id layer_ids[j]
    layer_convention: str = LAYER_CONVENTION
    hidden_size: int
    dtype: Literal["fp32", "bf16", "fp8"]
    compression: Literal["zstd"] | None = None
    checksum: str = "sha256"
    extras: dict[str, ExtraSpec] = {}
    num_jobs: int = 1  # the writers' num_shards
    job_index: int | None = 0  # the writer's shard_index; None for the settings-only manifest of n jobs
    parts: list[str] = []  # per-job manifest files (multi-job directories only)
    shards: list[ShardInfo] = []
    num_samples: int = 0
    num_tokens: int = 0
    num_supervised: int = 0
    num_bytes: int = 0
    token_frequencies: TokenCounts = msgspec.field(default_factory=TokenCounts)
    command: str = ""  # what made the dataset, as the caller gave it
    data: DataInfo | None = None  # where its rows came from (spec datagen writes it)
    created: str = ""  # ISO 8601 UTC
    updated: str = ""

    def shard_header(self) -> ShardHeader:
        """The header every shard of this dataset must carry."""
        cols = shard_columns(self.dtype, self.compression, len(self.layer_ids), self.hidden_size, self.extras)
        return ShardHeader(
            SHARD_VERSION, self.dtype, self.compression, len(self.layer_ids), self.hidden_size, cols
        )

    def settings_mismatches(self, other: DatasetManifest) -> list[str]:
        """Differences that make two manifests' samples incompatible ('dtype: bf16 != fp8')."""
        out = [f"target {m}" for m in self.target.mismatches(other.target)]
        for field in ("layer_ids", "layer_convention", "hidden_size", "dtype", "compression"):
            a, b = getattr(self, field), getattr(other, field)
            if a != b:
                out.append(f"{field}: {a} != {b}")
        return out


def part_name(job_index: int, num_jobs: int) -> str:
    return f"manifest.job-{job_index:05d}-of-{num_jobs:05d}.json"


def encode(manifest: DatasetManifest) -> bytes:
    # Compact (token_frequencies can hold 100k+ numbers) and sealed: a flipped byte anywhere is found.
    return seal_json(msgspec.json.encode(manifest), SEAL)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, tmp_name: str) -> None:
    """Replace `path` by `data`: readers see the old or the new file, never a partial one."""
    tmp = path.with_name(tmp_name)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_one(path: Path) -> DatasetManifest:
    """Decode and check one manifest file (a full manifest or a part)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{path}: not found; is this a dataset directory?") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        raw = msgspec.json.decode(data)
        version = raw.get("format_version", 1) if isinstance(raw, dict) else 1
        sealed = isinstance(raw, dict) and (SEAL in raw or not isinstance(version, int) or version >= 2)
        if sealed and (problem := seal_problem(data, SEAL)):
            raise SpecError(
                f"{path}: {problem}: the manifest is corrupted: restore it or re-create the dataset"
            )
        m = msgspec.json.decode(data, type=DatasetManifest)
    except msgspec.ValidationError as e:
        raise SpecError(
            f"{path}: {e}; the manifest is damaged: restore it or re-create the dataset"
        ) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as e:  # a flipped byte can make invalid UTF-8
        raise SpecError(
            f"{path}: not valid JSON ({e}); restore the manifest or re-create the dataset"
        ) from None
    if m.format != FORMAT:
        raise SpecError(f"{path}: field 'format' is {m.format!r}, expected {FORMAT!r}: not a spec dataset")
    if m.format_version > FORMAT_VERSION:
        raise SpecError(
            f"{path}: format_version {m.format_version} is newer than this spec-format reads "
            f"({FORMAT_VERSION}); upgrade spec-format"
        )
    _check_totals(path, m)
    return m


def _check_totals(path: Path, m: DatasetManifest) -> None:
    if m.hidden_size < 1 or not m.layer_ids:
        raise SpecError(
            f"{path}: hidden_size and layer_ids must be positive / non-empty; the manifest is damaged"
        )
    for k, s in enumerate(m.shards):
        if min(s.num_samples, s.num_tokens, s.num_supervised, s.num_bytes) < 0:
            raise SpecError(f"{path}: shards[{k}] has a negative count; the manifest is damaged: restore it")
    for field in ("num_samples", "num_tokens", "num_supervised", "num_bytes"):
        total = sum(getattr(s, field) for s in m.shards)
        if getattr(m, field) != total:
            raise SpecError(
                f"{path}: field '{field}' is {getattr(m, field)} but its shards sum to {total}; "
                "the manifest is damaged: restore it"
            )
    if len(m.token_frequencies.ids) != len(m.token_frequencies.counts):
        raise SpecError(f"{path}: token_frequencies has {len(m.token_frequencies.ids)} ids but "
                        f"{len(m.token_frequencies.counts)} counts; the manifest is damaged: restore it")  # fmt: skip
    ids = np.asarray(m.token_frequencies.ids, dtype=np.int64)
    if len(ids) and (ids[0] < 0 or ids[-1] >= m.target.vocab_size or np.any(np.diff(ids) <= 0)):
        raise SpecError(f"{path}: token_frequencies.ids must ascend within [0, {m.target.vocab_size}) "
                        "(the target's vocab_size); the manifest is damaged: restore it")  # fmt: skip
    if min(m.token_frequencies.counts, default=1) < 1:
        raise SpecError(
            f"{path}: token_frequencies.counts must be positive; the manifest is damaged: restore it"
        )
    if sum(m.token_frequencies.counts) != m.num_supervised:
        raise SpecError(
            f"{path}: token_frequencies sum to {sum(m.token_frequencies.counts)} but num_supervised is "
            f"{m.num_supervised}; the manifest is damaged: restore it"
        )
    names = [s.file for s in m.shards]
    if len(set(names)) != len(names) or any("/" in n or n.startswith(".") for n in names):
        raise SpecError(f"{path}: shard file names must be unique plain names; the manifest is damaged")


def union(parts: list[DatasetManifest], base: DatasetManifest) -> DatasetManifest:
    """One manifest holding every part's shards, totals and summed token frequencies."""
    shards = [s for p in parts for s in p.shards]
    extras = next((p.extras for p in parts if p.shards), base.extras)
    freq: dict[int, int] = {}
    for p in parts:
        for i, c in zip(p.token_frequencies.ids, p.token_frequencies.counts, strict=True):
            freq[i] = freq.get(i, 0) + c
    ids = sorted(freq)
    data = base.data
    if data is not None:  # every job drops its own share's held-out rows
        dropped = sum(p.data.held_out_dropped for p in parts if p.data is not None)
        data = msgspec.structs.replace(data, held_out_dropped=dropped)
    return msgspec.structs.replace(
        base,
        data=data,
        extras=extras,
        shards=shards,
        num_samples=sum(s.num_samples for s in shards),
        num_tokens=sum(s.num_tokens for s in shards),
        num_supervised=sum(s.num_supervised for s in shards),
        num_bytes=sum(s.num_bytes for s in shards),
        token_frequencies=TokenCounts(ids, [freq[i] for i in ids]),
        updated=max([p.updated for p in parts] + [base.updated]),
    )


def check_part(path: Path, part: DatasetManifest, base: DatasetManifest, job_index: int) -> None:
    """A job's part manifest must agree with the directory's settings manifest."""
    problems = base.settings_mismatches(part)
    if part.num_jobs != base.num_jobs or part.job_index != job_index:
        problems.append(
            f"job {part.job_index} of {part.num_jobs} != job {job_index} of {base.num_jobs} (from the file name)"
        )
    if problems:
        raise SpecError(
            f"{path}: does not match {MANIFEST} ({'; '.join(problems)}); "
            "a job wrote with other settings: move its files to their own directory"
        )


def load(path: str | Path) -> tuple[DatasetManifest, list[str]]:
    """(the dataset's manifest, with multi-job parts unioned; names of parts not written yet)."""
    root = Path(path)
    base = read_one(root / MANIFEST)
    if not base.parts:
        return base, []
    parts, missing = [], []
    for j, name in enumerate(base.parts):
        if name != part_name(j, base.num_jobs):
            raise SpecError(
                f"{root / MANIFEST}: parts[{j}] is {name!r}, expected {part_name(j, base.num_jobs)!r}"
            )
        if not (root / name).is_file():
            missing.append(name)
            continue
        part = read_one(root / name)
        check_part(root / name, part, base, j)
        first = next((p for p in parts if p.shards), None)
        if part.shards and first is not None and part.extras != first.extras:
            raise SpecError(
                f"{root / name}: extra arrays {sorted(part.extras)} differ from job {first.job_index}'s "
                f"{sorted(first.extras)}; every job must store the same extras"
            )
        parts.append(part)
    return union(parts, base), missing
