"""Benchmark: hidden-state capture cost against vLLM's plain prefill and a transformers forward.

Same prompts (chat conversations rendered with the target's template), one run, side by side:
  (a) vLLM prefill without capture: generate(max_tokens=1) over the token ids, prefix caching off;
  (b) our capture to disk: `spec_datagen.pipeline.write_dataset` (vLLM extract_hidden_states + the
      dataset writer, bf16 shards), timed from the first request to the last committed shard;
  (c) transformers forward with output_hidden_states=True, one sample at a time (no padding), the same
      layers copied out to numpy (not written to disk).
Engine start-up and a warm-up on the first 4 samples are excluded from (a), (b) and (c). Prints tokens/s and the ratios b/a and b/c.

    uv run --no-sync python tools/bench_capture.py [--samples 48] [--max-len 1024] [--model DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

WARMUP = 4  # samples run once before each timing (first-shape kernel setup is not throughput)


def conversations(n: int, seed: int = 0) -> list[dict]:
    """n multi-turn chats of 150-1000 tokens from a fixed word list (deterministic)."""
    rng = np.random.default_rng(seed)
    words = [
        "the",
        "model",
        "reads",
        "a",
        "long",
        "document",
        "about",
        "rivers",
        "mountains",
        "cities",
        "and",
        "trains",
        "then",
        "answers",
        "questions",
        "with",
        "short",
        "clear",
        "sentences",
        "while",
        "citing",
        "numbers",
        "like",
        "12",
        "340",
        "and",
        "7",
        "from",
        "its",
        "tables",
    ]
    rows = []
    for i in range(n):
        turns = []
        for _ in range(1 + i % 3):
            turns.append({"role": "user", "content": " ".join(rng.choice(words, rng.integers(20, 120)))})
            turns.append({"role": "assistant", "content": " ".join(rng.choice(words, rng.integers(30, 200)))})
        rows.append({"messages": turns})
    return rows


def bench_vllm_prefill(model: Path, token_ids: list[np.ndarray], max_len: int) -> float:
    from vllm import SamplingParams

    from spec_datagen.runtime import make_llm, shutdown_llm

    llm = make_llm(model, max_model_len=max_len + 1, enable_prefix_caching=False)
    try:
        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        prompts = [{"prompt_token_ids": ids.tolist()} for ids in token_ids]
        llm.generate(prompts[:WARMUP], params, use_tqdm=False)
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t0
    finally:
        shutdown_llm(llm)


def bench_capture(model: Path, rows: list[dict], max_len: int) -> tuple[float, int]:
    from spec_datagen.pipeline import Capturer, write_dataset

    with Capturer(model, max_len=max_len) as cap, tempfile.TemporaryDirectory() as out:
        for _ in cap.samples(rows[:WARMUP], report=None):
            pass
        summary = write_dataset(cap, rows, Path(out) / "ds", progress=False, report=None)
        return summary.seconds, summary.bytes_written


def bench_transformers(model: Path, token_ids: list[np.ndarray], layer_ids: list[int]) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    n = hf.config.num_hidden_layers
    # hidden_states[k] for k < L; id L (before the final norm) is not returned by transformers: like the
    # peers that use this path, take hidden_states[L] (after the norm) in its place.
    picks = [min(k, n) for k in layer_ids]
    t0 = 0.0
    with torch.no_grad():
        for i, ids in enumerate([*token_ids[:WARMUP], *token_ids]):
            if i == WARMUP:
                t0 = time.perf_counter()
            out = hf(torch.from_numpy(ids.astype(np.int64))[None], output_hidden_states=True)
            np.stack([out.hidden_states[k][0].numpy() for k in picks], axis=1)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="Target directory (default: the SmolLM2 demo model).")
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--max-len", type=int, default=1024)
    args = ap.parse_args()

    from spec_datagen.demo_model import demo_model_dir
    from spec_datagen.pipeline import tokenized_samples
    from spec_datagen.template import ChatRenderer
    from spec_format.fingerprint import default_eagle3_layers, read_model_config

    model = Path(args.model) if args.model else demo_model_dir()
    rows = conversations(args.samples)
    renderer = ChatRenderer.for_model(model)
    token_ids = [s.token_ids for s in tokenized_samples(rows, renderer, max_len=args.max_len, report=None)]
    tokens = sum(len(t) for t in token_ids)
    layers = default_eagle3_layers(read_model_config(model)["num_hidden_layers"])
    print(f"model {model}\n{len(token_ids)} samples, {tokens} tokens (lengths {min(map(len, token_ids))}-"
          f"{max(map(len, token_ids))}), layers {layers}", flush=True)  # fmt: skip

    a = bench_vllm_prefill(model, token_ids, args.max_len)
    print(f"(a) vLLM prefill, no capture : {tokens / a:8.1f} tokens/s ({a:.1f} s)", flush=True)
    b, written = bench_capture(model, rows, args.max_len)
    print(
        f"(b) capture to disk (bf16)   : {tokens / b:8.1f} tokens/s ({b:.1f} s, {written / 2**20:.1f} MiB)",
        flush=True,
    )
    c = bench_transformers(model, token_ids, layers)
    print(f"(c) transformers forward     : {tokens / c:8.1f} tokens/s ({c:.1f} s)", flush=True)
    print(f"b/a = {a / b:.3f}   (goal >= 0.9; at most 1.0)\nb/c = {c / b:.3f}")


if __name__ == "__main__":
    main()
