"""Online training on the real SmolLM2 target: `spec train --online` against `spec datagen` + `spec train` on
the same rows, an online run whose capture process is killed and which then resumes, and its --cache.

Engine starts (each in its own process, 35-50 s): spec datagen's, the online run's, its resumption's.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
from safetensors.numpy import load_file

from spec_format.errors import SpecError
from spec_train.data import Rows, Stream, split_samples
from spec_train.online import Inbox, capture_jobs

TOPICS = ["rivers", "honey bees", "volcanoes", "the moon", "bread", "rainbows", "bicycles", "the ocean", "owls",
          "libraries", "trains", "snow", "clocks", "gardens", "bridges", "whales", "deserts", "kites", "maps",
          "candles"]  # fmt: skip
STEPS = ["--max-steps", "16", "--save-every", "4", "--batch-tokens", "512", "--val-fraction", "0.2",
         "--draft-vocab-size", "2048", "--save-dtype", "float32", "--no-progress"]  # fmt: skip


def conversations(path: Path) -> Path:
    """40 short chats and one broken row (line 21), which both paths report as FILE:LINE and skip."""
    rows = []
    for t in TOPICS:
        for ask, reply in (
            (f"Explain {t} in simple terms.", f"Sure! {t.capitalize()} are easy to understand. In simple terms, "
             f"{t} are part of the world around us, and people have studied {t} for a very long time."),
            (f"Give me two facts about {t}.", f"Here are two facts about {t}. First, {t} can be found in many "
             f"places. Second, many people find {t} interesting and enjoy learning about {t}."),
        ):  # fmt: skip
            rows.append(
                {"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": reply}]}
            )
    lines = [json.dumps(r) for r in rows]
    lines.insert(20, json.dumps({"messages": "not a list"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def acceptance_se(r: dict) -> float:
    """Standard error of a mean acceptance length from its conditional rates over r["chains"] chains:
    P(L >= m) = a_0 ... a_{m-1} for L accepted drafts, so E[L] = sum_m P(L >= m), E[L^2] = sum_m (2m-1) P."""
    tail, run = [], 1.0
    for a in r["acceptance"]:
        run *= a
        tail.append(run)
    mean, second = sum(tail), sum((2 * j + 1) * p for j, p in enumerate(tail))
    return math.sqrt(max(second - mean**2, 0.0) / r["chains"])


class Runs(msgspec.Struct):
    offline: str
    online: str
    cache: str
    killed: subprocess.CompletedProcess
    leftover: list[int]  # processes of the killed run still alive after it exited
    resumed_stderr: str
    datagen_stderr: str


def session_members(sid: int) -> list[int]:
    """Live processes of session `sid` (a command started with start_new_session and all it started)."""
    found = []
    for p in Path("/proc").iterdir():
        try:
            if (
                p.name.isdigit()
                and os.getsid(int(p.name)) == sid
                and (p / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            ):
                found.append(int(p.name))
        except OSError:
            pass
    return found


@pytest.fixture(scope="module")
def runs(demo_model, spec_cli, run_train, tmp_path_factory) -> Runs:
    tmp = tmp_path_factory.mktemp("online")
    rows = conversations(tmp / "rows.jsonl")
    m = str(demo_model)
    datagen = subprocess.run([spec_cli, "datagen", m, "--data", str(rows), "--out", str(tmp / "ds"), "--no-progress"],
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert datagen.returncode == 0, datagen.stderr[-3000:]
    run_train([str(tmp / "ds"), "--verifier", m, "--out", str(tmp / "offline"), *STEPS], timeout=900)

    # Online with a cache; the capture process kills itself before it sends its last sample (the first
    # epoch's last row, which step 5 reads: the step-4 checkpoint is on disk by then).
    online = [sys.executable, "-m", "spec_train", "--online", m, "--data", str(rows), "--cache", str(tmp / "cache"),
              "--out", str(tmp / "online"), "--samples-per-shard", "4", "--online-queue", "2", *STEPS]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SPEC_CAPTURE_KILL_AT": "send:-1"}
    proc = subprocess.Popen(online, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:  # a hung trainer (what Inbox fixes): fail, and leave no engine behind
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(
            f"the online run did not stop after its capture died:\n{proc.communicate()[1]}"
        ) from None
    killed = subprocess.CompletedProcess(online, proc.returncode, out, err)
    # The run's own session: its capture process and engine included. multiprocessing's resource tracker
    # may take a moment to exit after the trainer; an orphaned engine stays for good.
    deadline = time.monotonic() + 10
    while (leftover := session_members(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    resumed = run_train(online[3:] + ["--resume"], timeout=900)
    return Runs(str(tmp / "offline"), str(tmp / "online"), str(tmp / "cache"), killed, leftover, resumed.stderr,
                datagen.stderr)  # fmt: skip


@pytest.mark.e2e
def test_engine_death_stops_training_in_one_line_and_resume_continues(runs):
    assert runs.killed.returncode == 1, runs.killed.stderr[-3000:]
    assert runs.leftover == [], "the dead capture process's engine outlived the run"  # it held 4.6 GB
    last = runs.killed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the capture engine (process ") and "died" in last and "--resume" in last, (
        last
    )
    assert "resumed from" in runs.resumed_stderr and "(step 4 of 16)" in runs.resumed_stderr
    assert (Path(runs.online) / "checkpoints" / "step-000016").is_dir()


@pytest.mark.e2e
def test_online_run_matches_datagen_then_train(runs):
    on, off = metrics(Path(runs.online)), metrics(Path(runs.offline))
    # The same rows in the same order at every step, before and after the resume: per-step training losses
    # agree to the capture's own noise (hidden states of the same tokens, batched differently in vLLM).
    tr_on = [x["loss"] for x in on if x["split"] == "train"]
    tr_off = [x["loss"] for x in off if x["split"] == "train"]
    assert len(tr_on) == len(tr_off) == 16
    assert [x["tokens"] for x in on if x["split"] == "train"] == [
        x["tokens"] for x in off if x["split"] == "train"
    ]
    np.testing.assert_allclose(tr_on, tr_off, rtol=0.02)
    # The draft vocabulary from the tokenization pass equals the one from the dataset's token counts.
    d2t = [load_file(Path(r) / "final" / "model.safetensors")["d2t"] for r in (runs.online, runs.offline)]
    np.testing.assert_array_equal(*d2t)
    # Validation acceptance within two standard errors.
    v_on, v_off = [x for x in on if x["split"] == "val"][-1], [x for x in off if x["split"] == "val"][-1]
    assert v_on["chains"] == v_off["chains"] > 0
    se = math.hypot(acceptance_se(v_on), acceptance_se(v_off))
    print(
        f"val acceptance online {v_on['acceptance_length']:.4f} offline {v_off['acceptance_length']:.4f}, se {se:.4f}"
    )
    assert abs(v_on["acceptance_length"] - v_off["acceptance_length"]) <= 2 * se
    # Both paths reported the broken row, and no other, by FILE:LINE.
    for stderr in (runs.datagen_stderr, runs.killed.stderr):
        assert set(re.findall(r"rows\.jsonl:(\d+): ", stderr)) == {"21"}, stderr[-3000:]


@pytest.mark.e2e
def test_cache_is_a_valid_dataset_an_offline_run_trains_from(runs, spec_cli, demo_model, run_train, tmp_path):
    proc = subprocess.run(
        [spec_cli, "validate", "--deep", runs.cache], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from spec_format.dataset import Dataset

    ds, src = Dataset(runs.cache), Dataset(Path(runs.offline).parent / "ds")
    assert len(ds) == len(src) and sorted(ds.source_indices) == sorted(src.source_indices)
    run_train([runs.cache, "--verifier", str(demo_model), "--out", str(tmp_path / "r"), "--max-steps", "2",
               "--batch-tokens", "512", "--no-progress"], timeout=600)  # fmt: skip
    assert (tmp_path / "r" / "final" / "model.safetensors").is_file()


def test_capture_jobs_send_what_the_trainer_reads_and_cache_what_is_missing():
    """The capture schedule, with and without a cache, from any resume point: the samples sent are exactly
    the evaluation samples then the rows' samples in stream order; the cache receives the validation samples
    and then the first epoch's, each once, continuing after what it holds."""
    lengths = np.random.default_rng(0).integers(100, 600, 30)
    split = split_samples(30, 0.15, 256, 0)
    stream = Stream(split.train, lengths, 1024, 0)
    vr = Rows(split.val, lengths, 1024)
    held = list(
        dict.fromkeys([i for r in range(len(vr)) for i, _ in vr.row(r)] + [i for i, _ in stream.row(0)])
    )
    e0, end = stream.epoch_start(1), 2 * stream.epoch_start(1) + 3
    rows = lambda a, b: [i for r in range(a, b) for i, _ in stream.row(r)]  # noqa: E731
    W = list(split.val) + rows(0, e0)
    for first, cached in [(0, None), (e0 + 2, None), (0, 0), (3, 0), (3, 10), (2, 3), (e0 + 1, len(W))]:
        jobs = capture_jobs(split.val, held, stream, first, end, cached)
        sent = [k for k, send, _ in jobs if send]
        assert sent == held + rows(first, end if cached is None else max(first, e0)), (first, cached)
        if cached is not None:
            assert [k for k, _, write in jobs if write] == W[cached:], (first, cached)


def test_two_ranks_train_and_capture_spec_datagens_shares(demo_model, tmp_path):
    """Under torchrun with 2 ranks (no engine needed): rank r's rows hold only samples of the input rows
    that `spec datagen --shard-index r --num-shards 2` captures, every training sample belongs to one
    rank's stream, and each rank's capture schedule sends the evaluation samples, then its own rows'."""
    from spec_datagen.pipeline import tokenized_samples
    from spec_datagen.template import ChatRenderer
    from spec_train.config import TrainConfig
    from spec_train.data import step_rows
    from spec_train.online import OnlineData, sharded_stream

    rows = conversations(tmp_path / "rows.jsonl")
    data = OnlineData(str(demo_model), [str(rows)], "eagle3", 2048, "truncate", "skip")
    split = split_samples(len(data), 0.2, 256, 0)
    cfg = TrainConfig(online=str(demo_model), data=[str(rows)], out="x", batch_tokens=256, grad_accum=2)
    stream = sharded_stream(data, split.train, cfg, 2)
    renderer = ChatRenderer.for_model(demo_model)
    train_sources = {data.samples[k].source_index for k in split.train}
    for r in range(2):
        datagen = {s.source_index for s in tokenized_samples([str(rows)], renderer, max_len=2048, shard_index=r,
                                                             num_shards=2, report=None)}  # fmt: skip
        own = {data.samples[k].source_index for k in stream.streams[r].samples}
        assert own == datagen & train_sources
        steps = stream.rows_for_epochs(1.0) // 4
        read = [i for s in range(steps) for g in step_rows(s, r, 2, 2) for i, _ in stream.row(g)]
        assert read == [i for j in range(steps * 2) for i, _ in stream.streams[r].row(j)]
        assert {data.samples[i].source_index for i in read} <= datagen
        jobs = capture_jobs(split.val, [3], stream.streams[r], 2, steps * 2, None)
        assert [k for k, _, _ in jobs] == [3] + read[
            len([i for j in range(2) for i, _ in stream.streams[r].row(j)]) :
        ]
    assert set(stream.streams[0].samples) | set(stream.streams[1].samples) == set(split.train)


def test_a_capture_process_killed_mid_message_stops_the_reader_in_one_line():
    """The trainer's hang this guards against: a capture process killed while it writes a sample leaves
    part of the message in the queue's pipe, and a plain Queue.get(timeout=...) then waits in recv for the
    rest for ever. Inbox.get must see the death and raise the one-line error within seconds."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # the child only writes bytes: no torch threads in it
    q = ctx.Queue(maxsize=2)
    proc = ctx.Process(target=q.put, args=((3, b"\0" * (64 << 20)),))  # 64 MiB: far more than a pipe holds
    proc.start()
    deadline = time.monotonic() + 30
    while not q._reader.poll() and time.monotonic() < deadline:  # the first bytes are in the pipe
        time.sleep(0.01)
    assert q._reader.poll(), "nothing reached the pipe in 30 s: a kill now would not land mid-message"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    # The child exits only once its queue's feeder thread has written all 64 MiB: killed, it had not.
    assert proc.exitcode == -signal.SIGKILL
    inbox = Inbox(q, proc)
    t0 = time.monotonic()
    with pytest.raises(SpecError, match=r"the capture engine \(process \d+\) died .*--resume"):
        inbox.get()
    assert time.monotonic() - t0 < 10
