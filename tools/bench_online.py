"""Benchmark: online training (`spec train --online`) against `spec datagen` then `spec train`, same rows.

Both train the same draft for the same steps on the same conversations (one epoch by default) with the
same settings; each path runs as the user would run it (subprocesses, engines in their own processes).
Printed side by side: wall time (engine start included), peak disk (the dataset and run directories,
sampled every 0.2 s) and peak memory (the RSS summed over the process tree, sampled every 0.2 s).

    uv run --no-sync python tools/bench_online.py --data conversations.jsonl [--rows 200] [--model DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def dir_bytes(paths: list[Path]) -> int:
    """Bytes of the files under `paths` (files renamed or removed while walking are skipped)."""
    total = 0
    for root in paths:
        for d, _, files in os.walk(root):
            for name in files:
                try:
                    total += os.stat(os.path.join(d, name)).st_size
                except FileNotFoundError:
                    pass
    return total


def measured(cmds: list[list[str]], watch: list[Path]) -> tuple[float, int, int]:
    """Run cmds one after another: (wall seconds, peak bytes under `watch`, peak RSS of the process tree)."""
    peak_disk = peak_rss = 0
    t0 = time.perf_counter()
    for cmd in cmds:
        with tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
            root = psutil.Process(proc.pid)
            while proc.poll() is None:
                try:
                    tree = [root, *root.children(recursive=True)]
                    peak_rss = max(peak_rss, sum(p.memory_info().rss for p in tree))
                except psutil.Error:  # a process ended while being read
                    pass
                peak_disk = max(peak_disk, dir_bytes(watch))
                time.sleep(0.2)
            if proc.returncode != 0:
                err.seek(0)
                sys.exit(f"{' '.join(cmd)} failed:\n{err.read()[-3000:]}")
    return time.perf_counter() - t0, peak_disk, peak_rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="conversations (any spec datagen layout)")
    ap.add_argument("--rows", type=int, default=200, help="use the first N rows")
    ap.add_argument("--model", default=None, help="target (default: the demo model)")
    ap.add_argument("--epochs", default="1")
    ap.add_argument("--batch-tokens", default="2048")
    args = ap.parse_args()
    from spec_datagen.demo_model import demo_model_dir

    model = args.model or str(demo_model_dir())
    spec = str(Path(sys.executable).parent / "spec")
    tmp = Path(tempfile.mkdtemp(prefix="bench-online-"))
    try:
        rows = tmp / "rows.jsonl"
        with open(args.data) as f:
            rows.write_text("".join(line for _, line in zip(range(args.rows), f)))
        common = ["--epochs", args.epochs, "--batch-tokens", args.batch_tokens, "--draft-vocab-size", "4096",
                  "--no-progress"]  # fmt: skip
        offline = measured(
            [[spec, "datagen", model, "--data", str(rows), "--out", str(tmp / "ds"), "--no-progress"],
             [spec, "train", str(tmp / "ds"), "--verifier", model, "--out", str(tmp / "off"), *common]],
            [tmp / "ds", tmp / "off"],
        )  # fmt: skip
        online = measured(
            [[spec, "train", "--online", model, "--data", str(rows), "--out", str(tmp / "on"), *common]],
            [tmp / "on"],
        )
        print(
            f"{args.rows} rows of {args.data}, {args.epochs} epoch(s), --batch-tokens {args.batch_tokens}, {model}"
        )
        print(f"{'':24}{'wall s':>10}{'peak disk MiB':>16}{'peak RSS MiB':>15}")
        for name, (wall, disk, rss) in (("datagen, then train", offline), ("train --online", online)):
            print(f"{name:24}{wall:10.1f}{disk / 2**20:16.1f}{rss / 2**20:15.0f}")
        print(f"online / offline: wall {online[0] / offline[0]:.2f}x, disk {online[1] / max(offline[1], 1):.3f}x, "
              f"RSS {online[2] / offline[2]:.2f}x")  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
