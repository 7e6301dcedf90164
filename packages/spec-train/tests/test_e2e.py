"""The real thing: SmolLM2-135M-Instruct answers prompts (greedy, in vLLM: on-policy data), its hidden
states are captured, and `spec train` trains an EAGLE-3 draft on them (its loss falls, its simulated
acceptance rises). A P-EAGLE draft fine-tuned from it and a DFlash draft trained from scratch on the same
dataset are each measured by `spec eval` in vLLM next to the target alone: greedy outputs identical,
acceptance length above 1 from vLLM's own counters, and `spec eval --offline` (no vLLM) within 5% of it.

Engine starts: the plain target (shared with other tests under the key "plain"); for P-EAGLE, spec eval's
k sweep (baseline, k = 2, k = 3) inside spec eval's process; for DFlash, spec eval's two (baseline, draft)
in their own processes, as for a user. The EAGLE-3 draft is measured the same way in test_quickstart.py
(the quick start's own draft).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from spec_format.checkpoint import read_config
from spec_train.evaluate import acceptance_figure, speed_figure

# Prompts written for this test (not those the shared `trained` draft of conftest.py was trained on).
HELD_OUT = ["Explain thunderstorms in simple terms.", "Give me three facts about cats.",
            "Explain how a fridge keeps food cold.", "Give me three facts about the desert."]  # fmt: skip


@pytest.mark.e2e
def test_training_lowers_loss_and_raises_acceptance(trained, demo_model):
    lines = [json.loads(x) for x in Path(trained.run, "metrics.jsonl").read_text().splitlines()]
    val = [x for x in lines if x["split"] == "val"]
    # The draft starts as the target's layer 27 (--layer-init verifier), so the first evaluation (step 16)
    # is already far below a random start's loss; from there the loss falls at every evaluation.
    losses, lengths = [x["loss"] for x in val], [x["acceptance_length"] for x in val]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], losses
    assert lengths[-1] > max(1.2, lengths[0] + 0.05), lengths


def in_vllm_and_offline(spec_cli, draft_dir, tmp_path, name):
    """`spec eval DRAFT` in vLLM (its own processes, as a user runs it) and `spec eval --offline` on the
    held-out prompts: greedy output unchanged, k tokens per draft, some accepted, the two estimates within
    5% of each other. Returns vLLM's draft entry."""
    prompts = tmp_path / "held_out.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HELD_OUT))
    common = [str(draft_dir), "--data", str(prompts), "--max-tokens", "64", "--json"]
    proc = subprocess.run([spec_cli, "eval", *common, "--no-ngram", "--rounds", "1"],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # --json: stdout is exactly one JSON object
    draft = report["draft"]
    assert report["outputs_identical"] is True, "speculative decoding changed the greedy output"
    assert draft["counters"]["draft_tokens"] == 3 * draft["counters"]["drafts"] > 0
    assert draft["mean_acceptance_length"] > 1.0, draft
    proc = subprocess.run(
        [spec_cli, "eval", *common, "--offline"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline, online = (
        json.loads(proc.stdout)["draft"]["mean_acceptance_length"],
        draft["mean_acceptance_length"],
    )
    print(
        f"{name} acceptance length: vLLM {online:.3f} {draft['acceptance_per_position']}, offline {offline:.3f}"
    )
    assert abs(offline - online) <= 0.05 * online, (offline, online)
    return draft


@pytest.mark.e2e
def test_peagle_fine_tuned_from_the_eagle3_draft_and_swept_over_k(
    trained, demo_model, run_train, spec_cli, tmp_path
):
    """P-EAGLE end to end: the EAGLE-3 draft above fine-tuned into a P-EAGLE draft (spec train --algorithm
    peagle --init-from), then `spec eval --k 2,3 --write-k`: vLLM serves it with parallel drafting (method
    from the checkpoint) at each k with greedy output identical, tokens accepted, timed in interleaved
    rounds at two concurrencies; the best k goes into config.json; the report's charts hold what it
    measured; `spec eval --offline` at k = 3 is within 5% of vLLM's counters at k = 3. Its engines run in
    spec eval's own process (in-process engines: 8 s a start, not 35-50 s; test_quickstart.py runs spec
    eval's engines in their own processes, as a user's do)."""
    run = tmp_path / "peagle"
    run_train([trained.dataset, "--verifier", str(demo_model), "--out", str(run), "--algorithm", "peagle",
               "--init-from", trained.run + "/final", "--max-steps", "24", "--save-every", "24",
               "--batch-tokens", "1024", "--val-fraction", "0.15", "--no-progress"], timeout=1500)  # fmt: skip
    d, report_dir = run / "final", tmp_path / "report"
    prompts = tmp_path / "held_out.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HELD_OUT))
    env = {k: v for k, v in os.environ.items() if k != "SPEC_SET_VLLM_MULTIPROCESSING"}
    env |= {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": str(len(os.sched_getaffinity(0)))}
    proc = subprocess.run(
        [spec_cli, "eval", str(d), "--data", str(prompts), "--k", "3,2", "--rounds", "2", "--max-tokens", "64",
         "--concurrency", "1,2", "--max-engines", "2", "--no-ngram", "--no-suffix", "--write-k", "--report",
         str(report_dir), "--json"], capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # --json: stdout is exactly one JSON object
    assert report["rounds"] == 2 and report["outputs_identical"] is True and report["mismatches"] == []
    per_k = {p["k"]: p for p in report["per_k"]}
    assert list(per_k) == [2, 3]
    for k, p in per_k.items():
        assert len(p["acceptance_per_position"]) == k and p["acceptance_length_stderr"] >= 0
        assert set(p["per_concurrency"]) == {"1", "2"}
        assert all(s["tokens_per_second"] > 0 and s["tokens_per_second_spread"] >= 0
                   for s in p["per_concurrency"].values())  # fmt: skip
    assert per_k[3]["mean_acceptance_length"] > 1.0, per_k[3]
    # best_k: the highest median single-stream speed-up, and that k is what went into config.json
    speed = {k: p["per_concurrency"]["1"]["speedup"] for k, p in per_k.items()}
    assert report["best_k"] == max(speed, key=lambda k: (speed[k], -k))
    assert report["written_k"]["old"] == 3 and report["written_k"]["new"] == report["best_k"]
    assert read_config(d)[0].speculative_tokens == report["best_k"]
    # today's layout at the chosen k: numbers where numbers were, spreads beside them
    draft, baseline = report["draft"], report["baseline"]
    assert report["k"] == draft["k"] == report["best_k"] and draft["speedup"]["1"] == speed[report["best_k"]]
    assert draft["counters"]["draft_tokens"] == draft["k"] * draft["counters"]["drafts"] > 0
    # the baseline ran in every round of each of the 2 groups (k=2, k=3; n-gram is off: test_quickstart.py)
    assert [len(r["tokens_per_second_rounds"]) for r in baseline["runs"]] == [4, 4]
    assert [len(r["tokens_per_second_rounds"]) for r in draft["runs"]] == [2, 2] and report["ngram"] is None

    # the pictures show the measured figures
    assert json.loads((report_dir / "eval.json").read_text()) == report
    assert (report_dir / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = speed_figure(report, "t")
    for c in ("1", "2"):
        assert _line(fig, f"draft, concurrency {c}") == (
            [2, 3],
            [per_k[k]["per_concurrency"][c]["tokens_per_second"] for k in (2, 3)],
        )
        base = next(r for r in baseline["runs"] if str(r["concurrency"]) == c)["tokens_per_second"]
        assert _line(fig, f"target alone, concurrency {c}")[1] == [base, base]
    fig = acceptance_figure({f"draft, k={k}": p["acceptance_per_position"] for k, p in per_k.items()}, "t")
    assert _line(fig, "draft, k=2") == ([1, 2], per_k[2]["acceptance_per_position"])

    # without vLLM, at k = 3
    proc = subprocess.run([spec_cli, "eval", str(d), "--data", str(prompts), "--max-tokens", "64", "--k", "3",
                           "--offline", "--json"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline, online = (
        json.loads(proc.stdout)["draft"]["mean_acceptance_length"],
        per_k[3]["mean_acceptance_length"],
    )
    print(f"P-EAGLE acceptance length at k=3: vLLM {online:.3f}, offline {offline:.3f}")
    assert abs(offline - online) <= 0.05 * online, (offline, online)


def _line(fig, label):
    (line,) = [x for x in fig.axes[0].get_lines() if x.get_label() == label]
    return list(line.get_xdata()), list(line.get_ydata())


@pytest.mark.e2e
def test_dflash_trained_on_the_eagle3_dataset_in_vllm(trained, demo_model, run_train, spec_cli, tmp_path):
    """DFlash end to end: spec train --algorithm dflash on the dataset captured with EAGLE-3's layers (it
    reads 2, 15, 27), served by vLLM (method dflash from the checkpoint): greedy output identical, tokens
    accepted on held-out prompts, and spec eval --offline within 5% of vLLM's counters."""
    run = tmp_path / "dflash"
    proc = run_train([trained.dataset, "--verifier", str(demo_model), "--out", str(run), "--algorithm", "dflash",
                      "--max-steps", "40", "--save-every", "40", "--batch-tokens", "1024", "--val-fraction", "0.15",
                      "--draft-vocab-size", "4096", "--lr", "3e-3", "--no-progress"],
                     timeout=1500)  # fmt: skip
    assert "DFlash reads the dataset's layers [2, 15, 27] (capture ids), blocks of 4" in proc.stderr
    in_vllm_and_offline(spec_cli, run / "final", tmp_path, "DFlash")
