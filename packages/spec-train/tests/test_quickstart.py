"""`spec quickstart`, the README's main job, run as a user runs it (the `spec` command in a subprocess) with a
tiny plan, for every algorithm: every stage on the real SmolLM2 target (synth with replies, capture, train,
eval on the built-in chat and humaneval sets in vLLM), then the report. Run again, it reuses every stage
without an engine.

EAGLE-3 runs the whole pipeline. P-EAGLE and DFlash train on its dataset (the plan's hidden `dataset`:
each costs only its training and eval); P-EAGLE sweeps k = 2, 3 and writes the fastest into the draft;
DFlash is given the default sweep 2, 3, 4 and measured at the one k it serves (issue 29). Every draft is
served by vLLM with greedy output identical to the target's, and `spec eval --offline` agrees with vLLM's
counters within 5%.

Engine starts: synth's, the capture engine, spec eval's three for EAGLE-3 (baseline, draft, n-gram), each in
its command's own process as for a user; in-process for P-EAGLE's three (baseline, k = 2, 3) and DFlash's two
(baseline, k = 3), 8 s a start, not 35-50 s: the EAGLE-3 run covers engines in their own processes and times
n-gram speculation, which the others' plans skip.
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
from spec_train.evaluate import acceptance_series

# A quick start (the fixtures below, timed with the first test that uses each) takes minutes on a quiet
# machine and may take more than the suite's 900 s on a busy one.
pytestmark = pytest.mark.timeout(1800)

# EAGLE-3's run: ~6 minutes on two cores, half of it the five engine starts.
TINY = {
    "prompts": 24,
    "reply_tokens": 64,
    "train_steps": 60,
    "eval_prompts": 2,
    "eval_tokens": 48,
    "serve_k": "3",
}
# The k each algorithm's plan asks for, and the k spec eval must measure.
SERVE_K = {"eagle3": ("3", [3]), "peagle": ("2,3", [2, 3]), "dflash": ("2,3,4", [3])}


def _quickstart(spec_cli, tmp: Path, plan: dict, algorithm: str, env: dict | None = None):
    (tmp / "plan.json").write_text(json.dumps(plan))
    out = tmp / "qs"
    argv = [
        spec_cli,
        "quickstart",
        "--out",
        str(out),
        "--plan",
        str(tmp / "plan.json"),
        "--algorithm",
        algorithm,
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, argv, proc


@pytest.fixture(scope="module")
def quickstart(spec_cli, tmp_path_factory):
    """The EAGLE-3 quick start, every stage."""
    return _quickstart(spec_cli, tmp_path_factory.mktemp("quickstart"), TINY, "eagle3")


@pytest.fixture(scope="module", params=list(SERVE_K))
def each(request, quickstart, spec_cli, in_process_env, tmp_path_factory):
    """(algorithm, out, proc): the EAGLE-3 run, or another algorithm trained on its dataset."""
    algorithm = request.param
    if algorithm == "eagle3":
        return algorithm, quickstart[0], quickstart[2]
    # n-gram's timing is the EAGLE-3 run's to check; here it would only repeat it
    plan = TINY | {
        "serve_k": SERVE_K[algorithm][0],
        "dataset": str(quickstart[0] / "dataset"),
        "ngram": False,
    }
    out, _, proc = _quickstart(spec_cli, tmp_path_factory.mktemp(algorithm), plan, algorithm, in_process_env)
    return algorithm, out, proc


@pytest.mark.e2e
def test_quickstart_runs_every_stage_and_reports(quickstart, demo_model):
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

    # eval in vLLM: n-gram speculation ran beside the draft at the same k, on the plan's prompts and budget
    report = json.loads((out / "eval" / "eval.json").read_text())
    assert report["num_prompts"] == 2 * TINY["eval_prompts"]  # chat and humaneval
    ngram = report["ngram"]
    # the draft's model card carries this eval's figures (test_model_card.py checks every one)
    card = (out / "draft" / "README.md").read_text()
    assert f"**{report['draft']['mean_acceptance_length']:.3f}**" in card and "| Optimiser steps |" in card
    assert ngram["counters"]["draft_tokens"] == 3 * ngram["counters"]["drafts"] > 0
    for entry in (report["baseline"], report["draft"], ngram):
        (run,) = entry["runs"]
        assert 0 < run["output_tokens"] <= report["num_prompts"] * TINY["eval_tokens"], run
    # eval/acceptance.png's lines (test_plots.py reads a figure's lines back): the draft's rates, and n-gram's
    # labelled with the share of steps it drafted on
    lines = acceptance_series(report)
    assert lines["draft, k=3"] == report["draft"]["acceptance_per_position"]
    (label,) = [x for x in lines if x.startswith("n-gram")]
    assert label.startswith(f"n-gram, k=3 (drafted on {ngram['drafted_share']:.0%} of steps"), label
    assert (out / "eval" / "acceptance.png").is_file()

    # the report printed for the user carries those figures
    draft = report["draft"]
    assert f"Mean acceptance length (k=3): {draft['mean_acceptance_length']:.2f}" in proc.stdout
    assert f"spec serve {out / 'draft'}" in proc.stdout
    assert "Serving k: 3, the fastest of k = 3" in proc.stdout
    assert "Outputs identical with and without the draft (greedy): True" in proc.stdout


@pytest.mark.e2e
def test_each_algorithm_trains_and_is_served_losslessly(each, demo_model, spec_cli):
    """Per algorithm: the loss fell and simulated acceptance rose in training; the draft is valid and of
    that algorithm; vLLM served it at exactly the k it can serve (the method from the checkpoint), greedy
    output unchanged, tokens accepted; the fastest k went into config.json; `spec eval --offline` (the
    target in transformers, no vLLM) within 5% of vLLM's counters at that k."""
    algorithm, out, proc = each
    # train: every step logged, the loss fell, acceptance on training rows rose between the first and
    # last evaluation (the draft starts as the target's layer 27, so it is already above 1 at the first)
    lines = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["split"] == "train"]
    assert [x["step"] for x in train] == list(range(1, TINY["train_steps"] + 1))
    assert sum(x["loss"] for x in train[-5:]) < 0.9 * sum(x["loss"] for x in train[:5]), train
    lengths = [x["acceptance_length"] for x in lines if x["split"] == "train_eval"]
    assert len(lengths) >= 2 and lengths[-1] > lengths[0], lengths
    if algorithm == "dflash":  # trained on EAGLE-3's dataset, it reads the aux layers it holds
        assert "DFlash reads the dataset's layers [2, 15, 27] (capture ids), blocks of 4" in proc.stderr

    # the draft: valid for its verifier, this algorithm, the plan's draft vocabulary
    assert not validate_checkpoint(out / "draft", demo_model).errors
    cfg, _ = read_config(out / "draft")
    assert cfg.algorithm == algorithm and cfg.draft_vocab_size == 4096

    # eval in vLLM at each k the draft serves
    report = json.loads((out / "eval" / "eval.json").read_text())
    assert report["outputs_identical"] is True and report["mismatches"] == []
    per_k = {p["k"]: p for p in report["per_k"]}
    assert list(per_k) == SERVE_K[algorithm][1]
    assert all(len(p["acceptance_per_position"]) == k for k, p in per_k.items()), per_k
    draft = report["draft"]
    c = draft["counters"]  # vLLM's own: the engine drafted k tokens a step, some accepted
    assert c["draft_tokens"] == draft["k"] * c["drafts"] > 0, c
    assert draft["mean_acceptance_length"] > 1.0, draft  # a broken draft: exactly 1
    # the fastest single-stream k went into config.json, and the printed report says so
    speed = {k: p["per_concurrency"]["1"]["speedup"] for k, p in per_k.items()}
    best = max(speed, key=lambda k: (speed[k], -k))
    assert report["best_k"] == report["k"] == draft["k"] == best
    assert report["written_k"]["new"] == best and cfg.speculative_tokens == best
    assert f"Serving k: {best}, the fastest of k = {', '.join(map(str, per_k))}" in proc.stdout
    if algorithm != "eagle3":  # the plan skipped n-gram: not timed, not reported
        assert (
            not report.get("ngram")
            and "n-gram" not in proc.stdout.split("Mean acceptance length")[1].split("\n")[0]
        )

    offline_run = subprocess.run(
        [spec_cli, "eval", str(out / "draft"), "--data", "chat", "--data", "humaneval", "--num-prompts",
         str(TINY["eval_prompts"]), "--max-tokens", str(TINY["eval_tokens"]), "--offline", "--json"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert offline_run.returncode == 0, offline_run.stderr[-3000:]
    offline = json.loads(offline_run.stdout)
    assert offline["k"] == best and offline["num_prompts"] == report["num_prompts"]
    online, estimate = draft["mean_acceptance_length"], offline["draft"]["mean_acceptance_length"]
    print(f"{algorithm} acceptance length at k={best}: vLLM {online:.3f}, offline {estimate:.3f}")
    assert abs(estimate - online) <= 0.05 * online, (estimate, online)


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
