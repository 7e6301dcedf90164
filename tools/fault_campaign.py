"""Fault campaign: many faults of each kind against the real commands, and what survived, as one table.

    uv run --no-sync python tools/fault_campaign.py --trials 3 --json campaign.json   # about 15 min, 2 cores

Kinds of trial (every count is at least --trials; --only picks kinds):
  crash_datagen  `spec datagen` on the real target, killed with SIGKILL (its whole process group: vLLM's
                 engine too) at a random moment, or while committing a random shard (the file written but
                 not renamed, or renamed but not in the manifest: SPEC_DATAGEN_KILL_AT), then --resume;
                 against one uninterrupted run: input rows lost and duplicated, token ids and loss masks
                 equal, hidden states equal (bf16; a resumed run batches other rows together, so fp32 sums
                 differ in the last bits: within one bf16 rounding step, rtol = atol = 1e-2), and
                 `spec validate --deep` passes.
  crash_train    `spec train` on that dataset, killed mid-step, mid-checkpoint-write (SPEC_TRAIN_KILL_AT)
                 or from outside at a random moment, then --resume: steps lost or logged twice, final fp32
                 weights and AdamW state bit for bit equal to an uninterrupted run (deterministic on CPU).
  crash_online   `spec train --online` on the real target with --cache, killed: its capture process (its
                 engine with it) before a random sample it sends (SPEC_CAPTURE_KILL_AT: the trainer must stop
                 in one line), the whole run from outside at a random moment, or mid-checkpoint-write; then
                 --resume. Against one uninterrupted online run: steps lost or logged twice, the same
                 training tokens at every step (same rows, same order), per-step losses and final weights
                 within the capture's noise (a resumed capture batches other samples together in vLLM, so
                 states differ in the last bits: losses rtol 2e-2, weights max |dw| <= 1e-2 max |w|), and
                 the cache equal to the uninterrupted run's (rows lost, duplicated; `spec validate --deep`).
  corruption     one flipped byte (placed uniformly over the file), a truncation (to a uniform length) or
                 a deletion, of dataset shards, manifest.json, a checkpoint's config.json and
                 model.safetensors and its training state; detected by `spec validate --deep`, by the
                 reader (opening and reading every sample) and by --resume (state.load_checkpoint, what
                 `spec train --resume` runs). A silent acceptance is a damaged file that the check meant
                 for it (validate for datasets and speculator files, --resume for training state) accepts;
                 a detection counts only as one line naming the damaged file, and every check must first
                 accept an undamaged copy of the dataset and of the checkpoint (the controls).
  full_disk      capture and training into a small tmpfs (mounted here: needs root, else skipped with a
                 message): datagen's disk check refuses before the engine; with --force, writing stops with
                 one line and the committed shards stay; training stops with one line at the checkpoint
                 that does not fit; after the tmpfs grows, --resume gives the uninterrupted result.
  fuzz           conversation files with mutated JSON, wrong types, huge lines, invalid UTF-8 and control
                 bytes, through what datagen, regenerate and eval read before an engine starts (their row
                 readers), plus `spec datagen --on-error fail` on one: no traceback, every bad row named
                 by FILE:LINE, every good row kept. The uninterrupted datagen run above has bad rows too.
  targets        `spec datagen`, `spec eval` and `spec serve` with targets vLLM cannot pair (GPT-2: no
                 aux-hidden-state interface; DeepSeek-V2: MLA, refused for capture; an unknown architecture):
                 exit 1 with one line naming the architecture, no traceback, no engine start, no output.

--dataset/--verifier skip the datagen reference run (train, corruption and fuzz then use them; the test
suite passes a tiny captured dataset so): crash_datagen, crash_online and full_disk's capture need the real
run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import msgspec
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPEC = str(Path(sys.executable).parent / "spec")
KINDS = ("crash_datagen", "crash_train", "crash_online", "corruption", "full_disk", "fuzz", "targets")
TRAIN = ["--max-steps", "6", "--save-every", "2", "--keep-last", "10", "--draft-vocab-size", "256",
         "--batch-tokens", "256", "--loss-chunk", "64", "--val-fraction", "0", "--no-progress"]  # fmt: skip
DATAGEN = ["--max-len", "256", "--samples-per-shard", "3", "--no-progress"]


class Row(msgspec.Struct):
    """One line of the table: `trials` faults of one case and what they cost."""

    kind: str
    case: str
    trials: int = 0
    ok: int = 0
    samples_lost: int = 0
    samples_duplicated: int = 0
    silent_acceptances: int = 0
    tracebacks: int = 0
    detail: str = ""
    message: str = ""  # what a user sees (one line), for one of the trials


class Campaign:
    def __init__(self, work: Path, seed: int):
        self.work, self.seed = work, seed
        self.rng = random.Random(seed)
        self.rows: list[Row] = []
        self.engine_log = work / "engine-starts.log"

    def row(self, kind: str, case: str) -> Row:
        for r in self.rows:
            if (r.kind, r.case) == (kind, case):
                return r
        self.rows.append(Row(kind, case))
        return self.rows[-1]

    def env(self, **extra: str) -> dict:
        return {**os.environ, "SPEC_ENGINE_LOG": str(self.engine_log), "PYTHONUNBUFFERED": "1", **extra}

    def engine_starts(self) -> int:
        return len(self.engine_log.read_text().splitlines()) if self.engine_log.exists() else 0


def log(msg: str) -> None:
    print(f"[campaign {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else ""


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of a command started with start_new_session (vLLM's engine with it)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for _ in range(100):
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# Inputs.

WORDS = ["river", "stone", "lamp", "garden", "window", "orange", "quiet", "market", "letter", "bridge", "winter", "paper", "music", "cloud", "harbour", "engine", "little", "yellow", "forest", "ticket"]  # fmt: skip


def conversation(rng: random.Random) -> dict:
    def words(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    return {"messages": [{"role": "user", "content": f"Tell me about {words(rng.randint(3, 12))}."},
                         {"role": "assistant", "content": words(rng.randint(20, 60)).capitalize() + "."}]}  # fmt: skip


def bad_line(rng: random.Random, kind: str) -> bytes:
    """One line that no reader may take, of the given kind (each is invalid as a conversation)."""
    good = json.dumps(conversation(rng))
    if kind == "truncated":
        return good[: rng.randint(1, len(good) - 2)].encode()
    if kind == "wrong_type":
        return json.dumps(rng.choice([
            {"messages": 5}, {"messages": [{"role": 3, "content": "x"}]}, {"messages": [{"role": "user"}]},
            {"messages": []}, {"prompt": ["a"], "completion": "b"}, {}, [1, 2], "text", 7, None,
            {"messages": [{"role": "user", "content": {"text": 1}}]},
        ])).encode()  # fmt: skip
    if kind == "invalid_utf8":
        raw = good.encode()
        cut = raw.index(b'"content": "') + 12
        return raw[:cut] + rng.choice([b"\xff\xfe", b"\xc3", b"\xed\xa0\x80"]) + raw[cut:]
    if kind == "control_byte":
        cut = good.index('"content": "') + 12
        return (good[:cut] + "\x00\x01" + good[cut:]).encode()
    if kind == "huge":  # 4 MB of broken JSON on one line
        return b'{"messages": [{"role": "user", "content": "' + b"x" * (4 << 20)
    if kind == "mutated":  # a structural character replaced: never valid JSON
        i = rng.choice([m.start() for m in re.finditer(r"[{}\[\]:]", good)])
        return (good[:i] + rng.choice("#;'") + good[i + 1 :]).encode()
    raise ValueError(kind)


BAD_KINDS = ("truncated", "wrong_type", "invalid_utf8", "control_byte", "huge", "mutated")


def fuzzed_file(path: Path, rng: random.Random, n_good: int, n_bad: int) -> tuple[set[int], set[int]]:
    """Write a JSONL file of good and bad rows (one huge good row among them); (good lines, bad lines)."""
    lines: list[tuple[bytes, bool]] = [(json.dumps(conversation(rng)).encode(), True) for _ in range(n_good)]
    huge = conversation(rng)
    huge["messages"][1]["content"] = " ".join(rng.choice(WORDS) for _ in range(60_000))  # ~0.4 MB
    lines.append((json.dumps(huge).encode(), True))
    lines += [(bad_line(rng, BAD_KINDS[i % len(BAD_KINDS)]), False) for i in range(n_bad)]
    rng.shuffle(lines)
    path.write_bytes(b"".join(text + b"\n" for text, _ in lines))
    good = {i + 1 for i, (_, ok) in enumerate(lines) if ok}
    return good, {i + 1 for i, (_, ok) in enumerate(lines) if not ok}


def named_lines(messages: list[str], path: Path) -> set[int]:
    found = set()
    for m in messages:
        found |= {int(x) for x in re.findall(re.escape(str(path)) + r":(\d+)", m)}
    return found


# ---------------------------------------------------------------------------------------------
# Datasets and runs compared with the uninterrupted one.


def compare_datasets(got: Path, ref: Path) -> tuple[int, int, str | None]:
    """(input rows lost, rows duplicated, what differs or None)."""
    from spec_format.dataset import Dataset

    a, b = Dataset(got), Dataset(ref)
    ids_a, ids_b = a.source_indices.tolist(), b.source_indices.tolist()
    lost = len(set(ids_b) - set(ids_a))
    dup = len(ids_a) - len(set(ids_a))
    if lost or dup or ids_a != ids_b:
        return lost, dup, f"source rows differ ({len(ids_a)} vs {len(ids_b)})"
    bitwise = True
    for i in range(len(b)):
        x, y = a.raw(i), b.raw(i)
        if not (np.array_equal(x.token_ids, y.token_ids) and np.array_equal(x.loss_mask, y.loss_mask)):
            return 0, 0, f"sample {i}: token ids or loss mask differ"
        if not np.array_equal(x.hidden, y.hidden):
            bitwise = False
            if not np.allclose(a[i].hidden, b[i].hidden, rtol=1e-2, atol=1e-2):
                return 0, 0, f"sample {i}: hidden states differ beyond one bf16 step"
    if not np.array_equal(a.token_frequencies(), b.token_frequencies()):
        return 0, 0, "token frequencies differ"
    return 0, 0, None if bitwise else "states within one bf16 step"


def datagen_cmd(target: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [SPEC, "datagen", str(target), "--data", str(data), "--out", str(out), *DATAGEN, *extra]


def train_cmd(ds: Path, verifier: Path, out: Path, *extra: str) -> list[str]:
    return [SPEC, "train", str(ds), "--verifier", str(verifier), "--out", str(out), *TRAIN, *extra]


def final_state(run: Path) -> dict:
    from safetensors.numpy import load_file

    last = sorted((run / "checkpoints").glob("step-*"))[-1]
    t = last / "training"
    return {"step": last.name, **{f"w:{k}": v for k, v in load_file(str(t / "weights.safetensors")).items()},
            **{f"o:{k}": v for k, v in load_file(str(t / "optimizer.safetensors")).items()}}  # fmt: skip


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (a[k] == b[k]) if k == "step" else np.array_equal(a[k], b[k]) for k in a
    )


def train_metrics(run: Path) -> list[dict]:
    """The run's logged training steps (metrics.jsonl's "train" lines; none before the first)."""
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    return [x for x in map(json.loads, lines) if x.get("split") == "train"]


def logged_steps(run: Path) -> list[int]:
    return [x["step"] for x in train_metrics(run)]


def steps_lost_duplicated(run: Path, total: int) -> tuple[int, int]:
    steps = logged_steps(run)
    return len(set(range(1, total + 1)) - set(steps)), len(steps) - len(set(steps))


# ---------------------------------------------------------------------------------------------
# Kinds.


def reference_datagen(c: Campaign, target: Path) -> tuple[Path, Path]:
    """The uninterrupted capture (its input has bad rows: they must be named and skipped)."""
    data = c.work / "rows.jsonl"
    rows = [json.dumps(conversation(c.rng)).encode() for _ in range(18)]
    rows.insert(5, bad_line(c.rng, "truncated"))
    rows.insert(11, bad_line(c.rng, "invalid_utf8"))
    data.write_bytes(b"\n".join(rows) + b"\n")
    ref = c.work / "ref-ds"
    shutil.rmtree(ref, ignore_errors=True)
    log("datagen: the uninterrupted reference run")
    done = run(datagen_cmd(target, data, ref), c.env())
    r = c.row("fuzz", "bad rows in the real datagen run")
    r.trials += 1
    named = named_lines(done.stderr.splitlines(), data)
    if (
        done.returncode == 0
        and named == {6, 12}
        and "Traceback" not in done.stderr
        and "samples: 18" in done.stdout
    ):
        r.ok += 1
        r.detail = "both bad rows named by FILE:LINE, the 18 good rows captured"
    else:
        r.detail = f"rc {done.returncode}, named {sorted(named)}: {last_line(done.stderr)[:200]}"
    if done.returncode != 0:
        raise SystemExit(f"the reference datagen run failed:\n{done.stderr[-3000:]}")
    r.tracebacks += "Traceback" in done.stderr
    return data, ref


def _kill(c: Campaign, proc: subprocess.Popen, kind: str, mode: str) -> tuple[Row, int | None]:
    """Kill the run's process group and count the trial: (its row, the exit code the run had already
    ended with, None where the kill landed while it ran)."""
    ended = proc.poll()
    kill_group(proc)
    r = c.row(kind, mode)
    r.trials += 1
    return r, ended


def _until_the_kill(c: Campaign, proc, out: Path, outside: bool, max_logged: int, within_s: float) -> None:
    """An outside kill: wait until 0..max_logged training steps are logged in `out`, then 0..within_s
    seconds more. Otherwise a hook kills the run: wait for it to end (a hung run is killed after 10 min
    and fails its trial)."""
    if outside:
        after = c.rng.randint(0, max_logged)
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline and len(logged_steps(out)) < after:
            time.sleep(0.005)
        time.sleep(c.rng.uniform(0, within_s))
    else:
        try:
            proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            pass


def _resumed(c: Campaign, r: Row, resume_cmd: list[str]) -> bool:
    """Run the --resume command; a failure is recorded in the row (detail, tracebacks)."""
    done = run(resume_cmd, c.env())
    if done.returncode != 0:
        r.detail = f"resume failed: {last_line(done.stderr)[:200]}"
        r.tracebacks += "Traceback" in done.stderr
    return done.returncode == 0


def crash_datagen(c: Campaign, target: Path, data: Path, ref: Path, n: int) -> None:
    from spec_format.dataset import Dataset

    shards = len(Dataset(ref).manifest.shards)
    for i in range(n):
        mode = ("random moment", "shard file not renamed", "shard not in manifest")[(i + c.seed) % 3]
        out = c.work / f"dg-crash-{i}"
        k = c.rng.randint(1, shards - 1)
        env = c.env()
        if mode != "random moment":
            env["SPEC_DATAGEN_KILL_AT"] = f"{'shard' if mode.startswith('shard file') else 'manifest'}:{k}"
        log(f"crash_datagen {i + 1}/{n}: {mode}" + (f" at shard {k}" if mode != "random moment" else ""))
        proc = subprocess.Popen(datagen_cmd(target, data, out), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env, start_new_session=True)  # fmt: skip
        if mode == "random moment":  # after 0..shards-2 committed shards, 0-0.5 s more
            want = c.rng.randint(0, shards - 2)
            deadline = time.monotonic() + 900
            while proc.poll() is None and time.monotonic() < deadline:
                m = out / "manifest.json"
                try:
                    if m.is_file() and len(json.loads(m.read_bytes())["shards"]) >= want:
                        break
                except ValueError:
                    pass
                time.sleep(0.02)
            time.sleep(c.rng.uniform(0, 0.5))
        else:
            proc.wait(timeout=900)
        r, killed_rc = _kill(c, proc, "crash_datagen", mode)
        if killed_rc == 0:
            r.detail = "the run ended before the kill (not counted as a kill)"
        before = len(Dataset(out)) if (out / "manifest.json").is_file() else 0
        if not _resumed(c, r, [*datagen_cmd(target, data, out), "--resume"]):
            continue
        lost, dup, diff = compare_datasets(out, ref)
        r.samples_lost += lost
        r.samples_duplicated += dup
        valid = run([SPEC, "validate", "--deep", str(out)], c.env())
        if (
            (diff is None or diff == "states within one bf16 step")
            and valid.returncode == 0
            and killed_rc != 0
        ):
            r.ok += 1
            r.detail = f"killed with {before} samples committed; resumed equal" + (
                f" ({diff})" if diff else " (bit for bit)"
            )
        else:
            r.detail = f"{diff or ''} validate rc {valid.returncode} {last_line(valid.stderr)[:120]}"
        shutil.rmtree(out, ignore_errors=True)


def reference_run(c: Campaign, name: str, cmd, out: str) -> Path:
    """The uninterrupted run (c.work/out) that crash trials are compared with: cmd(dir) -> its command."""
    ref = c.work / out
    shutil.rmtree(ref, ignore_errors=True)
    log(f"{name}: the uninterrupted reference run")
    done = run(cmd(ref), c.env())
    if done.returncode != 0:
        raise SystemExit(f"the reference {name} run failed:\n{done.stderr[-3000:]}")
    return ref


def crash_train(c: Campaign, ds: Path, verifier: Path, ref: Path, n: int) -> None:
    want = final_state(ref)
    for i in range(n):
        mode = ("mid-step", "mid-checkpoint-write", "outside, random moment")[(i + c.seed) % 3]
        out = c.work / f"train-crash-{i}"
        env = c.env()
        if mode == "mid-step":
            env["SPEC_TRAIN_KILL_AT"] = f"step:{c.rng.randint(1, 5)}"
        elif mode == "mid-checkpoint-write":
            env["SPEC_TRAIN_KILL_AT"] = f"checkpoint:{c.rng.choice([2, 4, 6])}"
        log(f"crash_train {i + 1}/{n}: {mode} {env.get('SPEC_TRAIN_KILL_AT', '')}")
        proc = subprocess.Popen(train_cmd(ds, verifier, out), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env, start_new_session=True)  # fmt: skip
        # outside: 0-3 steps logged, then a moment within the next step (a step takes 0.1-1 s here)
        _until_the_kill(c, proc, out, mode.startswith("outside"), 3, 0.05)
        r, killed_rc = _kill(c, proc, "crash_train", mode)
        if not _resumed(c, r, [*train_cmd(ds, verifier, out), "--resume"]):
            continue
        lost, dup = steps_lost_duplicated(out, 6)
        r.samples_lost += lost
        r.samples_duplicated += dup
        if same_state(final_state(out), want) and not lost and not dup:
            r.ok += 1
            r.detail = "final weights and AdamW state bit for bit equal" + (
                " (the run ended before the kill)" if killed_rc == 0 else ""
            )
        else:
            r.detail = f"final state differs (steps lost {lost}, duplicated {dup})"
        shutil.rmtree(out, ignore_errors=True)


def online_cmd(target: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [SPEC, "train", "--online", str(target), "--data", str(data), "--out", str(out),
            "--cache", str(out / "cache"), "--samples-per-shard", "3", *TRAIN, *extra]  # fmt: skip


def crash_online(c: Campaign, target: Path, data: Path, ref: Path, n: int) -> None:
    from spec_format.dataset import Dataset
    from spec_train.online import kill_capture_group

    def weights(run_dir: Path) -> dict:  # the fp32 training weights of the last checkpoint
        return {k: v for k, v in final_state(run_dir).items() if k.startswith("w:")}

    want, ref_steps, n_cached = weights(ref), train_metrics(ref), len(Dataset(ref / "cache"))
    for i in range(n):
        mode = ("capture killed", "outside, random moment", "mid-checkpoint-write")[(i + c.seed) % 3]
        out = c.work / f"online-crash-{i}"
        env = c.env()
        if mode == "capture killed":  # before it sends one of its first n_cached samples (it sends more)
            env["SPEC_CAPTURE_KILL_AT"] = f"send:{c.rng.randint(1, n_cached)}"
        elif mode == "mid-checkpoint-write":
            env["SPEC_TRAIN_KILL_AT"] = f"checkpoint:{c.rng.choice([2, 4, 6])}"
        log(f"crash_online {i + 1}/{n}: {mode} "
            f"{env.get('SPEC_CAPTURE_KILL_AT', env.get('SPEC_TRAIN_KILL_AT', ''))}")  # fmt: skip
        log_path = c.work / f"online-crash-{i}.log"  # a file: vLLM's log would fill a pipe nobody reads
        with open(log_path, "w") as f:
            proc = subprocess.Popen(online_cmd(target, data, out), stdout=subprocess.DEVNULL, stderr=f, env=env,
                                    start_new_session=True)  # fmt: skip
        # outside: 0-4 steps logged (0: the engine may still be starting), then 0-0.5 s more
        _until_the_kill(c, proc, out, mode.startswith("outside"), 4, 0.5)
        r, ended = _kill(c, proc, "crash_online", mode)
        stderr = log_path.read_text(errors="replace")
        # The capture process has a process group of its own: after an outside kill of the run's group it
        # stops by itself; make sure it and its engine are gone before the resume, as the trainer would.
        for pid in re.findall(r"capture process (\d+) is feeding", stderr):
            kill_capture_group(int(pid))
        line = last_line(stderr)
        if mode == "capture killed":
            r.message = line.replace(str(c.work), "DIR")[:200]
            r.tracebacks += "Traceback" in stderr
            stopped = (
                ended == 1 and line.startswith("error: the capture engine (process ") and "--resume" in line
            )
            if not stopped:
                r.detail = f"rc {ended}, not the one-line stop: {line[:160]}"
                shutil.rmtree(out, ignore_errors=True)
                continue
        if not _resumed(c, r, [*online_cmd(target, data, out), "--resume"]):
            continue
        lost, dup = steps_lost_duplicated(out, 6)
        c_lost, c_dup, diff = compare_datasets(out / "cache", ref / "cache")
        r.samples_lost += lost + c_lost
        r.samples_duplicated += dup + c_dup
        got_steps = train_metrics(out)
        same_rows = [x["tokens"] for x in got_steps] == [x["tokens"] for x in ref_steps]
        losses = np.allclose([x["loss"] for x in got_steps], [x["loss"] for x in ref_steps], rtol=2e-2)
        got = weights(out)
        dw = max(float(np.abs(got[k] - want[k]).max() / max(np.abs(want[k]).max(), 1e-12)) for k in want)
        valid = run([SPEC, "validate", "--deep", str(out / "cache")], c.env())
        if (not lost and not dup and same_rows and losses and dw <= 1e-2 and valid.returncode == 0
                and diff in (None, "states within one bf16 step") and got.keys() == want.keys()):  # fmt: skip
            r.ok += 1
            r.detail = f"resumed: same rows per step, max |dw|/max |w| {dw:.1e}, cache equal" + (
                " (the run ended before the kill)" if ended == 0 else ""
            )
        else:
            r.detail = (f"steps lost {lost} dup {dup}, same rows {same_rows}, losses {losses}, dw {dw:.1e}, "
                        f"cache {diff}, validate rc {valid.returncode}")  # fmt: skip
        shutil.rmtree(out, ignore_errors=True)


def _damage(path: Path, how: str, rng: random.Random) -> None:
    data = path.read_bytes()
    path.unlink()  # a hard-linked copy: write a file of its own
    if how == "delete":
        return
    if how == "truncate":
        path.write_bytes(data[: rng.randrange(len(data))])
        return
    b = bytearray(data)
    pos = rng.randrange(len(b))
    b[pos] ^= rng.randint(1, 255)
    path.write_bytes(bytes(b))


def _linked_copy(src: Path, dst: Path) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, copy_function=os.link)


def _catch(fn) -> tuple[bool, str, bool]:
    """(raised a SpecError, its message, raised anything else: a traceback a user would see)."""
    from spec_format.errors import SpecError

    try:
        fn()
    except SpecError as e:
        return True, str(e), False
    except Exception:
        return True, traceback.format_exc(limit=3).strip().splitlines()[-1], True
    return False, "", False


def _checks(what: str, copy: Path) -> dict:
    """The checks a copy of a dataset or a checkpoint meets: name -> a function that raises on damage."""
    from spec_format.dataset import Dataset, validate_dataset
    from spec_format.validate import validate_checkpoint
    from spec_train import state

    if what == "dataset":

        def read_all():
            d = Dataset(copy)
            for i in range(len(d)):
                d[i]

        return {"validate --deep": lambda: _raise_if(validate_dataset(copy, deep=True)), "reader": read_all}
    return {"validate --deep": lambda: _raise_if(validate_checkpoint(copy).errors),
            "--resume": lambda: state.load_checkpoint(copy)}  # fmt: skip


def corruption(c: Campaign, ds: Path, run_dir: Path, n: int) -> None:
    step = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    sources = {"dataset": ds, "checkpoint": step}
    copy = c.work / "corrupt"
    # The controls: a check that refused everything would "detect" every fault below, so each check must
    # accept an undamaged copy first.
    for what, src in sources.items():
        r = c.row("corruption", f"undamaged {what}")
        r.trials += 1
        _linked_copy(src, copy)
        refused = {}
        for check, fn in _checks(what, copy).items():
            detected, message, tb = _catch(fn)
            r.tracebacks += tb
            if detected:
                refused[check] = message.replace(str(copy), "DIR")
        r.ok += not refused
        r.detail = f"refused by {refused}"[:300] if refused else "every check accepts it"
    shards = sorted(p.name for p in ds.iterdir() if p.suffix == ".bin")
    targets = [("dataset", "manifest.json"), ("dataset", "shard")] + [
        ("checkpoint", name) for name in ("config.json", "model.safetensors", "training/weights.safetensors",
                                          "training/optimizer.safetensors", "training/state.json", "training/rng.json")
    ]  # fmt: skip
    for what, name in targets:
        meant = "--resume" if name.startswith("training/") else "validate --deep"
        for how in ("flip", "truncate", "delete"):
            r = c.row("corruption", f"{name} {how}")
            found = {"validate --deep": 0, "reader": 0, "--resume": 0}
            named = 0
            for _ in range(n):
                r.trials += 1
                _linked_copy(sources[what], copy)
                victim = copy / (c.rng.choice(shards) if name == "shard" else name)
                _damage(victim, how, c.rng)
                for check, fn in _checks(what, copy).items():
                    detected, message, tb = _catch(fn)
                    found[check] += detected
                    r.tracebacks += tb
                    if check == meant:
                        # Detected means a one-line error that names the damaged file: "something is wrong"
                        # from an unrelated file (or any exception) would pass a fault it never saw.
                        names = victim.name in message
                        named += detected and names
                        r.ok += detected and names and not tb
                        r.silent_acceptances += not detected
                        r.message = r.message or message.replace(str(copy), "DIR")
            parts = [f"{k} {v}/{r.trials}" for k, v in found.items() if v or k == "validate --deep" or
                     (k == "reader") == (what == "dataset")]  # fmt: skip
            r.detail = ", ".join([*parts, f"{meant}'s error names the file {named}/{r.trials}"])
    shutil.rmtree(copy, ignore_errors=True)


def _raise_if(problems: list[str]) -> None:
    from spec_format.errors import SpecError

    if problems:
        raise SpecError(problems[0])


def datagen_reader(path: Path, verifier: Path) -> tuple[list[str], set[int]]:
    """(what datagen's row reader reports, the input lines it keeps): `spec datagen`'s own pass."""
    from spec_datagen.pipeline import tokenized_samples
    from spec_datagen.template import ChatRenderer

    said: list[str] = []
    renderer = ChatRenderer.for_model(verifier)
    samples = tokenized_samples([path], renderer, max_len=256, report=said.append)
    return said, {s.source_index + 1 for s in samples}


def regenerate_reader(path: Path, verifier: Path) -> tuple[list[str], set[int]]:
    from spec_datagen.conversations import RowError, read_conversations

    items = list(read_conversations([path]))
    said = [str(x) for x in items if isinstance(x, RowError)]
    return said, {int(x.source.rsplit(":", 1)[1]) for x in items if not isinstance(x, RowError)}


def eval_reader(path: Path, verifier: Path) -> tuple[list[str], set[int]]:
    import contextlib
    import io

    from spec_train.eval_prompts import load_prompts

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        prompts = load_prompts([str(path)], verifier)
    return err.getvalue().splitlines(), {int(p.source.rsplit(":", 1)[1]) for p in prompts}


READERS = {"datagen": datagen_reader, "regenerate": regenerate_reader, "eval": eval_reader}


def fuzz(c: Campaign, verifier: Path, n: int) -> None:
    for i in range(n):
        path = c.work / f"fuzz-{i}.jsonl"
        good, bad = fuzzed_file(path, c.rng, n_good=6, n_bad=2 * len(BAD_KINDS))
        log(f"fuzz {i + 1}/{n}: {len(good)} good rows, {len(bad)} bad")
        for name, reader in READERS.items():
            r = c.row("fuzz", f"{name}'s row reader")
            r.trials += 1
            got: dict = {}
            detected, message, tb = _catch(lambda: got.update(out=reader(path, verifier)))  # noqa: B023
            r.tracebacks += tb
            if tb or "out" not in got:
                r.detail = f"raised: {message[:200]}"
                continue
            said, kept = got["out"]
            named = named_lines(said, path)
            r.samples_lost += len(good - kept)
            if named == bad and kept == good:
                r.ok += 1
                r.detail = f"{len(bad)} bad rows named by FILE:LINE, {len(good)} good rows kept"
                first = next(m for m in said if str(path) in m)
                r.message = r.message or first.replace(str(c.work), "DIR")[:160]
            else:
                r.detail = f"named {sorted(named ^ bad)} wrongly, good rows lost {sorted(good - kept)}"
    # The real command: --on-error fail stops at the first bad row, before the engine.
    path = c.work / "fuzz-0.jsonl"
    first_bad = min(fuzzed_file(path, random.Random(1), 4, 4)[1])
    before = c.engine_starts()
    out = c.work / "fuzz-out"
    done = run(datagen_cmd(verifier, path, out, "--on-error", "fail"), c.env())
    r = c.row("fuzz", "spec datagen --on-error fail")
    r.trials += 1
    r.tracebacks += "Traceback" in done.stderr
    line = last_line(done.stderr)
    if (
        done.returncode == 1
        and f"{path}:{first_bad}:" in line
        and c.engine_starts() == before
        and not out.exists()
    ):
        r.ok += 1
        r.detail = "stopped at the first bad row, before the engine, nothing written"
    else:
        r.detail = f"rc {done.returncode}: {line[:200]}"
    r.message = line.replace(str(c.work), "DIR")[:160]


def _bad_targets(c: Campaign, demo: Path) -> dict[str, Path]:
    base = {"num_hidden_layers": 2, "hidden_size": 64, "vocab_size": 49152, "num_attention_heads": 2,
            "intermediate_size": 128, "max_position_embeddings": 512}  # fmt: skip
    configs = {
        "GPT-2 (no SupportsEagle3)": {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 2,
                                      "n_embd": 64, "n_head": 2, "vocab_size": 49152, "n_positions": 512},
        "DeepSeek-V2 (MLA)": {**base, "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
                              "kv_lora_rank": 16, "q_lora_rank": None, "qk_rope_head_dim": 16,
                              "qk_nope_head_dim": 16, "v_head_dim": 16},
        "unknown architecture": {**base, "architectures": ["FooBarForCausalLM"], "model_type": "foobar"},
    }  # fmt: skip
    out = {}
    for name, cfg in configs.items():
        d = c.work / "targets" / re.sub(r"\W+", "-", name)
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(cfg))
        for f in demo.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                shutil.copy(f, d / f.name)
        out[name] = d
    return out


def targets(c: Campaign, demo: Path, n: int) -> None:
    sys.path.insert(0, str(ROOT))
    from conftest import write_random_eagle3  # the suite's random-weight draft, spec-format alone

    bad = _bad_targets(c, demo)
    draft = write_random_eagle3(c.work / "targets" / "draft", demo)
    data = c.work / "targets" / "rows.jsonl"
    data.write_text("".join(json.dumps(conversation(c.rng)) + "\n" for _ in range(2)))
    gpt2, mla, unknown = bad
    cases = [("datagen", gpt2), ("eval", unknown), ("serve", gpt2), ("datagen", mla), ("datagen", unknown),
             ("eval", gpt2), ("serve", unknown)]  # fmt: skip
    for command, name in cases[: len(cases) if n >= 3 else n + 1]:
        target = bad[name]
        out = c.work / "targets" / "out"
        cmd = {"datagen": datagen_cmd(target, data, out),
               "eval": [SPEC, "eval", str(draft), "--verifier", str(target), "--data", str(data), "--no-suffix"],
               "serve": [SPEC, "serve", str(draft), "--verifier", str(target), "--port", "8399"]}[command]  # fmt: skip
        log(f"targets: spec {command} with {name}")
        before = c.engine_starts()
        done = run(cmd, c.env(), timeout=300)
        r = c.row("targets", f"spec {command}: {name}")
        r.trials += 1
        r.tracebacks += "Traceback" in done.stderr
        line = last_line(done.stderr)
        arch = json.loads((target / "config.json").read_text())["architectures"][0]
        one_line = line.startswith("error: ") and arch in line
        if done.returncode == 1 and one_line and c.engine_starts() == before and not out.exists():
            r.ok += 1
            r.detail = "refused in one line before any engine; nothing written"
        else:
            r.detail = f"rc {done.returncode}, engine starts {c.engine_starts() - before}: {line[:200]}"
        r.message = line.replace(str(c.work), "DIR")[:220]
        shutil.rmtree(out, ignore_errors=True)


def _tmpfs(path: Path, size: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return (
        run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], dict(os.environ)).returncode
        == 0
    )


def _grow(path: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], check=False)


def full_disk(
    c: Campaign,
    target: Path | None,
    data: Path | None,
    ref_ds: Path | None,
    ds: Path,
    verifier: Path,
    ref_run: Path,
    n: int,
) -> None:
    from spec_format.dataset import Dataset

    if os.geteuid() != 0:
        r = c.row("full_disk", "skipped")
        r.detail = "not root: a tmpfs cannot be mounted here; run the campaign as root for these trials"
        log(r.detail)
        return
    if target is not None and ref_ds is not None:
        size = sum(f.stat().st_size for f in ref_ds.iterdir())
        mnt = c.work / "tmpfs-datagen"
        if _tmpfs(mnt, max(size // 2, 64 << 10)):
            try:
                out = mnt / "ds"
                before = c.engine_starts()
                log("full_disk: datagen into a tmpfs of half the dataset's size, without --force")
                done = run(datagen_cmd(target, data, out), c.env())
                r = c.row("full_disk", "spec datagen: disk check")
                r.trials += 1
                r.tracebacks += "Traceback" in done.stderr
                line = last_line(done.stderr)
                if done.returncode == 1 and "free space" in line and c.engine_starts() == before:
                    r.ok += 1
                    r.detail = "refused before the engine"
                else:
                    r.detail = f"rc {done.returncode}: {line[:200]}"
                r.message = line.replace(str(c.work), "DIR")[:200]
                log("full_disk: datagen --force into it, then --resume once it is grown")
                done = run(datagen_cmd(target, data, out, "--force"), c.env())
                r = c.row("full_disk", "spec datagen --force: ENOSPC, then --resume")
                r.trials += 1
                r.tracebacks += "Traceback" in done.stderr
                line = last_line(done.stderr)
                r.message = line.replace(str(c.work), "DIR")[:200]
                committed = len(Dataset(out)) if (out / "manifest.json").is_file() else -1
                _grow(mnt, 4 * size + (1 << 20))
                again = run([*datagen_cmd(target, data, out), "--resume"], c.env())
                lost, dup, diff = (
                    compare_datasets(out, ref_ds) if again.returncode == 0 else (0, 0, "resume failed")
                )
                r.samples_lost += lost
                r.samples_duplicated += dup
                if (
                    done.returncode == 1
                    and "No space left" in line
                    and committed >= 0
                    and diff in (None, "states within one bf16 step")
                ):
                    r.ok += 1
                    r.detail = f"stopped in one line with {committed} samples committed; resumed equal"
                else:
                    r.detail = (
                        f"rc {done.returncode}/{again.returncode}: {diff}; {last_line(again.stderr)[:160]}"
                    )
            finally:
                _umount(mnt)
    ckpt = sorted((ref_run / "checkpoints").glob("step-*"))[-1]
    per_ckpt = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    want = final_state(ref_run)
    for i in range(max(n - (2 if target is not None else 0), 1)):
        mnt = c.work / f"tmpfs-train-{i}"
        room = int(per_ckpt * c.rng.uniform(1.2, 2.6)) + (256 << 10)
        if not _tmpfs(mnt, room):
            continue
        try:
            out = mnt / "run"
            log(f"full_disk: train into a tmpfs of {room >> 10} KiB")
            done = run(train_cmd(ds, verifier, out), c.env())
            r = c.row("full_disk", "spec train: ENOSPC, then --resume")
            r.trials += 1
            r.tracebacks += "Traceback" in done.stderr
            line = last_line(done.stderr)
            r.message = r.message or line.replace(str(c.work), "DIR")[:200]
            _grow(mnt, 20 * per_ckpt + (4 << 20))
            again = run([*train_cmd(ds, verifier, out), "--resume"], c.env())
            lost, dup = steps_lost_duplicated(out, 6)
            r.samples_lost += lost
            r.samples_duplicated += dup
            equal = again.returncode == 0 and same_state(final_state(out), want)
            if done.returncode == 1 and line.startswith("error: ") and "No space left" in line and equal:
                r.ok += 1
                r.detail = "stopped in one line; resumed bit for bit equal"
            else:
                r.detail = f"rc {done.returncode}/{again.returncode}, equal {equal}: {line[:160]}"
        finally:
            _umount(mnt)


# ---------------------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    head = ("kind", "case", "trials", "ok", "lost", "dup", "silent", "tb", "detail")
    body = [(r.kind, r.case, str(r.trials), str(r.ok), str(r.samples_lost), str(r.samples_duplicated),
             str(r.silent_acceptances), str(r.tracebacks), r.detail) for r in rows]  # fmt: skip
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head) - 1)]
    fmt = lambda x: "| " + " | ".join([*(v.ljust(w) for v, w in zip(x, widths)), x[-1]]) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in [*widths, 8]) + "|", *map(fmt, body)])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=3, help="Trials of each kind (at least).")
    p.add_argument("--json", type=Path, help="Write the totals and every row here.")
    p.add_argument("--only", default=",".join(KINDS), help=f"Comma-separated kinds of {KINDS}.")
    p.add_argument("--target", type=Path, help="Target model directory (default: the demo model).")
    p.add_argument("--dataset", type=Path, help="Use this dataset instead of a datagen reference run.")
    p.add_argument("--verifier", type=Path, help="The dataset's target (with --dataset).")
    p.add_argument("--work", type=Path, help="Scratch directory (default: a temporary one, removed).")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    kinds = [k for k in a.only.split(",") if k]
    if unknown := set(kinds) - set(KINDS):
        p.error(f"--only: unknown kinds {sorted(unknown)}")
    from spec_datagen.demo_model import demo_model_dir

    work = a.work or Path(tempfile.mkdtemp(prefix="spec-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    c = Campaign(work, a.seed)
    t0 = time.time()
    n = max(a.trials, 1)
    try:
        target = a.target or demo_model_dir()
        data = ref_ds = None
        if a.dataset is None:
            data, ref_ds = reference_datagen(c, target)
            ds, verifier = ref_ds, target
        else:
            ds, verifier = a.dataset, a.verifier or target
        if "crash_datagen" in kinds and ref_ds is not None:
            crash_datagen(c, target, data, ref_ds, n)
        if "crash_online" in kinds and ref_ds is not None:
            crash_online(
                c,
                target,
                data,
                reference_run(c, "train --online", lambda o: online_cmd(target, data, o), "ref-online"),
                n,
            )
        ref_run = None
        if {"crash_train", "corruption", "full_disk"} & set(kinds):
            ref_run = reference_run(c, "train", lambda o: train_cmd(ds, verifier, o), "ref-run")
        if "crash_train" in kinds:
            crash_train(c, ds, verifier, ref_run, n)
        if "corruption" in kinds:
            log("corruption")
            corruption(c, ds, ref_run, n)
        if "full_disk" in kinds:
            full_disk(c, target if ref_ds is not None else None, data, ref_ds, ds, verifier, ref_run, n)
        if "fuzz" in kinds:
            fuzz(c, verifier, n)
        if "targets" in kinds:
            targets(c, target if a.dataset is None else demo_model_dir(), n)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    totals = {k: sum(getattr(r, k) for r in c.rows)
              for k in ("samples_lost", "samples_duplicated", "silent_acceptances", "tracebacks")}  # fmt: skip
    trials = {k: sum(r.trials for r in c.rows if r.kind == k) for k in KINDS}
    failed = sum(r.trials - r.ok for r in c.rows)
    result = {**totals, "trials": trials, "failed_trials": failed, "seconds": round(time.time() - t0),
              "command": " ".join(["python", "tools/fault_campaign.py", *sys.argv[1:]]),
              "rows": [msgspec.to_builtins(r) for r in c.rows]}  # fmt: skip
    print(table(c.rows))
    print(f"totals: {json.dumps(totals)}; trials: {json.dumps(trials)}; failed trials: {failed}; "
          f"{result['seconds']} s")  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if failed == 0 and not any(totals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
