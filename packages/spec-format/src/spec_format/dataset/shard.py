"""One shard file: many samples, each a set of column arrays, with an index for O(1) random access.

Layout (little-endian; docs/dataset-format.md has the full description):

    [0, 8)            magic b"SPECSHRD"
    [8, 16)           u64 N = length of the header
    [16, 16 + N)      header: UTF-8 JSON ShardHeader (format version, storage dtype, compression, columns)
    ...               sample data: for each sample, each column's bytes, every column starting at a
                      multiple of 64 bytes (zero padding), so uncompressed arrays map without a copy
    index_offset      index: int64 [num_samples, 3 + 2 * num_columns], one row per sample:
                      source_index, num_tokens, num_supervised, then (offset, nbytes) for each column
    last 32 bytes     trailer: u64 index_offset, u64 num_samples, u64 num_columns, magic b"SPECEND1"

Samples are streamed into a temporary file and the index is appended at the end, so writing holds one
sample in memory whatever the shard size.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import struct
from pathlib import Path

import msgspec
import numpy as np

from spec_format.dataset.encoding import STORED_DTYPE, decode_hidden, decompress
from spec_format.errors import SpecError

SHARD_VERSION = 1
MAGIC = b"SPECSHRD"
END_MAGIC = b"SPECEND1"
ALIGN = 64
TRAILER = struct.Struct("<QQQ8s")
INDEX_FIXED = 3  # source_index, num_tokens, num_supervised


class Column(msgspec.Struct):
    """One array per sample. shape: -1 stands for the sample's token count T. codec: "raw" (the array's
    bytes) or "shuffle-zstd" (byte planes, see encoding.shuffle_bytes, then one zstd frame)."""

    name: str
    dtype: str  # numpy dtype string, little-endian: "<i4", "|u1", "<u2", "<f4", ...
    shape: list[int]
    codec: str = "raw"


class ShardHeader(msgspec.Struct):
    format_version: int
    dtype: str  # storage of `hidden`: "fp32" | "bf16" | "fp8"
    compression: str | None
    num_layers: int
    hidden_size: int
    columns: list[Column]


def shard_columns(
    dtype: str, compression: str | None, num_layers: int, hidden_size: int, extras: dict
) -> list[Column]:
    """The columns of a dataset's samples, in file order. `extras`: {name: ExtraSpec}, all per token."""
    codec = "shuffle-zstd" if compression == "zstd" else "raw"
    cols = [
        Column("token_ids", "<i4", [-1]),
        Column("loss_mask", "|b1", [-1]),
        Column("hidden", STORED_DTYPE[dtype].str, [-1, num_layers, hidden_size], codec),
    ]
    if dtype == "fp8":
        cols.append(Column("hidden_scale", "<f4", [-1, num_layers]))
    for name in sorted(extras):
        cols.append(Column(f"extra.{name}", extras[name].dtype, [-1, *extras[name].shape]))
    return cols


def _shape(col: Column, num_tokens: int) -> tuple[int, ...]:
    return tuple(num_tokens if d == -1 else d for d in col.shape)


class ShardBuilder:
    """Streams samples into `tmp_path`; finish() appends index and trailer and fsyncs. The caller renames
    the finished file into place (that rename is what makes the shard visible)."""

    def __init__(self, tmp_path: Path, header: ShardHeader):
        self.tmp_path = tmp_path
        self.columns = header.columns
        self._f = open(tmp_path, "wb")  # noqa: SIM115 - closed in finish()/abort()
        self._sha = hashlib.sha256()
        self._pos = 0
        self._rows: list[list[int]] = []
        head = msgspec.json.encode(header)
        self._write(MAGIC + struct.pack("<Q", len(head)) + head)

    @property
    def num_samples(self) -> int:
        return len(self._rows)

    @property
    def num_bytes(self) -> int:
        return self._pos

    def _write(self, data) -> None:
        self._f.write(data)
        self._sha.update(data)
        self._pos += len(data)

    def _pad(self) -> None:
        if self._pos % ALIGN:
            self._write(b"\0" * (ALIGN - self._pos % ALIGN))

    def add(self, source_index: int, num_tokens: int, num_supervised: int, blobs: list) -> None:
        """blobs: one bytes-like per column, in column order."""
        row = [source_index, num_tokens, num_supervised]
        for blob in blobs:
            self._pad()
            n = memoryview(blob).nbytes
            row += [self._pos, n]
            self._write(memoryview(blob).cast("B"))
        self._rows.append(row)

    def finish(self) -> tuple[int, str]:
        """Write index + trailer, fsync, close. Returns (file size, "sha256:<hex>")."""
        self._pad()
        index_offset = self._pos
        width = INDEX_FIXED + 2 * len(self.columns)
        self._write(np.asarray(self._rows, dtype="<i8").reshape(-1, width).tobytes())
        self._write(TRAILER.pack(index_offset, len(self._rows), len(self.columns), END_MAGIC))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return self._pos, "sha256:" + self._sha.hexdigest()

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
            self._f.close()
        self.tmp_path.unlink(missing_ok=True)


class ShardReader:
    """A memory-mapped shard. Opening checks the structure against what the manifest expects (header,
    trailer, index bounds and sums), so a truncated or mismatched shard fails here with one line; the
    bytes themselves are checked by checksum in Dataset.verify()."""

    def __init__(self, path: Path, expected: ShardHeader, info):
        """info: the manifest's ShardInfo for this file."""
        self.path = path
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise SpecError(
                f"{path}: shard listed in the manifest is missing; restore it or re-create the dataset"
            ) from None
        if size != info.num_bytes:
            raise SpecError(
                f"{path}: size is {size} bytes, the manifest says {info.num_bytes}; the shard is truncated "
                "or replaced: restore it, or delete it and its manifest entry and regenerate those rows"
            )
        try:
            with open(path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        except OSError as e:
            raise SpecError(f"{path}: cannot be read ({e.strerror})") from None
        self.header, self.index = self._parse(size, expected, info)
        self.columns = self.header.columns
        self._col = {c.name: i for i, c in enumerate(self.columns)}

    def _bad(self, what: str) -> SpecError:
        return SpecError(f"{self.path}: {what}; the shard is damaged: restore it or regenerate the dataset")

    def _parse(self, size: int, expected: ShardHeader, info) -> tuple[ShardHeader, np.ndarray]:
        mm = self._mm
        if size < 16 + TRAILER.size or mm[:8] != MAGIC:
            raise self._bad("not a spec dataset shard (bad magic at the start)")
        (n,) = struct.unpack("<Q", mm[8:16])
        if 16 + n > size - TRAILER.size:
            raise self._bad(f"header length {n} runs past the end of the file ({size} bytes)")
        try:
            header = msgspec.json.decode(mm[16 : 16 + n], type=ShardHeader)
        except msgspec.DecodeError as e:
            raise self._bad(f"header is not a valid shard header ({e})") from None
        if header != expected:
            diff = [
                f"{k}: {getattr(header, k)} != {getattr(expected, k)}"
                for k in ShardHeader.__struct_fields__
                if getattr(header, k) != getattr(expected, k)
            ]
            raise SpecError(
                f"{self.path}: shard does not match the manifest ({'; '.join(diff)} [shard != manifest]); "
                "the shard belongs to another dataset: restore the right file"
            )
        index_offset, num_samples, num_columns, end = TRAILER.unpack(mm[size - TRAILER.size :])
        if end != END_MAGIC:
            raise self._bad("bad magic in the trailer (the file is truncated or overwritten)")
        width = INDEX_FIXED + 2 * len(header.columns)
        if (
            num_columns != len(header.columns)
            or index_offset + num_samples * width * 8 != size - TRAILER.size
        ):
            raise self._bad(
                f"trailer (index at {index_offset}, {num_samples} samples, {num_columns} columns) "
                "does not fit the file"
            )
        if num_samples != info.num_samples:
            raise SpecError(
                f"{self.path}: holds {num_samples} samples, the manifest says {info.num_samples}; "
                "the manifest does not describe this file: restore the matching pair"
            )
        index = np.frombuffer(mm, dtype="<i8", count=num_samples * width, offset=index_offset)
        index = index.reshape(num_samples, width)
        self._check_index(index, header, info, 16 + n, index_offset)
        return header, index

    def _check_index(self, index: np.ndarray, header: ShardHeader, info, data_start: int, data_end: int):
        if not len(index):
            return
        tokens, supervised = index[:, 1], index[:, 2]
        if tokens.min() < 1 or np.any(supervised < 0) or np.any(supervised > tokens):
            raise self._bad("index has impossible token counts")
        sums = {
            "num_tokens": (int(tokens.sum()), info.num_tokens),
            "num_supervised": (int(supervised.sum()), info.num_supervised),
            "min_source_index": (int(index[:, 0].min()), info.min_source_index),
            "max_source_index": (int(index[:, 0].max()), info.max_source_index),
        }
        for field, (found, want) in sums.items():
            if found != want:
                raise SpecError(
                    f"{self.path}: {field} is {found} in the shard, the manifest says {want}; "
                    "the manifest does not describe this file: restore the matching pair"
                )
        for c, col in enumerate(header.columns):
            off, nbytes = index[:, INDEX_FIXED + 2 * c], index[:, INDEX_FIXED + 2 * c + 1]
            if np.any(off < data_start) or np.any(off + nbytes > data_end) or np.any(off % ALIGN):
                raise self._bad(f"column '{col.name}' has offsets outside the data section")
            if col.codec == "raw":
                per_token = np.dtype(col.dtype).itemsize * int(np.prod([d for d in col.shape if d != -1]))
                want = tokens * per_token if -1 in col.shape else np.full_like(tokens, per_token)
                if np.any(nbytes != want):
                    raise self._bad(f"column '{col.name}' has the wrong byte size for its shape")

    def prefetch(self, j: int) -> None:
        """Ask the kernel to read sample j's bytes now, in one go: cold reads of a memory map otherwise
        fault in one readahead window at a time."""
        cols = self.index[j, INDEX_FIXED:].reshape(-1, 2)
        start = int(cols[:, 0].min()) // mmap.PAGESIZE * mmap.PAGESIZE
        self._mm.madvise(mmap.MADV_WILLNEED, start, int((cols[:, 0] + cols[:, 1]).max()) - start)

    def array(self, j: int, name: str) -> np.ndarray:
        """Column `name` of sample j in its stored encoding (zero-copy for raw columns)."""
        c = self._col[name]
        col = self.columns[c]
        row = self.index[j]
        off, nbytes = int(row[INDEX_FIXED + 2 * c]), int(row[INDEX_FIXED + 2 * c + 1])
        shape = _shape(col, int(row[1]))
        if col.codec == "raw":
            return np.frombuffer(self._mm, dtype=col.dtype, count=int(np.prod(shape)), offset=off).reshape(
                shape
            )
        try:
            flat = decompress(
                memoryview(self._mm)[off : off + nbytes], np.dtype(col.dtype), int(np.prod(shape))
            )
        except ValueError as e:
            raise self._bad(f"sample {j}: column '{col.name}': {e}") from None
        return flat.reshape(shape)

    def extras(self, j: int) -> dict[str, np.ndarray]:
        return {c.name[6:]: self.array(j, c.name) for c in self.columns if c.name.startswith("extra.")}

    def hidden(self, j: int) -> np.ndarray:
        """float32 [T, L, H]."""
        scale = self.array(j, "hidden_scale") if self.header.dtype == "fp8" else None
        return decode_hidden(self.array(j, "hidden"), scale, self.header.dtype)
