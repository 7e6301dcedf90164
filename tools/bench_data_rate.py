"""Benchmark: how fast each data stage makes training tokens, against vLLM's own generation and prefill.

One run, the machine to itself, the real target, side by side:
  (a) vLLM plain generation: --prompts chat prompts, --tokens tokens each (ignore_eos), greedy;
  (b) vLLM plain prefill of the same number of tokens (max_tokens=1 over prompt + (a)'s outputs);
  (c) `spec synth --respond` of --prompts prompts (Magpie prompts and the target's replies, the quick
      start's openers and reply length): tokens per second of the rows it writes;
  (d) `spec datagen` over (c)'s rows (hidden-state capture to disk): tokens per second of the dataset;
and (a), (b) again in bf16 (--dtypes), to see whether the engine's precision pays on this CPU.
(a) and (b) exclude engine start-up and a warm-up batch; (c) and (d) are whole commands, start-up
included (what a user waits for), and print their own rates too.

    .venv/bin/python tools/bench_data_rate.py [--prompts 64] [--tokens 128] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path


def engine_rates(model: Path, prompts: list[list[int]], tokens: int, dtype: str) -> dict:
    """(a) and (b) on one engine of this dtype: generated and prefilled tokens per second."""
    from vllm import SamplingParams

    from spec_datagen.runtime import make_llm, shutdown_llm

    llm = make_llm(model, max_model_len=1024, dtype=dtype, enable_prefix_caching=False)
    try:
        gen = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        llm.generate([{"prompt_token_ids": p} for p in prompts[:8]], gen, use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], gen, use_tqdm=False)
        gen_s = time.perf_counter() - start
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        full = [p + list(o.outputs[0].token_ids) for p, o in zip(prompts, outs)]
        one = SamplingParams(temperature=0.0, max_tokens=1)
        llm.generate([{"prompt_token_ids": s} for s in full[:8]], one, use_tqdm=False)
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": s} for s in full], one, use_tqdm=False)
        prefill_s = time.perf_counter() - start
        prefilled = sum(len(s) for s in full)
    finally:
        shutdown_llm(llm)
    return {"generate_tok_s": generated / gen_s, "prefill_tok_s": prefilled / prefill_s,
            "generated": generated, "prefilled": prefilled}  # fmt: skip


def command_seconds(argv: list[str]) -> float:
    """(c) or (d): the wall seconds of a whole `spec` command."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "spec_format", *argv], check=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--no-stages", action="store_true", help="Only (a) and (b).")
    args = p.parse_args()

    from spec_datagen.demo_model import demo_model_dir
    from spec_format.dataset import Dataset
    from spec_train.eval_prompts import load_prompts

    model = demo_model_dir()
    # chat prompts as the generation's context: the built-in held-out set, repeated to --prompts
    chat = [q.ids for q in load_prompts(["chat"], model)]
    prompts = [chat[i % len(chat)] for i in range(args.prompts)]
    results: dict = {}
    for dtype in args.dtypes.split(","):
        results[dtype] = engine_rates(model, prompts, args.tokens, dtype)
        print(f"[bench] {dtype}: {json.dumps(results[dtype])}", file=sys.stderr, flush=True)
    if not args.no_stages:
        with tempfile.TemporaryDirectory() as tmp:
            rows = Path(tmp) / "rows.jsonl"
            openers = str(files("spec_train") / "resources" / "quickstart_openers.txt")
            synth_s = command_seconds(["synth", str(model), "--n", str(args.prompts), "--openers", openers,
                                       "--respond", "--reply-max-tokens", "192", "--max-model-len", "1024",
                                       "--out", str(rows), "--no-progress"])  # fmt: skip
            ds = Path(tmp) / "ds"
            capture_s = command_seconds(["datagen", str(model), "--data", str(rows), "--out", str(ds),
                                         "--max-len", "1024", "--no-progress"])  # fmt: skip
            tokens = int(Dataset(ds).manifest.num_tokens)  # the rows' tokens, as training reads them
        for stage, seconds in (("synth", synth_s), ("capture", capture_s)):
            results[stage] = {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds}
    base = results[args.dtypes.split(",")[0]]
    print(
        "| measured | tokens/s | / plain generation (first dtype) | / plain prefill (first dtype) |\n|---|---:|---:|---:|"
    )
    for dtype in args.dtypes.split(","):
        r = results[dtype]
        print(
            f"| vLLM generation, {dtype} | {r['generate_tok_s']:.0f} | {r['generate_tok_s'] / base['generate_tok_s']:.2f} | |"
        )
        print(
            f"| vLLM prefill, {dtype} | {r['prefill_tok_s']:.0f} | | {r['prefill_tok_s'] / base['prefill_tok_s']:.2f} |"
        )
    for stage in ("synth", "capture"):
        if stage in results:
            r = results[stage]
            print(f"| spec {'synth --respond' if stage == 'synth' else 'datagen'} ({r['tokens']} tokens, "
                  f"{r['seconds']:.0f} s with start-up) | {r['tok_s']:.0f} | {r['tok_s'] / base['generate_tok_s']:.2f} "
                  f"| {r['tok_s'] / base['prefill_tok_s']:.2f} |")  # fmt: skip
    print(json.dumps(results))


if __name__ == "__main__":
    main()
