"""Data parallelism for `spec datagen`: one capture engine per GPU group, each a job of its own.

vLLM's offline `LLM` refuses data_parallel_size > 1 in one process, and capture needs no communication
between replicas, so `--data-parallel-size d` runs d copies of the command, each on its own
`--tensor-parallel-size` GPUs (CUDA_VISIBLE_DEVICES), as jobs of the dataset's multi-job layout: on
machine i of n (`--shard-index i --num-shards n`), replica k is job i*d + k of n*d, so input row r goes
to job r % (n*d). All jobs write into the same dataset directory; resuming needs the same n and d.
"""

from __future__ import annotations

import os
import subprocess
import sys

import msgspec

from spec_format.errors import SpecError


class Job(msgspec.Struct, frozen=True):
    shard_index: int
    num_shards: int
    devices: tuple[str, ...]


def visible_devices() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else every CUDA device torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d for d in env.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def data_parallel_jobs(
    shard_index: int, num_shards: int, data_parallel_size: int, tensor_parallel_size: int, devices: list[str]
) -> list[Job]:
    """The jobs of this machine: replica k gets job shard_index*d + k and the k-th group of tp devices."""
    d, tp = data_parallel_size, tensor_parallel_size
    if len(devices) < d * tp:
        raise SpecError(
            f"--data-parallel-size {d} x --tensor-parallel-size {tp} needs {d * tp} GPUs, "
            f"{len(devices)} visible ({','.join(devices) or 'none'}); on a CPU run one job per machine"
        )
    return [Job(shard_index * d + k, num_shards * d, tuple(devices[k * tp : (k + 1) * tp])) for k in range(d)]


def run_jobs(jobs: list[Job], args: list[str]) -> int:
    """Run `spec datagen ARGS --shard-index .. --num-shards ..` once per job at the same time, each on
    its own devices; only the first shows a progress bar. Returns the first non-zero exit code, else 0."""
    procs = []
    for k, job in enumerate(jobs):
        cmd = [sys.executable, "-m", "spec_format", "datagen", *args,
               "--shard-index", str(job.shard_index), "--num-shards", str(job.num_shards)]  # fmt: skip
        cmd += [] if k == 0 else ["--no-progress"]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(job.devices)}
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c != 0), 0)
