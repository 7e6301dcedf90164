"""The hidden-state dataset store: round trips, random access, resume after SIGKILL, locks, multi-job
directories, merging, and every kind of damaged input giving one clear SpecError line.

numpy/msgspec only: these tests also run in the spec-format-only venv (tests/test_install.py). Writer
subprocesses run this very file's child_main() (real processes, real SIGKILL).
"""

import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest

from spec_format.dataset import (
    Dataset,
    DatasetManifest,
    DatasetWriter,
    describe_dataset,
    merge_datasets,
    validate_dataset,
)
from spec_format.dataset.encoding import float32_to_e4m3
from spec_format.errors import SpecError
from spec_format.fingerprint import TargetInfo

VOCAB, L, H = 1000, 3, 32
LAYERS = [2, 4, 8]
TARGET = TargetInfo(
    name_or_path="test/target",
    architecture="LlamaForCausalLM",
    model_type="llama",
    hidden_size=H,
    vocab_size=VOCAB,
    num_hidden_layers=8,
    config_sha256="0" * 64,
)


def hidden_states(rng: np.random.Generator, t: int) -> np.ndarray:
    """float32 [t, L, H] like a residual stream: heavy tails (a Gaussian scale mixture), scale growing with
    depth, and one "massive activation" channel near 25,000 on the first token (as SmolLM2-135M has)."""
    x = rng.standard_normal((t, L, H), dtype=np.float32) * np.exp(
        rng.standard_normal((t, L, H), dtype=np.float32) * 0.6
    )
    x *= np.float32(0.5) * np.float32(4.0) ** np.linspace(0, 1, L, dtype=np.float32)[:, None]
    x[0, 1:, 3] = np.float32(25_000) * rng.uniform(0.6, 1.0, L - 1).astype(np.float32)
    return x


def row_samples(i: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The samples input row i yields, deterministic in i; every fifth row yields two."""
    rng = np.random.default_rng(i)
    out = []
    for _ in range(2 if i % 5 == 0 else 1):
        t = int(rng.integers(3, 40))
        out.append((rng.integers(0, VOCAB, t).astype(np.int32), rng.random(t) < 0.6, hidden_states(rng, t)))
    return out


def writer(path: Path, **kw) -> DatasetWriter:
    kw = {"target": TARGET, "layer_ids": LAYERS, "hidden_size": H, "samples_per_shard": 4, **kw}
    return DatasetWriter(path, **kw)


def add_row(w: DatasetWriter, i: int) -> None:
    for tok, mask, hid in row_samples(i):
        w.add(source_index=i, token_ids=tok, loss_mask=mask, hidden=hid, extra={"pos": np.arange(len(tok))})


def write(path: Path, rows, **kw) -> DatasetManifest:
    with writer(path, **kw) as w:
        for i in rows:
            add_row(w, i)
    return w.manifest


def contents(ds: Dataset) -> list[tuple]:
    """Every sample as comparable bytes (hidden in its stored encoding), in dataset order."""
    out = []
    for i in range(len(ds)):
        r = ds.raw(i)
        scale = b"" if r.hidden_scale is None else r.hidden_scale.tobytes()
        out.append((r.source_index, r.token_ids.tobytes(), r.loss_mask.tobytes(), r.hidden.tobytes(), scale))
    return out


def reference_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Nearest bf16 by comparing the two truncation neighbours in float64; ties to the even pattern."""
    u = x.astype(np.float32).view(np.uint32)
    lo = u & np.uint32(0xFFFF0000)
    hi = lo + np.uint32(0x10000)
    d_lo = np.abs(x.astype(np.float64) - lo.view(np.float32).astype(np.float64))
    d_hi = np.abs(hi.view(np.float32).astype(np.float64) - x.astype(np.float64))
    up = (d_hi < d_lo) | ((d_hi == d_lo) & ((lo >> 16) & 1 == 1))
    return (np.where(up, hi, lo) >> 16).astype(np.uint16)


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", [None, "zstd"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp8"])
def test_round_trip(tmp_path, dtype, compression):
    rows = range(12)
    m = write(tmp_path / "ds", rows, dtype=dtype, compression=compression)
    expected = [(i, *s) for i in rows for s in row_samples(i)]
    ds = Dataset(tmp_path / "ds")
    assert len(ds) == len(expected) == m.num_samples == 15  # rows 0, 5, 10 give two samples
    assert m.dtype == dtype and m.compression == compression and m.layer_ids == LAYERS
    for k, (i, tok, mask, hid) in enumerate(expected):
        s = ds[k]
        assert s.source_index == i
        assert s.token_ids.dtype == np.int32 and np.array_equal(s.token_ids, tok)
        assert s.loss_mask.dtype == bool and np.array_equal(s.loss_mask, mask)
        assert s.hidden.dtype == np.float32 and s.hidden.shape == (len(tok), L, H)
        assert np.array_equal(s.extra["pos"], np.arange(len(tok)))
        raw = ds.raw(k)
        if dtype == "fp32":
            assert np.array_equal(s.hidden, hid)
        elif dtype == "bf16":
            assert raw.hidden.dtype == np.uint16 and np.array_equal(raw.hidden, reference_bf16_bits(hid))
            assert np.array_equal(s.hidden, (raw.hidden.astype(np.uint32) << 16).view(np.float32))
        else:
            absmax = np.abs(hid).max(-1)
            assert np.array_equal(raw.hidden_scale, (absmax / np.float32(448)).astype(np.float32))
            assert np.array_equal(raw.hidden, float32_to_e4m3(hid / raw.hidden_scale[..., None]))
            bound = np.maximum(np.abs(hid) * 2.0**-4, 2.0**-10 * raw.hidden_scale[..., None]) * (1 + 1e-5)
            assert np.all(np.abs(s.hidden - hid) <= bound)
            big = np.abs(hid) > 10_000  # the massive activations
            assert big.any() and np.all(np.abs(s.hidden[big] - hid[big]) <= np.abs(hid[big]) * 2.0**-4)
    ds.verify()
    assert validate_dataset(tmp_path / "ds", deep=True) == []


def test_uncompressed_arrays_are_zero_copy_views(tmp_path):
    write(tmp_path / "ds", range(3), dtype="fp32")
    ds = Dataset(tmp_path / "ds")
    s = ds[1]
    for arr in (s.token_ids, s.loss_mask, s.hidden):
        assert not arr.flags.owndata and not arr.flags.writeable  # a view of the read-only memory map
    assert s.hidden.ctypes.data % 64 == 0  # columns are 64-byte aligned in the file
    with pytest.raises(ValueError):
        s.hidden[0, 0, 0] = 1.0  # the file cannot be changed through a sample


def test_dataset_travels_to_spawned_workers(tmp_path):
    import pickle  # how DataLoader hands a dataset to "spawn" workers (our object, not a user file)

    write(tmp_path / "ds", range(4))
    ds = Dataset(tmp_path / "ds")
    first = ds[0]
    copy = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(copy[0].hidden, first.hidden) and len(copy) == len(ds)


def test_random_access_in_any_order(tmp_path):
    write(tmp_path / "ds", range(30), samples_per_shard=3, compression="zstd")
    ds = Dataset(tmp_path / "ds", max_open_shards=2)  # forces shards to be closed and reopened
    expected = [(i, tok) for i in range(30) for tok, _, _ in row_samples(i)]
    order = np.random.default_rng(0).permutation(len(ds)).tolist() + list(range(len(ds)))[::-1]
    for k in order:
        s = ds[k]
        assert s.source_index == expected[k][0] and np.array_equal(s.token_ids, expected[k][1])
    assert ds[-1].source_index == 29 and ds[-len(ds)].source_index == 0
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert [s.source_index for s in ds] == [i for i, _ in expected]


def test_lengths_sources_and_token_frequencies(tmp_path):
    write(tmp_path / "ds", range(20))
    ds = Dataset(tmp_path / "ds")
    samples = [s for i in range(20) for s in row_samples(i)]
    assert ds.lengths.dtype == np.int64
    assert ds.lengths.tolist() == [len(t) for t, _, _ in samples]
    assert ds.supervised_lengths.tolist() == [int(m.sum()) for _, m, _ in samples]
    assert ds.source_indices.tolist() == [i for i in range(20) for _ in row_samples(i)]
    want = np.zeros(VOCAB, np.int64)
    for tok, mask, _ in samples:
        np.add.at(want, tok[mask], 1)
    assert np.array_equal(ds.token_frequencies(), want)
    assert np.array_equal(ds.token_frequencies(VOCAB + 5)[:VOCAB], want)
    with pytest.raises(SpecError, match="too small"):
        ds.token_frequencies(int(np.flatnonzero(want).max()))
    stored = json.loads((tmp_path / "ds" / "manifest.json").read_text())["token_frequencies"]
    assert len(stored["ids"]) == np.count_nonzero(want) < VOCAB  # sparse, not a dense vocab-sized list
    assert sum(stored["counts"]) == ds.manifest.num_supervised == int(want.sum())


def test_empty_dataset(tmp_path):
    with writer(tmp_path / "ds") as w:
        assert w.next_source_index == 0
    ds = Dataset(tmp_path / "ds")
    assert len(ds) == 0 and ds.lengths.shape == (0,) and ds.source_indices.shape == (0,)
    assert not ds.token_frequencies().any() and list(ds) == []
    ds.verify()
    with pytest.raises(IndexError):
        ds[0]
    info = describe_dataset(tmp_path / "ds")
    assert info["samples"] == 0 and info["bytes_per_token"] is None and info["shards"] == 0


def test_shards_are_cut_by_count_and_bytes_but_never_inside_a_row(tmp_path):
    m = write(tmp_path / "a", range(40), samples_per_shard=3)
    for s in m.shards:  # a row's samples are never split across shards
        assert s.num_samples >= 3 or s is m.shards[-1]
    rows = [Dataset(tmp_path / "a").shard(k).index[:, 0].tolist() for k in range(len(m.shards))]
    for a, b in zip(rows, rows[1:], strict=False):
        assert a[-1] < b[0]
    m = write(tmp_path / "b", range(10), samples_per_shard=1000, shard_bytes=20_000)
    assert len(m.shards) > 2 and all(s.num_bytes < 20_000 + 40 * L * H * 2 * 2 for s in m.shards)
    assert m.num_samples == sum(len(row_samples(i)) for i in range(10))


def test_add_rejects_bad_samples(tmp_path):
    tok, mask, hid = row_samples(1)[0]
    t = len(tok)
    cases = [
        ({"hidden": hid[:, :2]}, "n_layers, H"),
        ({"hidden": hid[:-1]}, "n_layers, H"),
        ({"hidden": np.where(np.arange(t)[:, None, None] == 1, np.nan, hid)}, "NaN or inf"),
        ({"token_ids": tok.astype(np.float32)}, "integer"),
        ({"token_ids": np.full(t, VOCAB)}, "outside the target's vocabulary"),
        ({"token_ids": tok[:0], "loss_mask": mask[:0], "hidden": hid[:0]}, "non-empty"),
        ({"loss_mask": mask[:-1]}, "loss_mask"),
        ({"loss_mask": np.full(t, 2)}, "loss_mask"),
        ({"extra": {"bad name": np.zeros(t)}}, "letters"),
        ({"extra": {"x": np.zeros(t + 1)}}, "per token"),
    ]
    with writer(tmp_path / "ds") as w:
        for change, msg in cases:
            args = {"source_index": 1, "token_ids": tok, "loss_mask": mask, "hidden": hid} | change
            with pytest.raises(SpecError, match=msg):
                w.add(**args)
        w.add(source_index=5, token_ids=tok, loss_mask=mask, hidden=hid, extra={"x": np.zeros(t)})
        with pytest.raises(SpecError, match="increasing order"):
            w.add(source_index=4, token_ids=tok, loss_mask=mask, hidden=hid, extra={"x": np.zeros(t)})
        with pytest.raises(SpecError, match="differ from this dataset"):
            w.add(source_index=6, token_ids=tok, loss_mask=mask, hidden=hid)
    with pytest.raises(SpecError, match="hidden_size"):
        writer(tmp_path / "x", hidden_size=H + 1)
    with pytest.raises(SpecError, match="capture ids run from 0 to 8"):
        writer(tmp_path / "x", layer_ids=[2, 9])
    with pytest.raises(SpecError, match="dtype"):
        writer(tmp_path / "x", dtype="fp16")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(SpecError, match="cannot create the dataset directory"):
        writer(tmp_path / "a-file")


def test_unordered_writer_takes_any_source_order_and_resumes_after_its_samples(tmp_path):
    """spec train --online --cache writes samples in training order: an unordered writer accepts any
    source order, commits whole shards, and a resumed one appends after the committed samples."""
    order = [7, 2, 9, 1, 4, 3]  # one sample per row (no multiple of 5)

    def add(w, i):
        ((tok, mask, hid),) = row_samples(i)
        w.add(source_index=i, token_ids=tok, loss_mask=mask, hidden=hid)

    with writer(tmp_path / "ds", samples_per_shard=2, ordered=False) as w:
        for i in order[:3]:
            add(w, i)
    with writer(tmp_path / "ds", samples_per_shard=2, ordered=False, resume=True) as w:
        assert w.manifest.num_samples == 3
        for i in order[3:]:
            add(w, i)
    ds = Dataset(tmp_path / "ds")
    ds.verify()
    assert ds.source_indices.tolist() == order
    assert [ds[j].token_ids.tolist() for j in range(6)] == [row_samples(i)[0][0].tolist() for i in order]


# --- resume, kill -9, locks ---------------------------------------------------------------------

CHILD = (
    "import importlib.util, sys\n"
    f"spec = importlib.util.spec_from_file_location('dataset_test', {__file__!r})\n"
    "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
    "mod.child_main(sys.argv[1])\n"
)


def child_main(cfg_json: str) -> None:
    """A writer process: job `job` of `jobs` over rows job, job + jobs, ... < rows, resuming; prints
    STARTED once open, READY (then sleeps forever) after row `pause_after`, or holds the lock if `hold`.
    A SpecError is printed as "ERROR <message>" with exit code 3."""
    cfg = json.loads(cfg_json)
    if cfg.get("max_file_size"):  # files may not grow past this: writes fail with EFBIG, like a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["max_file_size"], cfg["max_file_size"]))
    job, jobs = cfg.get("job", 0), cfg.get("jobs", 1)
    try:
        kw = {"samples_per_shard": cfg["per_shard"]} if "per_shard" in cfg else {}
        with writer(Path(cfg["out"]), resume=True, shard_index=job, num_shards=jobs, **kw) as w:
            print("STARTED", flush=True)
            if cfg.get("hold"):
                time.sleep(3600)
            for i in range(max(job, w.next_source_index), cfg["rows"]):
                if i % jobs == job:
                    add_row(w, i)
                    time.sleep(cfg.get("delay", 0))
                if i == cfg.get("pause_after"):
                    print("READY", flush=True)
                    time.sleep(3600)
    except SpecError as e:
        print(f"ERROR {e}", flush=True)
        sys.exit(3)


def spawn(**cfg) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cfg)], stdout=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, word: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.1)[0]:
            line = proc.stdout.readline()
            if line.strip() == word:
                return
            assert line, f"writer exited (rc {proc.wait()}) before printing {word}"
    proc.kill()
    raise AssertionError(f"writer did not print {word} within {timeout}s")


def kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def assert_only_whole_rows(path: Path) -> None:
    """A dataset readable after a kill: checksums fine, and every committed row has all its samples."""
    ds = Dataset(path)
    ds.verify()
    src = ds.source_indices.tolist()
    assert src == sorted(src)
    for i in set(src):
        assert src.count(i) == len(row_samples(i))


def test_kill9_then_resume_equals_an_uninterrupted_run(tmp_path):
    rows = 40
    write(tmp_path / "ref", range(rows))
    out = tmp_path / "ds"
    # 1. kill while a shard is half written
    p = spawn(out=str(out), rows=rows, pause_after=22)
    wait_for(p, "READY")
    kill9(p)
    assert any(f.name.endswith(".bin.tmp") for f in out.iterdir())  # the half-written shard
    committed = Dataset(out)
    assert len(committed) > 0 and committed.source_indices.max() < 22
    assert all((out / s.file).is_file() for s in committed.manifest.shards)
    assert_only_whole_rows(out)
    # 2. kills at random moments while rows stream in (>= 0.03 s a row, so most land mid-run; one that
    # arrives just after the writer finished on its own is no failure: that race is real, not a bug)
    rng = np.random.default_rng(0)
    landed = 0
    for _ in range(3):
        p = spawn(out=str(out), rows=rows, delay=0.03)
        wait_for(p, "STARTED")
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(p.pid, signal.SIGKILL)
        rc = p.wait()
        assert rc in (0, -signal.SIGKILL), rc
        landed += rc == -signal.SIGKILL
        assert_only_whole_rows(out)
    assert landed >= 1
    # 3. finish, then compare with the run that was never interrupted
    p = spawn(out=str(out), rows=rows)
    assert p.wait(timeout=120) == 0
    assert contents(Dataset(out)) == contents(Dataset(tmp_path / "ref"))
    assert not [f.name for f in out.iterdir() if ".tmp" in f.name]
    assert np.array_equal(Dataset(out).token_frequencies(), Dataset(tmp_path / "ref").token_frequencies())
    Dataset(out).verify()


def test_a_failing_disk_loses_nothing_committed(tmp_path):
    rows = 30
    write(tmp_path / "ref", range(rows))
    out = tmp_path / "ds"
    write(out, range(1))
    # one sample per shard (< 8 kB) fits, a row of two samples (row 5) does not: the write fails there
    p = spawn(out=str(out), rows=rows, max_file_size=12_000, per_shard=1)
    stdout, _ = p.communicate(timeout=120)
    assert p.returncode == 3, stdout
    error = stdout.strip().splitlines()[-1]
    assert error.startswith(f"ERROR {out}: writing failed (File too large)") and "resume=True" in error
    assert_only_whole_rows(out)
    assert Dataset(out).source_indices.tolist() == [0, 0, 1, 2, 3, 4]
    assert not [f.name for f in out.iterdir() if f.name.endswith(".tmp")]  # the failed shard was removed
    p = spawn(out=str(out), rows=rows)
    assert p.wait(timeout=120) == 0
    assert contents(Dataset(out)) == contents(Dataset(tmp_path / "ref"))


def test_resume_continues_after_the_last_complete_shard(tmp_path):
    out = tmp_path / "ds"
    w = writer(out)
    for i in range(11):
        add_row(w, i)
    committed = w.manifest.num_samples
    w.abort()  # as if killed: the open shard is dropped
    with writer(out, resume=True) as w2:
        assert w2.manifest.num_samples == committed
        start = w2.next_source_index
        assert 0 < start < 11 and start == w2.manifest.shards[-1].max_source_index + 1
        tok, mask, hid = row_samples(0)[0]
        with pytest.raises(SpecError, match="already stored"):
            w2.add(source_index=start - 1, token_ids=tok, loss_mask=mask, hidden=hid)
        for i in range(start, 15):
            add_row(w2, i)
    write(tmp_path / "ref", range(15))
    assert contents(Dataset(out)) == contents(Dataset(tmp_path / "ref"))


def test_new_writer_refuses_existing_data_without_resume(tmp_path):
    write(tmp_path / "ds", range(3))
    with pytest.raises(SpecError, match="pass resume=True"):
        writer(tmp_path / "ds")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "shard-000000.bin").write_bytes(b"x")
    with pytest.raises(SpecError, match="no manifest.json"):
        writer(tmp_path / "junk")


@pytest.mark.parametrize(
    ("change", "msg"),
    [
        ({"dtype": "fp8"}, "dtype: bf16 != fp8"),
        ({"compression": "zstd"}, "compression: None != zstd"),
        ({"layer_ids": [2, 4, 7]}, r"layer_ids: \[2, 4, 8\] != \[2, 4, 7\]"),
        ({"target": msgspec.structs.replace(TARGET, config_sha256="1" * 64)}, "config_sha256"),
        ({"num_shards": 2}, "num_shards: 1 != 2"),
    ],
)
def test_resume_refuses_other_settings(tmp_path, change, msg):
    write(tmp_path / "ds", range(3))
    with pytest.raises(SpecError, match=msg) as e:
        writer(tmp_path / "ds", resume=True, **change)
    assert "\n" not in str(e.value) and "new directory" in str(e.value)


def test_lock_keeps_a_second_writer_out(tmp_path):
    out = tmp_path / "ds"
    p = spawn(out=str(out), rows=10, hold=True)
    try:
        wait_for(p, "STARTED")
        with pytest.raises(SpecError, match=f"being written by pid {p.pid} on ") as e:
            writer(out, resume=True)
        assert "\n" not in str(e.value)
        # job 0 of 2 has its own lock, but the directory was made by one job: refused, nothing written
        with pytest.raises(SpecError, match="num_shards: 1 != 2"):
            writer(out, resume=True, num_shards=2)
    finally:
        kill9(p)
    with writer(out, resume=True) as w:  # the kernel released the dead writer's lock
        assert w.next_source_index == 0


# --- several jobs ---------------------------------------------------------------------------------


def sorted_contents(path: Path) -> list[tuple]:
    return sorted(contents(Dataset(path)))


def test_jobs_writing_into_one_directory_at_once(tmp_path):
    rows = 30
    write(tmp_path / "ref", range(rows))
    out = tmp_path / "shared"
    procs = [spawn(out=str(out), rows=rows, job=j, jobs=2, delay=0.005) for j in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    ds = Dataset(out)
    assert ds.missing_parts == [] and ds.manifest.num_jobs == 2
    assert {s.job_index for s in ds.manifest.shards} == {0, 1}
    assert sorted_contents(out) == sorted_contents(tmp_path / "ref")
    assert np.array_equal(ds.token_frequencies(), Dataset(tmp_path / "ref").token_frequencies())
    ds.verify()
    assert describe_dataset(out)["jobs"] == "2 of 2 written"
    merged = merge_datasets(tmp_path / "merged", [out])
    assert merged.num_jobs == 1 and merged.parts == []
    assert sorted_contents(tmp_path / "merged") == sorted_contents(tmp_path / "ref")


def test_a_job_alone_shows_the_parts_still_missing(tmp_path):
    write(tmp_path / "job1", range(1, 10, 3), shard_index=1, num_shards=3)
    ds = Dataset(tmp_path / "job1")
    assert ds.missing_parts == ["manifest.job-00000-of-00003.json", "manifest.job-00002-of-00003.json"]
    assert ds.source_indices.tolist() == [1, 4, 7]
    assert describe_dataset(tmp_path / "job1")["jobs"].startswith("1 of 3 written")
    assert validate_dataset(tmp_path / "job1", deep=True) == []


def test_merge_two_jobs_equals_one_job(tmp_path):
    rows = 25
    write(tmp_path / "ref", range(rows))
    for j in range(2):
        m = write(tmp_path / f"job{j}", range(j, rows, 2), shard_index=j, num_shards=2)
        assert all(s.file.startswith(f"shard-{j:05d}-of-00002-") for s in m.shards)  # distinct names
    merged = merge_datasets(tmp_path / "merged", [tmp_path / "job0", tmp_path / "job1"], command="test merge")
    assert merged.command == "test merge" and merged.num_jobs == 1
    ref = Dataset(tmp_path / "ref")
    ds = Dataset(tmp_path / "merged")
    assert sorted_contents(tmp_path / "merged") == sorted_contents(tmp_path / "ref")
    assert np.array_equal(ds.token_frequencies(), ref.token_frequencies())
    assert (ds.manifest.num_tokens, ds.manifest.num_supervised) == (
        ref.manifest.num_tokens,
        ref.manifest.num_supervised,
    )
    ds.verify()
    first = tmp_path / "job0" / Dataset(tmp_path / "job0").manifest.shards[0].file
    assert (tmp_path / "merged" / "shard-000000.bin").stat().st_ino == first.stat().st_ino  # hard link
    merge_datasets(tmp_path / "copied", [tmp_path / "job0", tmp_path / "job1"], copy=True)
    assert (tmp_path / "copied" / "shard-000000.bin").stat().st_ino != first.stat().st_ino
    Dataset(tmp_path / "job0").verify()  # the sources are untouched


def test_merge_refuses_what_does_not_belong_together(tmp_path):
    write(tmp_path / "a", range(0, 6))
    write(tmp_path / "b", range(5, 9))
    write(tmp_path / "c", range(10, 12), dtype="fp8")
    with pytest.raises(SpecError, match="overlap .* row 5"):
        merge_datasets(tmp_path / "m", [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(SpecError, match="dtype: bf16 != fp8"):
        merge_datasets(tmp_path / "m", [tmp_path / "a", tmp_path / "c"])
    with pytest.raises(SpecError, match="given twice"):
        merge_datasets(tmp_path / "m", [tmp_path / "a", tmp_path / "a"])
    with pytest.raises(SpecError, match="not empty"):
        merge_datasets(tmp_path / "b", [tmp_path / "a"])
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.*"))
    (tmp_path / "empty").mkdir()
    write(tmp_path / "none", [], dtype="fp8")
    merged = merge_datasets(tmp_path / "empty", [tmp_path / "none", tmp_path / "c"])
    assert merged.num_samples == Dataset(tmp_path / "c").manifest.num_samples


# --- damaged input ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clean") / "ds"
    write(path, range(10), compression="zstd")
    return path


@pytest.fixture
def damaged(clean, tmp_path) -> Path:
    path = tmp_path / "ds"
    shutil.copytree(clean, path)
    return path


def one_line_error(path: Path, match: str, deep: bool = True) -> str:
    problems = validate_dataset(path, deep=deep)
    assert problems and all("\n" not in p for p in problems), problems
    assert any(__import__("re").search(match, p) for p in problems), problems
    return problems[0]


def shard_path(path: Path, k: int = 0) -> Path:
    return path / json.loads((path / "manifest.json").read_text())["shards"][k]["file"]


def test_verify_catches_a_flipped_byte(damaged):
    f = shard_path(damaged, 1)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    assert validate_dataset(damaged, deep=False) == []  # structure intact: only the checksum can tell
    msg = one_line_error(damaged, r"checksum is sha256:.* the manifest says sha256:")
    assert f.name in msg
    with pytest.raises(SpecError, match=f"{f.name}: checksum"):
        Dataset(damaged).verify()


def test_truncated_shard(damaged):
    f = shard_path(damaged)
    f.write_bytes(f.read_bytes()[:-100])
    one_line_error(damaged, f"{f.name}: size is .* the manifest says", deep=False)
    with pytest.raises(SpecError, match="truncated"):
        Dataset(damaged)[0]
    with pytest.raises(SpecError, match=f.name):
        Dataset(damaged).verify()


def test_missing_shard(damaged):
    f = shard_path(damaged, 2)
    f.unlink()
    one_line_error(damaged, f"{f.name}: shard listed in the manifest is missing")
    ds = Dataset(damaged)
    assert ds[0].source_index == 0  # the other shards still read
    with pytest.raises(SpecError, match="missing"):
        ds[len(ds) - 1]


def test_shard_from_another_dataset(damaged, tmp_path):
    write(tmp_path / "other", range(10), dtype="fp8", compression="zstd")
    shutil.copy(shard_path(tmp_path / "other"), shard_path(damaged))
    one_line_error(damaged, "size is|does not match the manifest|samples")
    size = shard_path(damaged).stat().st_size

    def fix_size(m):
        m["num_bytes"] += size - m["shards"][0]["num_bytes"]
        m["shards"][0]["num_bytes"] = size

    edit_manifest(damaged, fix_size)
    one_line_error(damaged, r"does not match the manifest \(dtype: fp8 != bf16")


def test_zstd_frame_damage_is_caught_on_read(damaged):
    ds = Dataset(damaged)
    shard = ds.shard(0)
    off = int(shard.index[0, 3 + 2 * 2])  # column 2 is hidden: its first frame
    f = shard_path(damaged)
    data = bytearray(f.read_bytes())
    data[off + 40] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(SpecError, match=f"{f.name}: sample 0: column 'hidden'"):
        Dataset(damaged)[0]


def edit_manifest(path: Path, fn) -> None:
    """Change the manifest as a faulty writer would: resealed, so validation sees the edit itself."""
    from spec_format.dataset.manifest import SEAL
    from spec_format.files import seal_json

    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    m.pop(SEAL, None)
    (path / "manifest.json").write_bytes(seal_json(json.dumps(m).encode(), SEAL))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda p: (p / "manifest.json").write_text("{not json"), "not valid JSON"),
        (lambda p: (p / "manifest.json").write_text("[1, 2]"), "Expected `object`, got `array`"),
        (lambda p: edit_manifest(p, lambda m: m.pop("dtype")), "missing required field `dtype`"),
        (lambda p: edit_manifest(p, lambda m: m.update(dtype="fp4")), r"\$\.dtype"),
        (
            lambda p: edit_manifest(p, lambda m: m["shards"][0].update(num_samples="3")),
            r"Expected `int`, got `str` - at `\$\.shards\[0\]\.num_samples`",
        ),
        (lambda p: edit_manifest(p, lambda m: m.update(num_samples=m["num_samples"] + 1)), "shards sum to"),
        (lambda p: edit_manifest(p, lambda m: m.update(format="other")), "not a spec dataset"),
        (lambda p: edit_manifest(p, lambda m: m.update(format_version=99)), "upgrade spec-format"),
        (lambda p: edit_manifest(p, lambda m: m["token_frequencies"]["ids"].reverse()), "must ascend"),
        (lambda p: edit_manifest(p, lambda m: m["token_frequencies"]["counts"].pop()), "ids but"),
        (lambda p: edit_manifest(p, lambda m: m["shards"][1].update(file="../x.bin")), "plain names"),
        (lambda p: (p / "manifest.json").unlink(), "manifest.json: not found"),
    ],
)
def test_bad_manifest_gives_one_line(damaged, edit, match):
    edit(damaged)
    with pytest.raises(SpecError, match=match) as e:
        Dataset(damaged)
    assert "\n" not in str(e.value) and "manifest.json" in str(e.value)
    assert validate_dataset(damaged) == [str(e.value)]


@pytest.mark.parametrize(
    ("field", "delta", "match"),
    [
        ("num_tokens", 1, "num_tokens is .* in the shard, the manifest says"),
        ("num_samples", 1, r"holds \d+ samples, the manifest says \d+"),
        ("max_source_index", 1, "max_source_index is"),
    ],
)
def test_manifest_that_does_not_describe_its_shard(damaged, field, delta, match):
    def change(m):
        m["shards"][-1][field] += delta
        if field in ("num_tokens", "num_samples"):
            m[field] += delta

    edit_manifest(damaged, change)
    one_line_error(damaged, match, deep=False)


def test_frequencies_that_do_not_match_the_shards(damaged):
    def change(m):  # move one count between ids: sums stay right, only a recount can tell
        counts = m["token_frequencies"]["counts"]
        k = next(k for k, c in enumerate(counts) if c >= 2)
        counts[k] -= 1
        counts[k - 1] += 1

    edit_manifest(damaged, change)
    assert validate_dataset(damaged, deep=False) == []
    one_line_error(damaged, "token_frequencies in the manifest differ")


def test_cli_validate_and_inspect(damaged, spec_cli):
    out = subprocess.run([spec_cli, "validate", "--deep", str(damaged)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([spec_cli, "inspect", "--json", str(damaged)], capture_output=True, text=True)
    info = json.loads(out.stdout)
    assert info["samples"] == Dataset(damaged).manifest.num_samples and info["compression"] == "zstd"
    assert info["layers"] == LAYERS and info["dtype"] == "bf16"
    f = shard_path(damaged)
    f.write_bytes(f.read_bytes()[:-1])
    out = subprocess.run([spec_cli, "validate", str(damaged)], capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert (
        out.stderr.startswith("error: ")
        and f.name in out.stderr
        and len(out.stderr.strip().splitlines()) == 1
    )
    (damaged / "manifest.json").write_text("{")
    out = subprocess.run([spec_cli, "inspect", str(damaged)], capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr and "not valid JSON" in out.stderr


def test_a_flipped_byte_anywhere_in_a_manifest_is_found(damaged):
    """The manifest is sealed (its last key is the sha256 of the bytes before it): any changed byte is
    an error of opening the dataset, not only of --deep; manifests of format version 1 (unsealed) are read."""
    from spec_format.dataset.manifest import SEAL

    path = damaged / "manifest.json"
    good = path.read_bytes()
    rng = np.random.default_rng(1)
    for pos in rng.integers(0, len(good), 60):
        bad = bytearray(good)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        path.write_bytes(bytes(bad))
        one_line_error(damaged, ".", deep=False)
    m = json.loads(good)
    m.pop(SEAL)
    path.write_text(json.dumps(m | {"format_version": 1}))
    assert validate_dataset(damaged, deep=True) == []
    path.write_text(json.dumps(m))
    one_line_error(damaged, "checksum field 'manifest_sha256' is missing", deep=False)


@pytest.mark.parametrize("where", ["shard", "manifest"])
def test_kill_while_committing_a_shard_then_resume(tmp_path, where):
    """SIGKILL at the writer's two commit windows (SPEC_DATAGEN_KILL_AT, spec_format.diagnostics): a shard
    file complete but not renamed, or renamed but not yet listed. Resume drops it and redoes its rows."""
    rows = 12
    write(tmp_path / "ref", range(rows))
    out = tmp_path / "ds"
    p = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps({"out": str(out), "rows": rows})],
                         stdout=subprocess.PIPE, text=True, env={**os.environ, "SPEC_DATAGEN_KILL_AT": f"{where}:2"})  # fmt: skip
    assert p.wait(timeout=120) == -signal.SIGKILL
    assert len(Dataset(out).manifest.shards) == 1  # the second shard is on disk, not committed
    assert_only_whole_rows(out)
    p = spawn(out=str(out), rows=rows)
    assert p.wait(timeout=120) == 0
    assert contents(Dataset(out)) == contents(Dataset(tmp_path / "ref"))
    assert not [f.name for f in out.iterdir() if ".tmp" in f.name]


def test_the_data_record_is_kept_across_resume_and_jobs_and_optional(tmp_path):
    """DatasetManifest.data (where rows came from, held-out rows dropped): written with each commit, kept
    on resume, summed over jobs; a manifest without it reads as before."""
    from spec_format.dataset import DataInfo, DataSource

    info = DataInfo(sources=[DataSource(source="hf:org/x", dataset_id="org/x", split="train", revision="ab12")],
                    held_out=["chat"], held_out_dropped=0)  # fmt: skip
    with writer(tmp_path / "a", data=info) as w:
        add_row(w, 0)
        w.set_data(msgspec.structs.replace(info, held_out_dropped=2))
    assert Dataset(tmp_path / "a").manifest.data == msgspec.structs.replace(info, held_out_dropped=2)
    with writer(tmp_path / "a", data=DataInfo(), resume=True) as w:  # resuming keeps the directory's record
        assert w.manifest.data.held_out_dropped == 2
        w.set_data(msgspec.structs.replace(w.manifest.data, held_out_dropped=3))  # no sample after: at close
    assert describe_dataset(tmp_path / "a")["data"]["held_out_dropped"] == 3
    for j in range(2):
        with writer(tmp_path / "b", data=info, shard_index=j, num_shards=2) as w:
            add_row(w, j)
            w.set_data(msgspec.structs.replace(info, held_out_dropped=j + 1))
    assert Dataset(tmp_path / "b").manifest.data.held_out_dropped == 3
    m = write(tmp_path / "c", range(3))
    assert m.data is None and Dataset(tmp_path / "c").manifest.data is None
