"""merge_datasets: the outputs of independent jobs (separate directories, e.g. one per machine) -> one dataset."""

from __future__ import annotations

import hashlib
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import numpy as np

from spec_format.dataset.manifest import MANIFEST, DatasetManifest, encode, fsync_dir, union
from spec_format.dataset.reader import Dataset
from spec_format.errors import SpecError


def _copy_checked(src: Path, dst: Path, checksum: str) -> None:
    """Copy src to dst, checking the sha256 of the bytes on the way (a copy is the time to catch rot)."""
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while chunk := fi.read(1 << 24):
            h.update(chunk)
            fo.write(chunk)
        fo.flush()
        os.fsync(fo.fileno())
    if "sha256:" + h.hexdigest() != checksum:
        raise SpecError(
            f"{src}: checksum is sha256:{h.hexdigest()}, the manifest says {checksum}; restore the file"
        )


def _check_disjoint(sources: list[Dataset]) -> None:
    """No input row may appear in two sources (it would be trained on twice)."""
    rows = [np.unique(ds.source_indices) for ds in sources]
    label = np.concatenate([np.full(len(r), k) for k, r in enumerate(rows)]) if rows else np.zeros(0)
    allrows = np.concatenate(rows) if rows else np.zeros(0)
    order = np.argsort(allrows, kind="stable")
    dup = np.flatnonzero(np.diff(allrows[order]) == 0)
    if len(dup):
        a, b = label[order[dup[0]]], label[order[dup[0] + 1]]
        raise SpecError(
            f"{sources[b].path}: source rows overlap with {sources[a].path} ({len(dup)} rows, e.g. row "
            f"{int(allrows[order[dup[0]]])}); the jobs did not process disjoint inputs: merge only distinct jobs"
        )


def merge_datasets(
    out_dir: str | Path, src_dirs: list[str | Path], *, copy: bool = False, command: str | None = None
) -> DatasetManifest:
    """Merge datasets (one per job) into a new directory `out_dir`, holding one manifest.json.

    Sources must share the target, layer ids, hidden size, dtype, compression and extras, and hold
    disjoint source rows. Shards are hard-linked (copied with a checksum check when `copy` or across
    filesystems) and renamed shard-000000.bin, ...; token frequencies are summed. The result is built in
    a hidden sibling directory and renamed into place, so an interrupted merge leaves no partial dataset.
    """
    out = Path(out_dir)
    if not src_dirs:
        raise SpecError("merge_datasets: give at least one source directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SpecError(f"{out}: exists and is not empty; merge into a new directory")
    resolved = [Path(d).resolve() for d in src_dirs]
    if len(set(resolved)) != len(resolved):
        raise SpecError(f"merge_datasets: a source directory is given twice ({[str(d) for d in src_dirs]})")
    sources = [Dataset(d) for d in src_dirs]
    first = sources[0].manifest
    for ds in sources[1:]:
        problems = first.settings_mismatches(ds.manifest)
        if problems:
            raise SpecError(
                f"{ds.path}: cannot merge with {sources[0].path} ({'; '.join(problems)}); "
                "merge only datasets made with the same target and settings"
            )
    filled = [ds for ds in sources if ds.manifest.shards]
    for ds in filled[1:]:
        if ds.manifest.extras != filled[0].manifest.extras:
            raise SpecError(
                f"{ds.path}: extra arrays {sorted(ds.manifest.extras)} differ from "
                f"{filled[0].path}'s {sorted(filled[0].manifest.extras)}; merge only datasets with the same extras"
            )
    _check_disjoint(sources)

    tmp = out.parent / f".{out.name}.merging"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted merge
    tmp.mkdir(parents=True)
    shards = []
    for ds in sources:
        for info in ds.manifest.shards:
            name = f"shard-{len(shards):06d}.bin"
            src, dst = ds.path / info.file, tmp / name
            if copy:
                _copy_checked(src, dst, info.checksum)
            else:
                try:
                    os.link(src, dst)
                except OSError:  # another filesystem, or no hard links there
                    _copy_checked(src, dst, info.checksum)
            shards.append(msgspec.structs.replace(info, file=name, job_index=0))
    made_by = sorted({ds.manifest.command for ds in sources if ds.manifest.command})
    now = datetime.now(UTC).isoformat(timespec="seconds")
    base = msgspec.structs.replace(
        first,
        extras=filled[0].manifest.extras if filled else first.extras,
        num_jobs=1,
        job_index=0,
        parts=[],
        command=command
        if command is not None
        else f"merge_datasets of {[str(d) for d in src_dirs]}"
        + (f"; made by: {' | '.join(made_by)}" if made_by else ""),
        created=now,
        updated=now,
    )
    merged = msgspec.structs.replace(union([ds.manifest for ds in sources], base), shards=shards, updated=now)
    with open(tmp / MANIFEST, "wb") as f:
        f.write(encode(merged))
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    if out.exists():
        out.rmdir()
    os.rename(tmp, out)
    fsync_dir(out.parent)
    return merged
