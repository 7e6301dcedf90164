"""The real thing: SmolLM2-135M-Instruct answers prompts (greedy, in vLLM: on-policy data), its hidden
states are captured, and `spec train` trains an EAGLE-3 draft on them (its loss falls, its simulated
acceptance rises). A P-EAGLE draft fine-tuned from it and a DFlash draft trained from scratch on the same
dataset are each measured by `spec eval` in vLLM next to the target alone: greedy outputs identical,
acceptance length above 1 from vLLM's own counters, and `spec eval --offline` (no vLLM) within 5% of it.

Engine starts: the plain target (shared with other tests under the key "plain"), then spec eval's two
(baseline, P-EAGLE draft) in its subprocess, and two more (baseline, DFlash draft) in another. The
EAGLE-3 draft is measured the same way in test_quickstart.py (the quick start's own draft).
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
def test_peagle_fine_tuned_from_the_eagle3_draft_in_vllm(trained, demo_model, run_train, spec_cli, tmp_path):
    """P-EAGLE end to end: the EAGLE-3 draft above fine-tuned into a P-EAGLE draft (spec train --algorithm
    peagle --init-from), served by vLLM with parallel drafting (method from the checkpoint): greedy output
    identical, tokens accepted, and spec eval --offline within 5% of vLLM's counters."""
    run = tmp_path / "peagle"
    run_train([trained.dataset, "--verifier", str(demo_model), "--out", str(run), "--algorithm", "peagle",
               "--init-from", trained.run + "/final", "--max-steps", "24", "--save-every", "24",
               "--batch-tokens", "1024", "--val-fraction", "0.15", "--no-progress"], timeout=1500)  # fmt: skip
    in_vllm_and_offline(spec_cli, run / "final", tmp_path, "P-EAGLE")


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
