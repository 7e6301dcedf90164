"""Captured samples through spec-format's DatasetWriter: round trip, resume after a crash, several jobs."""

import json
import subprocess

import numpy as np
import pytest

from spec_datagen.pipeline import Capturer, write_dataset
from spec_format.dataset import Dataset
from spec_format.errors import SpecError
from spec_format.fingerprint import fingerprint_model_dir


def assert_same_samples(a, b, atol):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.source_index == y.source_index
        assert np.array_equal(x.token_ids, y.token_ids) and np.array_equal(x.loss_mask, y.loss_mask)
        np.testing.assert_allclose(x.hidden, y.hidden, rtol=0, atol=atol)


@pytest.mark.e2e
def test_dataset_holds_exactly_what_the_generator_yields(
    capture_llm, demo_model, tmp_path, spec_cli, make_conversations
):
    cap = Capturer(demo_model, max_len=512, llm=capture_llm)
    rows = make_conversations(7)
    direct = list(cap.samples(rows))
    out = tmp_path / "ds"
    summary = write_dataset(
        cap, rows, out, dtype="fp32", samples_per_shard=3, command="spec datagen test", progress=False
    )
    ds = Dataset(out)
    ds.verify()
    assert len(ds) == 7 and len(ds.manifest.shards) == 3
    # Same ids, masks and rows; states equal up to fp32 noise of a different batching.
    assert_same_samples(list(ds), direct, atol=1e-3)
    m = ds.manifest
    assert m.layer_ids == cap.layer_ids and m.hidden_size == 576 and m.dtype == "fp32"
    assert m.command == "spec datagen test" and m.target == fingerprint_model_dir(demo_model)
    supervised = np.concatenate([s.token_ids[s.loss_mask] for s in direct])
    assert np.array_equal(ds.token_frequencies(), np.bincount(supervised, minlength=m.target.vocab_size))
    assert summary.stats.samples == 7 and summary.stats.tokens == m.num_tokens
    assert summary.stats.supervised_tokens == m.num_supervised == len(supervised)
    assert summary.bytes_written > m.num_tokens * len(cap.layer_ids) * 576 * 4
    done = subprocess.run([spec_cli, "validate", "--deep", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


class Crash(Exception):
    pass


def crash_after(rows, n):
    for i, row in enumerate(rows):
        if i == n:
            raise Crash
        yield row


@pytest.mark.e2e
def test_resume_after_a_crash_gives_the_uninterrupted_dataset(
    capture_llm, demo_model, tmp_path, make_conversations
):
    cap = Capturer(demo_model, max_len=512, llm=capture_llm)
    rows = make_conversations(9, seed=4)
    rows.insert(4, {"messages": "broken"})  # skipped rows must not confuse the resume point
    write_dataset(cap, rows, tmp_path / "whole", samples_per_shard=2, progress=False, report=None)
    with pytest.raises(Crash):  # a generator is read once (no estimate pass); one row in flight at a time
        write_dataset(
            cap, crash_after(rows, 8), tmp_path / "part", samples_per_shard=2, progress=False, report=None,
            max_inflight_tokens=1,
        )  # fmt: skip
    part = Dataset(tmp_path / "part")
    assert part.source_indices.tolist() == [0, 1, 2, 3, 5, 6]  # rows 0-7 seen; 7 not in a full shard
    with pytest.raises(SpecError, match="pass resume=True"):
        write_dataset(cap, rows, tmp_path / "part", samples_per_shard=2, progress=False, report=None)
    summary = write_dataset(
        cap, rows, tmp_path / "part", samples_per_shard=2, resume=True, progress=False, report=None
    )
    assert summary.stats.samples == 9 - len(part)
    whole, resumed = Dataset(tmp_path / "whole"), Dataset(tmp_path / "part")
    resumed.verify()
    assert resumed.source_indices.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert_same_samples(list(resumed), list(whole), atol=0.05)  # bf16: equal up to rounding of fp32 noise
    assert np.array_equal(resumed.token_frequencies(), whole.token_frequencies())


@pytest.mark.e2e
def test_jobs_split_one_input_into_one_dataset(capture_llm, demo_model, tmp_path, make_conversations):
    cap = Capturer(demo_model, max_len=512, llm=capture_llm)
    rows = make_conversations(5, seed=5)
    for k in range(2):
        s = write_dataset(
            cap, rows, tmp_path / "ds", shard_index=k, num_shards=2, progress=False, report=None
        )
        assert s.stats.samples == (3, 2)[k]
    ds = Dataset(tmp_path / "ds")
    ds.verify()
    assert sorted(ds.source_indices.tolist()) == [0, 1, 2, 3, 4]


def test_bad_settings_fail_before_the_engine_starts(demo_model, tmp_path):
    cap = Capturer(demo_model, max_len=128)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n{broken\n")
    with pytest.raises(SpecError, match=rf"^{data}:2: not valid JSON"):
        write_dataset(cap, data, tmp_path / "ds", on_error="fail", progress=False)
    with pytest.raises(SpecError, match="--dtype fp16: choose one of"):
        write_dataset(cap, data, tmp_path / "ds2", dtype="fp16", progress=False)
    assert cap._llm is None
