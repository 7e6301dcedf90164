"""A small fault campaign in the suite (tools/fault_campaign.py, docs/reliability.md): on a tiny captured
dataset, a training run killed and resumed, a full disk while training (when root), a flipped byte, a cut
and a deletion of every dataset and checkpoint file, fuzzed conversation files through datagen's,
regenerate's and eval's row readers, and targets vLLM cannot pair through `spec datagen`, `eval`, `serve`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.e2e  # `spec train` and `spec datagen|eval|serve` in subprocesses


def test_a_small_fault_campaign_loses_nothing_and_accepts_no_damage(tiny_dataset, tiny_model, tmp_path):
    ds, verifier = tiny_dataset("llama", n=24), tiny_model("llama")
    out = tmp_path / "campaign.json"
    cmd = [sys.executable, str(ROOT / "tools" / "fault_campaign.py"), "--trials", "1", "--seed", "1",
           "--only", "crash_train,corruption,full_disk,fuzz,targets", "--dataset", str(ds),
           "--verifier", str(verifier), "--work", str(tmp_path / "work"), "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    for total in ("samples_lost", "samples_duplicated", "silent_acceptances", "tracebacks"):
        assert result[total] == 0, (total, done.stdout)
    assert result["failed_trials"] == 0
    trials = result["trials"]
    assert trials["crash_train"] >= 1 and trials["fuzz"] >= 3 and trials["targets"] >= 2
    assert trials["corruption"] == 2 + 24  # 2 undamaged copies; 8 files x (flip, truncate, delete)
    rows = {r["case"]: r for r in result["rows"] if r["kind"] == "corruption"}
    # The controls pass, and a detection counts only as an error naming the damaged file (failed_trials == 0
    # above): a check that refused everything, or blamed another file, fails here.
    assert rows["undamaged dataset"]["ok"] == rows["undamaged checkpoint"]["ok"] == 1
    assert rows["shard flip"]["message"].startswith("DIR/shard-"), rows["shard flip"]
    cases = {r["case"] for r in result["rows"]}
    assert "mid-checkpoint-write" in cases  # --seed 1 picks it
