"""Data-parallel replicas as jobs of one dataset: the split, and the refusal without GPUs."""

import os
import subprocess

import pytest

from spec_datagen.parallel import Job, data_parallel_jobs
from spec_format.errors import SpecError


def test_replicas_are_jobs_that_partition_the_rows():
    devices = [str(i) for i in range(8)]
    jobs = data_parallel_jobs(1, 2, 2, 2, devices)  # machine 1 of 2, 2 replicas of 2 GPUs each
    assert jobs == [Job(2, 4, ("0", "1")), Job(3, 4, ("2", "3"))]
    machine0 = data_parallel_jobs(0, 2, 2, 2, devices)
    owners = {
        r: [j.shard_index for j in machine0 + jobs if r % j.num_shards == j.shard_index] for r in range(40)
    }
    assert all(len(o) == 1 for o in owners.values())  # every row in exactly one job
    with pytest.raises(SpecError, match="needs 4 GPUs, 3 visible"):
        data_parallel_jobs(0, 1, 2, 2, ["0", "1", "2"])


def test_cli_refuses_data_parallel_without_gpus(spec_cli, demo_model, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    done = subprocess.run(
        [spec_cli, "datagen", str(demo_model), "--data", str(data), "--out", str(tmp_path / "o"),
         "--data-parallel-size", "2"],
        capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    assert done.returncode == 1
    assert "error: --data-parallel-size 2 x --tensor-parallel-size 1 needs 2 GPUs, 0 visible" in done.stderr
