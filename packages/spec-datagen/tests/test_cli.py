"""`spec datagen` end to end through the installed console script: kill -9 mid-run, --resume, validate."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from spec_datagen.pipeline import Capturer, write_dataset
from spec_format.dataset import Dataset

LAYERS = "0,1,2,15,27,29,30"  # the shared test engine's layers, so it can write the reference


def datagen_before_engine(spec_cli, demo_model, tmp_path, rows: str, *flags: str):
    """Run `spec datagen` on `rows`; returns (the finished process, engine starts it made, from
    spec_format.diagnostics's SPEC_ENGINE_LOG)."""
    data = tmp_path / "d.jsonl"
    data.write_text(rows)
    log = tmp_path / "engine-starts.log"
    env = {**os.environ, "SPEC_ENGINE_LOG": str(log)}
    cmd = [spec_cli, "datagen", str(demo_model), "--data", str(data), "--out", str(tmp_path / "o"), *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return done, log.read_text().splitlines() if log.exists() else []


def test_bad_layers_fail_before_the_engine_with_one_line(spec_cli, demo_model, tmp_path):
    done, starts = datagen_before_engine(
        spec_cli, demo_model, tmp_path, '{"prompt": "a", "completion": "b"}\n', "--layers", "2,31"
    )
    assert done.returncode == 1 and starts == []
    assert done.stderr.strip().splitlines()[-1].startswith("error: --layers: [31] out of range")
    assert not (tmp_path / "o").exists()


def test_broken_row_with_on_error_fail_stops_before_the_engine(spec_cli, demo_model, tmp_path):
    rows = '{"prompt": "a", "completion": "b"}\n\n{"messages": [{"role": "user"}]}\n'
    done, starts = datagen_before_engine(spec_cli, demo_model, tmp_path, rows, "--on-error", "fail")
    assert done.returncode == 1 and starts == []
    assert f"error: {tmp_path / 'd.jsonl'}:3: messages[0] has no content" in done.stderr


@pytest.mark.e2e
def test_kill_9_then_resume_equals_an_uninterrupted_run(
    spec_cli, demo_model, tmp_path, capture_llm, make_conversations
):
    rows = make_conversations(24, seed=6)
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    ref = tmp_path / "ref"
    cap = Capturer(demo_model, max_len=512, llm=capture_llm)
    write_dataset(cap, data, ref, samples_per_shard=3, progress=False, report=None)

    out = tmp_path / "out"
    cmd = [spec_cli, "datagen", str(demo_model), "--data", str(data), "--out", str(out), "--layers", LAYERS,
           "--max-len", "512", "--samples-per-shard", "3"]  # fmt: skip
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115
    # A session of its own: kill -9 hits the command and vLLM's engine processes at once.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    manifest = out / "manifest.json"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"spec datagen ended (rc {proc.returncode}) before it could be killed: {(tmp_path / 'first.log').read_text()[-2000:]}"
            )
        if manifest.is_file() and len(json.loads(manifest.read_text())["shards"]) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    assert proc.returncode == -signal.SIGKILL
    for _ in range(100):  # the whole process group is gone
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("processes of the killed run are still alive")
    killed = Dataset(out)
    assert 6 <= len(killed) < 24

    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{data}:25: not valid JSON" in done.stderr
    assert f"resuming at input row {killed.source_indices.max() + 1}" in done.stderr
    assert "skipped: malformed: 1" in done.stdout and "tokens/s" in done.stdout

    resumed, whole = Dataset(out), Dataset(ref)
    assert resumed.source_indices.tolist() == list(range(24))
    for a, b in zip(resumed, whole, strict=True):
        assert np.array_equal(a.token_ids, b.token_ids) and np.array_equal(a.loss_mask, b.loss_mask)
        # bf16 storage: the same fp32 states up to one bf16 rounding step.
        np.testing.assert_allclose(a.hidden, b.hidden, rtol=1e-2, atol=1e-2)
    assert np.array_equal(resumed.token_frequencies(), whole.token_frequencies())
    command = resumed.manifest.command
    assert command.startswith(f"spec datagen {demo_model} --data {data}") and f"--layers {LAYERS}" in command
    valid = subprocess.run([spec_cli, "validate", "--deep", str(out)], capture_output=True, text=True)
    assert valid.returncode == 0, valid.stderr


def test_the_recorded_command_line_repeats_the_run(demo_model, tmp_path):
    """datagen's argv for its manifest and its data-parallel jobs is rebuilt from what click parsed: parsed
    again it gives the same options, defaults spelled out, and leaves out only what it was told to."""
    from spec_datagen.cli import _command_line, datagen

    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "b.jsonl").write_text("")
    given = [str(demo_model), "--data", str(tmp_path / "a.jsonl"), "--data", str(tmp_path / "b.jsonl"),
             "--out", str(tmp_path / "o"), "--max-samples", "5", "--no-progress", "--resume",
             "--chat-template-kwargs", '{"enable_thinking": false}']  # fmt: skip
    ctx = datagen.make_context("datagen", list(given))
    argv = _command_line(ctx, {"resume"}, layers="2,15,27,30")
    assert argv[:5] == given[:5] and "--resume" not in argv and "--no-progress" in argv
    assert "--max-len" in argv and "--on-error" in argv  # defaults spelled out
    again = datagen.make_context("datagen", argv).params
    assert again == {**ctx.params, "layers": [2, 15, 27, 30], "resume": False}
