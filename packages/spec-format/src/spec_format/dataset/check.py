"""Validation and summaries of dataset directories, for `spec validate` / `spec inspect` and Dataset.verify()."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np

from spec_format.dataset.reader import Dataset
from spec_format.errors import SpecError
from spec_format.files import file_sha256


def _content_problem(shard, vocab: int, counts: np.ndarray) -> str | None:
    """Check token ids and loss masks of every sample; add supervised token counts into `counts`."""
    for j in range(len(shard.index)):
        tok = shard.array(j, "token_ids")
        mask = shard.array(j, "loss_mask").view(np.uint8)
        if tok.min() < 0 or tok.max() >= vocab:
            return f"{shard.path}: sample {j}: token ids outside [0, {vocab}) of the target's vocabulary"
        if mask.max() > 1 or int(mask.sum()) != shard.index[j, 2]:
            return f"{shard.path}: sample {j}: loss_mask is not 0/1 or disagrees with the indexed count"
        counts += np.bincount(tok[mask.view(bool)], minlength=vocab)
    return None


def problems(ds: Dataset, deep: bool) -> Iterator[str]:
    """One line per problem. Always: every shard exists, has the manifest's size, header, sample/token
    counts and an index that fits the file. deep: also the sha256 of every file, token ids inside the
    vocabulary, loss masks of 0/1 that sum to the indexed counts, and token frequencies that match."""
    m = ds.manifest
    vocab = m.target.vocab_size
    counts = np.zeros(vocab, dtype=np.int64)
    complete = True  # every shard read: only then can the frequencies be compared
    for k, info in enumerate(m.shards):
        path = ds.path / info.file
        try:
            shard = ds.shard(k)
        except SpecError as e:
            yield str(e)
            complete = False
            continue
        if not deep:
            continue
        found = "sha256:" + file_sha256(path)
        if found != info.checksum:
            yield f"{path}: checksum is {found}, the manifest says {info.checksum}; the file is corrupted: restore it"
            complete = False
        elif problem := _content_problem(shard, vocab, counts):
            yield problem
            complete = False
    expected = m.token_frequencies.dense(vocab)
    if deep and complete and not np.array_equal(counts, expected):
        yield (
            f"{ds.path}: token_frequencies in the manifest differ from the shards' supervised tokens "
            f"for {int(np.count_nonzero(counts != expected))} ids; the manifest does not describe these "
            "shards: restore the matching manifest"
        )


def validate_dataset(path: str | Path, deep: bool = False) -> list[str]:
    """Problems of a dataset directory as one-line messages (empty when valid). deep: verify checksums."""
    try:
        ds = Dataset(path)
    except SpecError as e:
        return [str(e)]
    return list(problems(ds, deep))


def describe_dataset(path: str | Path) -> dict:
    """A summary of a dataset directory for `spec inspect` (reads the manifest only)."""
    ds = Dataset(path)
    m = ds.manifest
    t = m.target
    jobs = f"{m.num_jobs - len(ds.missing_parts)} of {m.num_jobs} written"
    if ds.missing_parts:
        jobs += f" (not yet: {', '.join(ds.missing_parts)})"
    return {
        "path": str(Path(path)),
        "kind": "dataset",
        "samples": m.num_samples,
        "tokens": m.num_tokens,
        "supervised_tokens": m.num_supervised,
        "bytes": m.num_bytes,
        "bytes_per_token": round(m.num_bytes / m.num_tokens, 1) if m.num_tokens else None,
        "layers": m.layer_ids,
        "layer_convention": m.layer_convention,
        "hidden_size": m.hidden_size,
        "dtype": m.dtype,
        "compression": m.compression,
        "target": {
            "name_or_path": t.name_or_path,
            "architecture": t.architecture,
            "num_hidden_layers": t.num_hidden_layers,
            "vocab_size": t.vocab_size,
            "config_sha256": t.config_sha256[:16],
        },
        "shards": len(m.shards),
        "jobs": jobs,
        "extras": {n: f"{s.dtype}[T,{','.join(map(str, s.shape))}]" for n, s in m.extras.items()},
        "distinct_supervised_tokens": len(m.token_frequencies.ids),
        "command": m.command,
        "data": msgspec.to_builtins(m.data) if m.data is not None else None,  # sources, held-out rows dropped
        "created": m.created,
        "updated": m.updated,
    }
