"""tools/gpu_check.py --smoke: every section of the GPU check runs at tiny sizes on this CPU, in a real
subprocess, and writes numeric figures (the GPU run itself is in docs/gpu.md)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.e2e  # trains in a subprocess, and speculators' trainer too
def test_gpu_check_smoke_writes_every_section(tmp_path):
    out = tmp_path / "x.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["meta"]["smoke"] and _number(r["meta"]["peak_flops"]) and _number(r["meta"]["seconds"])
    for name in ("train_ours", "draft_decode", "hidden_capture", "train_speculators"):
        assert "error" not in r[name], r[name].get("traceback", r[name])
    runs = r["train_ours"]["runs"]
    assert {(x["seq"], x["lm_head_trained"]) for x in runs} == {(96, True), (192, True), (192, False)}
    for x in runs:
        for key in ("tokens_per_s", "mfu", "peak_memory_gib", "step_s", "model_tflops_per_step"):
            assert _number(x[key]) and x[key] > 0, (key, x)
    # The FLOP count: the frozen lm_head does 2/3 of the trained one's lm_head work, the rest is equal.
    trained, frozen = (
        next(x for x in runs if x["seq"] == 192 and x["lm_head_trained"] == t) for t in (True, False)
    )
    assert math.isclose(frozen["flops_parts"]["lm_head"] * 3, trained["flops_parts"]["lm_head"] * 2)
    assert frozen["flops_parts"]["draft_layer"] == trained["flops_parts"]["draft_layer"]
    decode = r["draft_decode"]
    assert "graph capture skipped" in decode["note"]
    assert [x["batch"] for x in decode["runs"]] == [1, 4] and all(
        _number(x["eager_step_us"]) for x in decode["runs"]
    )
    capture = r["hidden_capture"]["runs"]
    assert len(capture) == 2 and all(_number(x["tokens_per_s"]) and x["tokens_per_s"] > 0 for x in capture)
    theirs = r["train_speculators"]
    if "skipped" in theirs:  # speculators is not a dependency of the workspace
        assert theirs["skipped"].startswith("not installed") and "comparison" not in r
    else:
        assert _number(theirs["tokens_per_s"]) and _number(
            r["comparison"]["same_config"]["tokens_per_s_ratio"]
        )
