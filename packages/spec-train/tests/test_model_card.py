"""The draft's README.md (spec_format.model_card): every figure in it is the one in the JSON it was read
from (config.json's provenance and spec eval's report), parsed back from the card's tables."""

import json
import re
import subprocess

import msgspec
import pytest
import yaml

from spec_format.checkpoint import read_checkpoint, write_checkpoint
from spec_format.model_card import card_text, write_card
from spec_train.evaluate import ConfigResult, EvalReport, PerK, RunResult

PROVENANCE = {
    "made_by": "spec train", "run": "/runs/r1", "step": 640, "dataset": "/data/ds", "dataset_samples": 1234,
    "tokens": 456789, "elapsed_s": 1234.5, "hardware": "Test CPU (2 cores, AMX)", "draft_vocab_coverage": 0.973214,
    "data_sources": [{"source": "hf:ultrachat_200k", "dataset_id": "HuggingFaceH4/ultrachat_200k",
                      "config": "default", "split": "train_sft", "revision": "abc123"}],
    "held_out": ["chat", "humaneval"], "held_out_dropped": 7,
}  # fmt: skip


def eval_report(draft_dir) -> dict:
    """spec eval's JSON for a draft at k = 3 against the target alone and n-gram (figures arbitrary)."""

    def runs(tps):
        return [
            RunResult(concurrency=c, output_tokens=960, seconds=960 / t, tokens_per_second=t) for c, t in tps
        ]

    draft = ConfigResult(
        name="draft k=3", k=3, runs=runs([(1, 31.25), (8, 120.5)]), mean_acceptance_length=2.1234,
        acceptance_length_stderr=0.0567, acceptance_per_position=[0.7312, 0.4021, 0.1904],
        speedup={"1": 1.4567, "8": 1.1234},
    )  # fmt: skip
    ngram = ConfigResult(name="ngram", k=3, runs=runs([(1, 22.0), (8, 99.9)]), mean_acceptance_length=1.25,
                         acceptance_per_position=[0.2, 0.04, 0.01], speedup={"1": 1.0345, "8": 0.9001})  # fmt: skip
    report = EvalReport(
        draft=draft, baseline=ConfigResult(name="baseline", runs=runs([(1, 21.45), (8, 107.3)])), ngram=ngram,
        outputs_identical=True, num_prompts=16, k=3, max_tokens=96, temperature=0.0, verifier="v",
        draft_dir=str(draft_dir), rounds=3, per_k=[PerK(3, 2.1234, 0.0567, [0.7312, 0.4021, 0.1904], {})],
    )  # fmt: skip
    return {**msgspec.to_builtins(report), "prompts": ["chat", "humaneval"], "hardware": "Eval GPU x 1"}


def tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table of the card: rows of cells (separator rows left out)."""
    out, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= {"-"} for c in cells):
                current.append(cells)
        elif current:
            out.append(current)
            current = []
    return out


@pytest.fixture
def draft(tmp_path, tiny_model, random_eagle3):
    d = random_eagle3(tmp_path / "draft", tiny_model("llama"), draft_vocab=512, k=3)
    cfg, tensors = read_checkpoint(d)
    cfg = msgspec.structs.replace(cfg, spec=msgspec.structs.replace(cfg.spec, provenance=PROVENANCE))
    write_checkpoint(d, cfg, tensors)
    return d


def test_card_figures_are_the_json_figures(draft, tiny_model):
    report = eval_report(draft)
    text = (write_card(draft, report)).read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == str(tiny_model("llama")) and front["library_name"] == "vllm"
    assert front["pipeline_tag"] == "text-generation" and "eagle3" in front["tags"]
    what, training, positions, speeds = tables(text)
    what = dict(what)
    assert what["Draft tokens per step (k)"] == "3"
    assert (
        what["Draft vocabulary"]
        == "512 of the target's 49152 tokens, covering 97.32% of the supervised training tokens"
    )
    assert what["Target layers read (vLLM capture ids)"] == "2, 4, 5"
    training = dict(training)
    assert training["Samples"] == "1234" and training["Tokens trained on"] == "456789"
    assert training["Optimiser steps"] == "640" and training["Wall time"] == "20.6 min"
    assert training["Hardware"] == PROVENANCE["hardware"]
    assert (
        "HuggingFaceH4/ultrachat_200k, config default, split train_sft, revision abc123" in training["Data"]
    )
    assert training["Evaluation prompts kept out"] == "chat, humaneval: 7 rows dropped as near-duplicates"
    # Acceptance per position and every speed row, back to numbers, equal the report's at their precision.
    assert [float(a) for a in positions[1][1:]] == [
        round(a, 3) for a in report["draft"]["acceptance_per_position"]
    ]
    parsed = {(r[0], int(r[1])): (float(r[2]), float(r[3].rstrip("x"))) for r in speeds[1:]}
    for name, label in (("baseline", "target alone"), ("draft", "draft, k = 3"), ("ngram", "n-gram, k = 3")):
        for run in report[name]["runs"]:
            c = run["concurrency"]
            speedup = 1.0 if name == "baseline" else report[name]["speedup"][str(c)]
            assert parsed[label, c] == (round(run["tokens_per_second"], 1), round(speedup, 2))
    mean = re.search(r"k = 3: \*\*([\d.]+)\*\* ± ([\d.]+)", text)
    assert (float(mean[1]), float(mean[2])) == (2.123, 0.057)
    assert "16 prompts from chat, humaneval, 96 tokens each, temperature 0.0, on Eval GPU x 1" in text
    # The serving command is vLLM's speculative config for this draft, as JSON.
    spec = json.loads(re.search(r"--speculative-config '(.+)'", text)[1])
    assert spec == {"method": "eagle3", "model": str(draft.resolve()), "num_speculative_tokens": 3}


def test_a_draft_with_its_card_validates(draft, spec_cli):
    assert "Not measured yet" in card_text(draft)
    write_card(draft)
    done = subprocess.run([spec_cli, "validate", str(draft)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
