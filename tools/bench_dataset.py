"""Our dataset store vs one safetensors file per sample (the vllm-project/speculators layout), side by side.

The same hidden states are written and read both ways in one run. For each storage option it prints
bytes/token, write speed, sequential and random read speed (samples/s, each sample decoded to float32),
ours / theirs and the ratio, then the reconstruction error of the lossy options per layer.

Theirs: `hs_{i}.safetensors` with `hidden_states` [T, n_layers, H] and `token_ids` [T], written with
safetensors' numpy-level API (numpy has no bf16, so the bits are encoded by hand and passed as BF16), and
read with a numpy memory map (safetensors' numpy loader cannot read BF16), plus safetensors.torch where
torch is installed (what speculators' trainer does). Theirs is fp32 for our fp32 row and bf16 otherwise.

Reads are measured cold (files evicted from the page cache with posix_fadvise, only our own files) and
warm (the same pass again, files cached).

    uv run --no-sync python tools/bench_dataset.py                       # 500 x 512 tokens x 4 x 576
    uv run --no-sync python tools/bench_dataset.py --samples 50 --tokens 128   # quick
    uv run --no-sync python tools/bench_dataset.py --real DATASET_DIR    # samples of an existing dataset
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors import TensorSpec, serialize_file
from synthetic_states import synthetic_sample  # tools/, beside this script
from tqdm import tqdm

from spec_format.dataset import Dataset, DatasetWriter
from spec_format.dataset.encoding import encode_hidden
from spec_format.fingerprint import TargetInfo, default_eagle3_layers
from spec_format.tensors import load_tensors

OPTIONS = {  # label -> (dtype, compression)
    "fp32": ("fp32", None),
    "bf16": ("bf16", None),
    "bf16+zstd": ("bf16", "zstd"),
    "fp8": ("fp8", None),
    "fp8+zstd": ("fp8", "zstd"),
}


class Source:
    """The samples under test: synthetic (regenerated per index, nothing held in memory) or a real dataset."""

    def __init__(self, args):
        self.real = Dataset(args.real) if args.real else None
        if self.real is not None:
            m = self.real.manifest
            self.n = min(args.samples, len(self.real))
            self.target, self.layer_ids, self.hidden = m.target, m.layer_ids, m.hidden_size
            self.desc = f"{self.n} real samples of {args.real} ({m.dtype} there; {m.target.name_or_path})"
        else:
            self.n, self.tokens = args.samples, args.tokens
            self.target = TargetInfo(
                name_or_path="synthetic",
                architecture="LlamaForCausalLM",
                model_type="llama",
                hidden_size=args.hidden,
                vocab_size=49152,
                num_hidden_layers=30,
                config_sha256="0" * 64,
            )
            self.layer_ids = default_eagle3_layers(30)[: args.layers]
            self.hidden = args.hidden
            self.desc = (
                f"{self.n} synthetic samples x {self.tokens} tokens x {args.layers} layers x H={args.hidden}"
            )

    def __getitem__(self, i: int):
        if self.real is not None:
            s = self.real[i]
            return np.array(s.token_ids), np.array(s.loss_mask), np.array(s.hidden)
        rng = np.random.default_rng(1000 + i)
        return synthetic_sample(rng, self.tokens, len(self.layer_ids), self.hidden, self.target.vocab_size)


def evict(paths) -> None:
    """Drop these files from the page cache (only ours: nothing else on the machine is touched)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def touch(arr: np.ndarray) -> int:
    """Read one byte per 4 KiB page: forces a lazily mapped array in without adding compute."""
    return int(arr.reshape(-1).view(np.uint8)[::4096].sum())


def progress(it, desc):
    return tqdm(it, desc=desc, file=sys.stderr, leave=False, unit="sample")


def write_ours(src: Source, path: Path, dtype: str, compression: str | None) -> tuple[float, int]:
    """(seconds spent in the writer, bytes on disk)."""
    spent = 0.0
    w = DatasetWriter(
        path,
        target=src.target,
        layer_ids=src.layer_ids,
        hidden_size=src.hidden,
        dtype=dtype,
        compression=compression,
        command="tools/bench_dataset.py",
    )
    for i in progress(range(src.n), f"write ours {path.name}"):
        tok, mask, hid = src[i]
        t0 = time.perf_counter()
        w.add(source_index=i, token_ids=tok, loss_mask=mask, hidden=hid)
        spent += time.perf_counter() - t0
    t0 = time.perf_counter()
    w.close()
    spent += time.perf_counter() - t0
    return spent, w.manifest.num_bytes


def write_theirs(src: Source, path: Path, dtype: str) -> tuple[float, int]:
    path.mkdir(parents=True)
    spent, size = 0.0, 0
    for i in progress(range(src.n), f"write theirs {dtype}"):
        tok, _, hid = src[i]
        t0 = time.perf_counter()
        data = encode_hidden(hid, dtype)[0]  # the same bf16 rounding code as ours
        tok = np.ascontiguousarray(tok, np.int32)
        f = path / f"hs_{i}.safetensors"
        serialize_file(
            {
                "hidden_states": TensorSpec(
                    dtype="bfloat16" if dtype == "bf16" else "float32",
                    shape=data.shape,
                    data_ptr=data.ctypes.data,
                    data_len=data.nbytes,
                ),
                "token_ids": TensorSpec(
                    dtype="int32", shape=tok.shape, data_ptr=tok.ctypes.data, data_len=tok.nbytes
                ),
            },
            str(f),
            metadata=None,
        )
        spent += time.perf_counter() - t0
        size += f.stat().st_size
    return spent, size


def read_ours(path: Path, order) -> float:
    ds = Dataset(path)
    t0 = time.perf_counter()
    for i in order:
        s = ds[i]
        touch(s.hidden)
        touch(s.token_ids)
    return len(order) / (time.perf_counter() - t0)


def read_theirs(path: Path, order) -> float:
    t0 = time.perf_counter()
    for i in order:
        d = load_tensors(path / f"hs_{i}.safetensors")  # bf16 -> float32, like ours
        touch(d["hidden_states"])
        touch(d["token_ids"])
    return len(order) / (time.perf_counter() - t0)


def read_ours_raw(path: Path, order) -> float:
    """The stored bits, as a torch trainer takes them (torch.from_numpy(...).view(torch.bfloat16))."""
    ds = Dataset(path)
    t0 = time.perf_counter()
    for i in order:
        s = ds.raw(i)
        touch(s.hidden)
        touch(s.token_ids)
    return len(order) / (time.perf_counter() - t0)


def read_theirs_torch(path: Path, order) -> float:
    """What speculators' trainer does: safetensors.torch.load_file -> a bf16 tensor."""
    import torch
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    for i in order:
        d = load_file(path / f"hs_{i}.safetensors")
        touch(d["hidden_states"].view(torch.uint16).numpy())
        touch(d["token_ids"].numpy())
    return len(order) / (time.perf_counter() - t0)


READS = ("seq cold", "rand cold", "seq warm", "rand warm")


def compare_reads(a, b, n: int, repeats: int, rng) -> tuple[dict, dict]:
    """samples/s of two readers, a = (reader, path, files), for each of READS: best of `repeats`, the two
    readers interleaved so that load from other processes hits both alike."""
    best_a, best_b = dict.fromkeys(READS, 0.0), dict.fromkeys(READS, 0.0)
    for _ in range(repeats):
        for kind, order in (("seq", list(range(n))), ("rand", rng.permutation(n).tolist())):
            for (reader, path, files), best in ((a, best_a), (b, best_b)):
                gc.collect()  # close memory maps of earlier passes, so evicted pages stay evicted
                evict(files)
                best[f"{kind} cold"] = max(best[f"{kind} cold"], reader(path, order))
                best[f"{kind} warm"] = max(best[f"{kind} warm"], reader(path, order))
    return best_a, best_b


def errors(src: Source, path: Path, count: int) -> list[tuple[float, float, float]]:
    """Per layer: (relative L2 error, max abs error, max abs value) over the first `count` samples."""
    ds = Dataset(path)
    n_layers = len(src.layer_ids)
    sq_err, sq, max_err, max_val = (np.zeros(n_layers) for _ in range(4))
    for i in range(min(count, src.n)):
        hid = src[i][2].astype(np.float64)
        diff = ds[i].hidden.astype(np.float64) - hid
        sq_err += (diff**2).sum(axis=(0, 2))
        sq += (hid**2).sum(axis=(0, 2))
        max_err = np.maximum(max_err, np.abs(diff).max(axis=(0, 2)))
        max_val = np.maximum(max_val, np.abs(hid).max(axis=(0, 2)))
    return [
        (float(np.sqrt(e / s)), float(m), float(v))
        for e, s, m, v in zip(sq_err, sq, max_err, max_val, strict=True)
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--real", help="take samples from this dataset directory instead of synthetic ones")
    p.add_argument("--options", default=",".join(OPTIONS), help=f"comma-separated, from {list(OPTIONS)}")
    p.add_argument("--repeats", type=int, default=3, help="read passes per measurement (the best counts)")
    p.add_argument("--dir", help="where to write (default: a temporary directory, removed afterwards)")
    p.add_argument("--error-samples", type=int, default=64)
    args = p.parse_args()
    options = args.options.split(",")
    src = Source(args)
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-dataset-"))
    root.mkdir(parents=True, exist_ok=True)
    have_torch = importlib.util.find_spec("torch") is not None
    rng = np.random.default_rng(0)
    tokens = sum(len(src[i][0]) for i in range(src.n)) if src.real is not None else src.n * src.tokens
    input_mb = tokens * len(src.layer_ids) * src.hidden * 4 / 1e6  # the float32 hidden states written
    print(
        f"data: {src.desc}; {tokens} tokens, {input_mb:.0f} MB as float32; {os.cpu_count()} CPUs; dir {root}"
    )
    print(f"reads: best of {args.repeats} passes over all samples, ours and theirs interleaved")

    theirs: dict[str, dict] = {}
    rows = []
    try:
        for label in options:
            dtype, compression = OPTIONS[label]
            base = "fp32" if dtype == "fp32" else "bf16"
            tpath = root / f"theirs-{base}"
            if base not in theirs:
                secs, size = write_theirs(src, tpath, base)
                theirs[base] = {"write": input_mb / secs, "bytes": size / tokens}
            tfiles = sorted(tpath.iterdir())
            path = root / f"ours-{label}"
            secs, size = write_ours(src, path, dtype, compression)
            files = [f for f in path.iterdir() if f.suffix == ".bin"]
            ours = {"write": input_mb / secs, "bytes": size / tokens}
            reads = compare_reads(
                (read_ours, path, files), (read_theirs, tpath, tfiles), src.n, args.repeats, rng
            )
            raw = None
            if have_torch and base == "bf16":
                raw = compare_reads(
                    (read_ours_raw, path, files), (read_theirs_torch, tpath, tfiles), src.n, args.repeats, rng
                )
            err = errors(src, path, args.error_samples) if dtype != "fp32" else None
            rows.append((label, base, ours, reads, raw, err))
            shutil.rmtree(path)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    print("\nsize and write speed (write MB/s = MB of float32 input per second)")
    print(
        f"{'option':<10} {'bytes/token ours':>17} {'theirs':>8} {'smaller by':>11} {'write MB/s ours':>16} {'theirs':>8}"
    )
    for label, base, ours, *_ in rows:
        t = theirs[base]
        print(
            f"{label:<10} {ours['bytes']:>17.0f} {t['bytes']:>8.0f} {t['bytes'] / ours['bytes']:>10.2f}x "
            f"{ours['write']:>16.0f} {t['write']:>8.0f}"
        )

    def table(title: str, which: int) -> None:
        print(f"\n{title}")
        print(f"{'option':<10} " + " ".join(f"{c + ' ours / theirs = ratio':>32}" for c in READS))
        for label, _, _, reads, raw, _ in rows:
            pair = reads if which == 0 else raw
            if pair is not None:
                a, b = pair
                print(
                    f"{label:<10} "
                    + " ".join(f"{a[c]:>12.0f} / {b[c]:>7.0f} = {a[c] / b[c]:>5.2f}x" for c in READS)
                )

    table("read, samples/s decoded to float32 numpy (cold = files evicted from the page cache)", 0)
    if have_torch:
        table(
            "read, samples/s in the stored encoding: ours ds.raw(i) vs theirs safetensors.torch.load_file", 1
        )
    print(f"\nreconstruction error per layer (first {min(args.error_samples, src.n)} samples)")
    for label, *_, err in rows:
        if err is None or "zstd" in label:  # zstd is lossless on top of its dtype
            continue
        for layer, (rel, max_err, max_val) in zip(src.layer_ids, err, strict=True):
            print(
                f"{label:<10} layer {layer:>3}: rel L2 {rel:.2e}  max abs err {max_err:9.3g}  (max |x| {max_val:9.3g})"
            )
    if src.real is None:
        print("\nnote: synthetic data; zstd ratios on real hidden states differ (measure with --real).")


if __name__ == "__main__":
    main()
