"""Dataset: O(1) random access to the samples of a dataset directory, with numpy alone.

Shards are memory-mapped on first use (at most `max_open_shards` kept open). Arrays that are stored
uncompressed come back as read-only views of the map (no copy): token_ids and loss_mask always, hidden
for fp32 and, through `raw()`, the stored bf16/fp8 bits. Copy an array before writing to it.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np

from spec_format.dataset import manifest as mf
from spec_format.dataset.shard import ShardReader
from spec_format.errors import SpecError


class Sample(NamedTuple):
    token_ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # bool [T], True = supervised (assistant) token
    hidden: np.ndarray  # float32 [T, n_layers, H]; hidden[:, j] is capture id manifest.layer_ids[j]
    source_index: int  # row of the input conversations this sample came from
    extra: dict[str, np.ndarray]  # per-token extras, [T, ...]


class RawSample(NamedTuple):
    """A sample with hidden in its stored encoding: fp32 -> float32, bf16 -> uint16 bits (torch:
    torch.from_numpy(hidden).view(torch.bfloat16)), fp8 -> uint8 e4m3fn codes with value =
    e4m3(code) * hidden_scale[t, l] (torch: .view(torch.float8_e4m3fn))."""

    token_ids: np.ndarray
    loss_mask: np.ndarray
    hidden: np.ndarray  # [T, n_layers, H] float32 | uint16 | uint8
    hidden_scale: np.ndarray | None  # float32 [T, n_layers] for fp8, else None
    source_index: int
    extra: dict[str, np.ndarray]


class Dataset:
    """A dataset directory. `ds[i]` -> Sample; `ds.raw(i)` -> RawSample; `len(ds)`; `ds.lengths`."""

    def __init__(self, path: str | Path, *, max_open_shards: int = 64):
        self.path = Path(path)
        self.manifest, self.missing_parts = mf.load(self.path)
        self._header = self.manifest.shard_header()
        self._starts = np.cumsum([0] + [s.num_samples for s in self.manifest.shards])
        self._open: OrderedDict[int, ShardReader] = OrderedDict()
        self._max_open = max_open_shards

    def __len__(self) -> int:
        return self.manifest.num_samples

    def __repr__(self) -> str:
        m = self.manifest
        return f"Dataset({str(self.path)!r}, {m.num_samples} samples, {m.num_tokens} tokens, {m.dtype})"

    def shard(self, k: int) -> ShardReader:
        """The reader of shard k (opened and checked on first use)."""
        reader = self._open.pop(k, None)
        if reader is None:
            info = self.manifest.shards[k]
            reader = ShardReader(self.path / info.file, self._header, info)
        self._open[k] = reader
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)  # the map closes once no returned array uses it
        return reader

    def locate(self, i: int) -> tuple[int, int]:
        """(shard, row in shard) of sample i."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples in {self.path}")
        i %= n
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return k, i - int(self._starts[k])

    def __getitem__(self, i: int) -> Sample:
        k, j = self.locate(i)
        s = self.shard(k)
        return Sample(
            s.array(j, "token_ids"), s.array(j, "loss_mask"), s.hidden(j), int(s.index[j, 0]), s.extras(j)
        )

    def raw(self, i: int) -> RawSample:
        k, j = self.locate(i)
        s = self.shard(k)
        scale = s.array(j, "hidden_scale") if self.manifest.dtype == "fp8" else None
        return RawSample(
            s.array(j, "token_ids"),
            s.array(j, "loss_mask"),
            s.array(j, "hidden"),
            scale,
            int(s.index[j, 0]),
            s.extras(j),
        )

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def _index_column(self, c: int) -> np.ndarray:
        cols = [self.shard(k).index[:, c] for k in range(len(self.manifest.shards))]
        return np.concatenate(cols).astype(np.int64) if cols else np.zeros(0, dtype=np.int64)

    @cached_property
    def lengths(self) -> np.ndarray:
        """int64 [len]: tokens per sample, read from the shard indexes (no hidden states are read)."""
        return self._index_column(1)

    @cached_property
    def supervised_lengths(self) -> np.ndarray:
        """int64 [len]: supervised tokens (loss_mask == 1) per sample."""
        return self._index_column(2)

    @cached_property
    def source_indices(self) -> np.ndarray:
        """int64 [len]: the input row each sample came from."""
        return self._index_column(0)

    def token_frequencies(self, vocab_size: int | None = None) -> np.ndarray:
        """int64 [vocab_size]: how often each token id is a supervised token (default: target vocab)."""
        vocab_size = self.manifest.target.vocab_size if vocab_size is None else vocab_size
        ids = self.manifest.token_frequencies.ids
        if ids and ids[-1] >= vocab_size:
            raise SpecError(
                f"{self.path}: token id {ids[-1]} occurs, so vocab_size {vocab_size} is too small"
            )
        return self.manifest.token_frequencies.dense(vocab_size)

    def verify(self) -> None:
        """Check every shard's checksum, structure and counts against the manifest; SpecError on the
        first problem (naming the shard, what was expected and what was found)."""
        from spec_format.dataset.check import problems

        found = list(problems(self, deep=True))
        if found:
            more = f" (and {len(found) - 1} more problems: run `spec validate --deep {self.path}`)"
            raise SpecError(found[0] + (more if len(found) > 1 else ""))
