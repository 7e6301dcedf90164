"""The real thing: SmolLM2-135M-Instruct answers prompts (greedy, in vLLM: on-policy data), its hidden
states are captured, `spec train` trains an EAGLE-3 draft on them, and vLLM serves the draft next to the
target: greedy outputs identical to the target's alone, measured acceptance length above 1.

Two engine starts: the plain target (shared with other tests under the key "plain") and the target with
the trained draft.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from spec_format.dataset import Dataset
from spec_train.data import split_samples
from spec_train.offline import estimate_acceptance

# Prompts written for this test (not the evaluation prompts of spec_train/data/chat_eval.jsonl).
TOPICS = ["the water cycle", "honey bees", "volcanoes", "the moon", "bread", "rainbows", "bicycles",
          "the ocean", "owls", "libraries", "trains", "snow"]  # fmt: skip
TRAIN_PROMPTS = [f"Explain {t} in simple terms." for t in TOPICS] + [
    f"Give me three facts about {t}." for t in TOPICS
]
HELD_OUT = ["Explain thunderstorms in simple terms.", "Give me three facts about cats.",
            "Explain how a fridge keeps food cold.", "Give me three facts about the desert."]  # fmt: skip


def _chat(p):
    return [{"role": "user", "content": p}]


@pytest.mark.e2e
def test_train_on_smollm2_then_serve_in_vllm(demo_model, vllm_engine, capture_dataset, run_train, tmp_path):
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from spec_datagen.runtime import spec_decode_counters

    tok = AutoTokenizer.from_pretrained(demo_model)
    llm = vllm_engine("plain", demo_model)
    outs = llm.chat(
        [_chat(p) for p in TRAIN_PROMPTS], SamplingParams(temperature=0, max_tokens=160), use_tqdm=False
    )
    rows = []
    for p, o in zip(TRAIN_PROMPTS, outs):
        prompt = list(
            tok.apply_chat_template(_chat(p), add_generation_prompt=True, return_dict=True)["input_ids"]
        )
        reply = list(o.outputs[0].token_ids)
        rows.append((np.array(prompt + reply), np.arange(len(prompt) + len(reply)) >= len(prompt)))
    eval_params = SamplingParams(temperature=0, max_tokens=64)
    baseline = [
        list(o.outputs[0].token_ids)
        for o in llm.chat([_chat(p) for p in HELD_OUT], eval_params, use_tqdm=False)
    ]
    ds = capture_dataset(demo_model, rows, tmp_path / "ds", dtype="bf16")

    run = tmp_path / "run"
    run_train([str(ds), "--verifier", str(demo_model), "--out", str(run), "--max-steps", "48", "--save-every", "16",
               "--batch-tokens", "1024", "--val-fraction", "0.15", "--draft-vocab-size", "4096",
               "--save-dtype", "float32", "--no-progress"], timeout=1500)  # fmt: skip
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [x for x in lines if x["split"] == "val"]
    assert val[-1]["loss"] < 0.8 * val[0]["loss"], [x["loss"] for x in val]
    assert val[-1]["acceptance_length"] > 1.2, [x["acceptance_length"] for x in val]

    # The offline estimate by KV-cache drafting (what `spec eval --offline` calls) on the validation samples
    # agrees with the TTT estimate the trainer logged for the same weights.
    split = split_samples(len(Dataset(ds)), 0.15, 256, 0)
    est = estimate_acceptance(run / "final", ds, k=3, verifier=demo_model, samples=split.val.tolist())
    assert est.n == val[-1]["chains"]
    np.testing.assert_allclose(est.per_position, val[-1]["acceptance"], atol=0.02)

    spec = vllm_engine("trained-eagle3", demo_model, disable_log_stats=False,
                       speculative_config={"method": "eagle3", "model": str(run / "final"), "num_speculative_tokens": 3})  # fmt: skip
    before = spec_decode_counters(spec)
    outs = spec.chat([_chat(p) for p in HELD_OUT], eval_params, use_tqdm=False)
    measured = spec_decode_counters(spec) - before
    assert [list(o.outputs[0].token_ids) for o in outs] == baseline, "speculative decoding changed the output"
    assert measured.drafts > 0 and measured.mean_acceptance_length > 1.0, measured
    print(f"served acceptance length {measured.mean_acceptance_length:.3f}, per position "
          f"{[round(a, 3) for a in measured.acceptance_per_position]}; offline estimate {est.mean_acceptance_length:.3f}")  # fmt: skip
