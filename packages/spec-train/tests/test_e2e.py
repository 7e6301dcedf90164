"""The real thing: SmolLM2-135M-Instruct answers prompts (greedy, in vLLM: on-policy data), its hidden
states are captured, `spec train` trains an EAGLE-3 draft on them, and `spec eval` measures it in vLLM next
to the target alone: greedy outputs identical, acceptance length above 1 from vLLM's own counters, and
`spec eval --offline` (no vLLM) within 5% of it (n-gram speculation in vLLM: test_quickstart.py). The same
for a P-EAGLE draft fine-tuned from that EAGLE-3 draft, and for a DFlash draft trained from scratch on the
same dataset.

Engine starts: the plain target (shared with other tests under the key "plain"), then spec eval's two
(baseline, draft) in its subprocess, two more (baseline, P-EAGLE draft) in another, and two more (baseline,
DFlash draft) in a third.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import msgspec
import numpy as np
import pytest

# Prompts written for this test (not the evaluation prompts of spec_train/resources/chat_eval.jsonl).
TOPICS = ["the water cycle", "honey bees", "volcanoes", "the moon", "bread", "rainbows", "bicycles",
          "the ocean", "owls", "libraries", "trains", "snow"]  # fmt: skip
TRAIN_PROMPTS = [f"Explain {t} in simple terms." for t in TOPICS]
TRAIN_PROMPTS += [f"Give me three facts about {t}." for t in TOPICS]
HELD_OUT = ["Explain thunderstorms in simple terms.", "Give me three facts about cats.",
            "Explain how a fridge keeps food cold.", "Give me three facts about the desert."]  # fmt: skip


class Trained(msgspec.Struct):
    run: str
    dataset: str


@pytest.fixture(scope="module")
def trained(demo_model, vllm_engine, capture_dataset, run_train, tmp_path_factory) -> Trained:
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    tok = AutoTokenizer.from_pretrained(demo_model)
    chats = [[{"role": "user", "content": p}] for p in TRAIN_PROMPTS]
    outs = vllm_engine("plain", demo_model).chat(
        chats, SamplingParams(temperature=0, max_tokens=160), use_tqdm=False
    )
    rows = []
    for chat, o in zip(chats, outs):
        prompt = list(
            tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
        )
        reply = list(o.outputs[0].token_ids)
        rows.append((np.array(prompt + reply), np.arange(len(prompt) + len(reply)) >= len(prompt)))
    tmp = tmp_path_factory.mktemp("e2e")
    ds = capture_dataset(demo_model, rows, tmp / "ds", dtype="bf16")
    run = tmp / "run"
    run_train([str(ds), "--verifier", str(demo_model), "--out", str(run), "--max-steps", "48", "--save-every", "16",
               "--batch-tokens", "1024", "--val-fraction", "0.15", "--draft-vocab-size", "4096",
               "--save-dtype", "float32", "--no-progress"], timeout=1500)  # fmt: skip
    return Trained(str(run), str(ds))


@pytest.mark.e2e
def test_training_lowers_loss_and_raises_acceptance(trained, demo_model):
    lines = [json.loads(x) for x in Path(trained.run, "metrics.jsonl").read_text().splitlines()]
    val = [x for x in lines if x["split"] == "val"]
    # The draft starts as the target's layer 27 (--layer-init verifier), so the first evaluation (step 16)
    # is already far below a random start's loss; from there the loss falls at every evaluation.
    losses, lengths = [x["loss"] for x in val], [x["acceptance_length"] for x in val]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], losses
    assert lengths[-1] > max(1.2, lengths[0] + 0.05), lengths


@pytest.mark.e2e
def test_spec_eval_measures_the_draft_in_vllm(trained, spec_cli, tmp_path, series):
    prompts = tmp_path / "held_out.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HELD_OUT))
    common = [trained.run + "/final", "--data", str(prompts), "--max-tokens", "64", "--json"]
    proc = subprocess.run([spec_cli, "eval", *common, "--concurrency", "1,4", "--no-ngram", "--rounds", "1",
                           "--report", str(tmp_path / "r")], capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # --json: stdout is exactly one JSON object
    draft, baseline = report["draft"], report["baseline"]
    assert report["outputs_identical"] is True, "speculative decoding changed the greedy output"
    per, counters = draft["acceptance_per_position"], draft["counters"]
    assert len(per) == 3 and all(a >= b for a, b in zip(per, per[1:])), per  # position i needs i-1
    assert counters["draft_tokens"] == 3 * counters["drafts"] > 0
    assert draft["mean_acceptance_length"] == pytest.approx(1 + sum(per)) and sum(per) > 0.1, draft
    # Every run generated its prompts' tokens under --max-tokens, at each --concurrency level.
    for entry in (baseline, draft):
        assert [r["concurrency"] for r in entry["runs"]] == [1, 4]
        assert all(0 < r["output_tokens"] <= 64 * len(HELD_OUT) for r in entry["runs"]), entry["runs"]
    assert set(draft["speedup"]) == {"1", "4"} and report["ngram"] is None
    assert json.loads((tmp_path / "r" / "eval.json").read_text())["draft"] == draft
    assert series(tmp_path / "r" / "acceptance.png") == [0]  # the draft's bars

    # Without vLLM: the target in transformers and the draft from spec-models on the same prompts.
    proc = subprocess.run(
        [spec_cli, "eval", *common, "--offline"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline = json.loads(proc.stdout)["draft"]["mean_acceptance_length"]
    online = draft["mean_acceptance_length"]
    print(f"acceptance length: vLLM {online:.3f} {draft['acceptance_per_position']}, offline {offline:.3f}")
    assert abs(offline - online) <= 0.05 * online, (offline, online)


@pytest.mark.e2e
def test_peagle_fine_tuned_from_the_eagle3_draft_in_vllm(trained, demo_model, run_train, spec_cli, tmp_path):
    """P-EAGLE end to end: the EAGLE-3 draft above fine-tuned into a P-EAGLE draft (spec train --algorithm
    peagle --init-from), served by vLLM with parallel drafting (method from the checkpoint): greedy output
    identical, tokens accepted, and spec eval --offline within 5% of vLLM's counters."""
    run = tmp_path / "peagle"
    run_train([trained.dataset, "--verifier", str(demo_model), "--out", str(run), "--algorithm", "peagle",
               "--init-from", trained.run + "/final", "--max-steps", "24", "--save-every", "24",
               "--batch-tokens", "1024", "--val-fraction", "0.15", "--no-progress"], timeout=1500)  # fmt: skip
    prompts = tmp_path / "held_out.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HELD_OUT))
    common = [str(run / "final"), "--data", str(prompts), "--max-tokens", "64", "--json"]
    proc = subprocess.run([spec_cli, "eval", *common, "--concurrency", "1", "--no-ngram", "--rounds", "1"],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    draft = json.loads(proc.stdout)["draft"]
    assert json.loads(proc.stdout)["outputs_identical"] is True
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
        f"P-EAGLE acceptance length: vLLM {online:.3f} {draft['acceptance_per_position']}, offline {offline:.3f}"
    )
    assert abs(offline - online) <= 0.05 * online, (offline, online)


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
    prompts = tmp_path / "held_out.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HELD_OUT))
    common = [str(run / "final"), "--data", str(prompts), "--max-tokens", "64", "--json"]
    proc = subprocess.run([spec_cli, "eval", *common, "--concurrency", "1", "--no-ngram", "--rounds", "1"],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    draft = report["draft"]
    assert report["outputs_identical"] is True
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
        f"DFlash acceptance length: vLLM {online:.3f} {draft['acceptance_per_position']}, offline {offline:.3f}"
    )
    assert abs(offline - online) <= 0.05 * online, (offline, online)
