"""`spec quickstart`, the README's main job, run as a user runs it (the `spec` command in a subprocess) with a
tiny plan: every stage on the real SmolLM2 target (synth with replies, capture, train, eval on the built-in
chat and humaneval sets in vLLM), then the report. Run again, it reuses every stage without an engine.

Engine starts: synth's, the capture engine, spec eval's three (baseline, draft, n-gram), each in its
command's own process, as for a user.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from spec_format.checkpoint import read_config
from spec_format.dataset import Dataset
from spec_format.fingerprint import default_eagle3_layers
from spec_format.validate import validate_checkpoint

# ~6 minutes on two cores, half of it the five engine starts.
# (One k: the k sweep and --write-k are tested on a trained draft in test_e2e.py.)
TINY = {
    "prompts": 24,
    "reply_tokens": 64,
    "train_steps": 60,
    "eval_prompts": 2,
    "eval_tokens": 48,
    "serve_k": "3",
}


@pytest.fixture(scope="module")
def quickstart(spec_cli, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quickstart")
    plan = tmp / "plan.json"
    plan.write_text(json.dumps(TINY))
    out = tmp / "qs"
    argv = [spec_cli, "quickstart", "--out", str(out), "--plan", str(plan)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, argv, proc


@pytest.mark.e2e
def test_quickstart_runs_every_stage_and_reports(quickstart, demo_model, series):
    out, _, proc = quickstart
    # data (spec synth --respond, into a directory it makes): distinct prompts the target wrote, each with
    # its reply, and synth's report on them
    rows = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == TINY["prompts"]
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows), rows[0]
    assert len({r["messages"][0]["content"].casefold() for r in rows}) == len(rows)
    assert (
        f"prompts: {len(rows)} kept of" in proc.stdout
        and "distinct n-grams (distinct/total): 1-gram" in proc.stdout
    )
    assert (
        "words per prompt: mean" in proc.stdout and f"assistant turns generated: {len(rows)}" in proc.stdout
    )
    # capture: one sample per row, EAGLE-3's aux layers and the last, supervised reply tokens in each
    ds = Dataset(out / "dataset")
    assert len(ds) == len(rows) and ds.manifest.layer_ids == default_eagle3_layers(30)
    assert all(0 < ds[i].loss_mask.sum() < len(ds[i].token_ids) for i in range(len(ds)))  # reply, not prompt
    # train: every step logged, the loss fell
    lines = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["split"] == "train"]
    assert [x["step"] for x in train] == list(range(1, TINY["train_steps"] + 1))
    assert sum(x["loss"] for x in train[-5:]) < 0.9 * sum(x["loss"] for x in train[:5]), train
    # the draft: valid for its verifier, k = 3, the plan's draft vocabulary
    assert not validate_checkpoint(out / "draft", demo_model).errors
    cfg, _ = read_config(out / "draft")
    assert cfg.speculative_tokens == 3 and cfg.draft_vocab_size == 4096

    # eval in vLLM: greedy output unchanged by speculation, tokens accepted, counters that add up
    report = json.loads((out / "eval" / "eval.json").read_text())
    assert report["num_prompts"] == 2 * TINY["eval_prompts"]  # chat and humaneval
    assert report["outputs_identical"] is True
    draft, ngram = report["draft"], report["ngram"]
    per = draft["acceptance_per_position"]
    assert len(per) == 3 and all(a >= b for a, b in zip(per, per[1:])), per  # position i needs i-1
    assert draft["mean_acceptance_length"] == pytest.approx(1 + sum(per))
    assert 1.1 < draft["mean_acceptance_length"] <= 4.0, draft
    # the draft's model card carries this eval's figures (test_model_card.py checks every one)
    card = (out / "draft" / "README.md").read_text()
    assert f"**{draft['mean_acceptance_length']:.3f}**" in card and "| Optimiser steps |" in card
    npos = ngram["acceptance_per_position"]  # n-gram speculation ran beside the draft, same k
    assert len(npos) == 3 and all(a >= b for a, b in zip(npos, npos[1:])), npos
    for entry in (report["baseline"], draft, ngram):  # the plan's prompts and token budget reached vLLM
        (run,) = entry["runs"]
        assert 0 < run["output_tokens"] <= report["num_prompts"] * TINY["eval_tokens"], run
    assert series(out / "eval" / "acceptance.png")[:1] == [0]  # the draft's bars

    # the report printed for the user carries those figures
    assert f"Mean acceptance length (k=3): {draft['mean_acceptance_length']:.2f}" in proc.stdout
    assert f"spec serve {out / 'draft'}" in proc.stdout
    assert (
        report["k"] == 3
        and report["written_k"]["new"] == 3
        and "Serving k: 3, the fastest of k = 3" in proc.stdout
    )
    assert "Outputs identical with and without the draft (greedy): True" in proc.stdout


@pytest.mark.e2e
def test_offline_estimate_matches_vllm_on_the_quickstart_prompts(quickstart, spec_cli):
    """`spec eval --offline` (the target in transformers, no vLLM) replays the same prompts' verification
    rounds: its acceptance length is within 5% of vLLM's counters in the quick start's eval."""
    out, _, _ = quickstart
    report = json.loads((out / "eval" / "eval.json").read_text())
    proc = subprocess.run(
        [spec_cli, "eval", str(out / "draft"), "--data", "chat", "--data", "humaneval", "--num-prompts",
         str(TINY["eval_prompts"]), "--max-tokens", str(TINY["eval_tokens"]), "--offline", "--json"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline = json.loads(proc.stdout)["draft"]
    online = report["draft"]["mean_acceptance_length"]
    print(f"acceptance length: vLLM {online:.3f}, offline {offline['mean_acceptance_length']:.3f}")
    assert abs(offline["mean_acceptance_length"] - online) <= 0.05 * online, (offline, online)
    assert 0 < offline["acceptance_length_stderr"] < 0.5, offline  # over 4 prompts of different lengths


@pytest.mark.e2e
def test_quickstart_again_reuses_every_stage(quickstart):
    out, argv, first = quickstart
    log = Path(os.environ["SPEC_ENGINE_LOG"])
    before = len(log.read_text().splitlines())
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("data", "capture", "train", "eval"):
        assert f"{stage}: done before, reusing" in proc.stderr
    assert len(log.read_text().splitlines()) == before, "no engine started"
    marker = "Mean acceptance length (k="  # the report's figures (vLLM's own log lines say "length: ")
    assert proc.stdout[proc.stdout.index(marker) :] == first.stdout[first.stdout.index(marker) :]
