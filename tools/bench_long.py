"""Long rows: `spec train`'s step (Objective + AdamW, as train.py runs it) against the row length, for each
algorithm, with today's dense-mask attention beside the blockwise one, side by side in one run.

    uv run --no-sync python tools/bench_long.py [--lengths 512,2048,4096,8192] [--out docs/long.png]

Each (algorithm, attention, length) runs in its own process (peak RSS is per process) on one synthetic row:
one document of that many tokens (tools/synthetic_states.py: heavy-tailed states with SmolLM2-135M's
outlier channels), the real SmolLM2-135M-Instruct as verifier (its lm_head gives the loss targets), a
1-layer draft, draft vocabulary 4096, k = 3, compute precision as `spec train` picks it (bf16 on AMX CPUs).
One warm-up step, then `--steps` timed steps. DFlash trains 64 sampled blocks per row whatever its length
(its attention is linear in the row), so it runs once, with its only attention.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

DRAFT_VOCAB, STEPS_K = 4096, 3


def run_one(algorithm: str, attn: str, T: int, steps: int) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from synthetic_states import synthetic_hidden

    from spec_datagen.demo_model import demo_model_dir
    from spec_format.algorithms import default_layers
    from spec_format.fingerprint import read_model_config
    from spec_format.vocab import build_vocab_mapping
    from spec_models import init_dflash_from_verifier, init_eagle3_from_verifier, init_peagle_from_verifier
    from spec_train.data import supervised_slots
    from spec_train.loss import Objective
    from spec_train.targets import VerifierHead
    from spec_train.train import auto_dtype

    torch.manual_seed(0)
    verifier = demo_model_dir()
    vcfg = read_model_config(verifier)
    L, H, V = vcfg["num_hidden_layers"], vcfg["hidden_size"], vcfg["vocab_size"]
    rng = np.random.default_rng(0)
    mapping = build_vocab_mapping(rng.integers(1, 100, V), DRAFT_VOCAB)
    if algorithm == "dflash":
        aux_ids = [i for i in default_layers("dflash", L) if i != L]
        draft = init_dflash_from_verifier(
            verifier, aux_ids, vocab_mapping=mapping, speculative_tokens=STEPS_K
        )
    else:
        aux_ids = [i for i in default_layers("eagle3", L) if i != L]
        init = init_peagle_from_verifier if algorithm == "peagle" else init_eagle3_from_verifier
        kw = {"mask_token_id": 0} if algorithm == "peagle" else {}
        draft = init(verifier, aux_layer_ids=aux_ids, vocab_mapping=mapping, **kw)
    head = VerifierHead(verifier, mapping.target_ids)
    obj = Objective(draft, head, STEPS_K, "kl", 1024, attn)
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-4)
    dtype = auto_dtype(torch.device("cpu"))
    head.to(dtype=dtype)
    h = torch.from_numpy(synthetic_hidden(rng, T, len(aux_ids) + 1, H))
    batch = {
        "input_ids": torch.from_numpy(((rng.zipf(1.2, T) - 1) % V).astype(np.int64)),
        "loss_mask": torch.arange(T) >= T // 8,  # a prompt, then the reply
        "position_ids": torch.arange(T),
        "aux": h[:, :-1].reshape(T, -1),
        "last": h[:, -1].contiguous(),
    }
    counts = supervised_slots(batch["loss_mask"], batch["position_ids"], STEPS_K).sum(-1)
    scale = torch.full((STEPS_K,), 1.0 / STEPS_K) / counts.clamp(min=1)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss, _ = obj(batch, scale, dtype)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"algorithm": algorithm, "attn": attn, "tokens": T, "seconds": sum(times) / len(times),
            "tokens_per_s": T * len(times) / sum(times), "peak_rss_mib": peak, "loss": loss.item(),
            "dtype": str(dtype), "threads": torch.get_num_threads()}  # fmt: skip


CONFIGS = [("eagle3", "sdpa"), ("eagle3", "blockwise"), ("peagle", "sdpa"), ("peagle", "blockwise"),
           ("dflash", "sdpa")]  # fmt: skip


def bench(lengths: list[int], steps: int, timeout: int, algorithms: list[str]) -> list[dict]:
    results = []
    for algorithm, attn in [c for c in CONFIGS if c[0] in algorithms]:
        for T in lengths:
            cmd = [sys.executable, __file__, "run", algorithm, attn, str(T), "--steps", str(steps)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
            except subprocess.TimeoutExpired:
                print(f"{algorithm} {attn} {T}: over {timeout} s, skipped", flush=True)
                continue
            if proc.returncode:
                raise SystemExit(f"{algorithm} {attn} {T} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"{algorithm:<7} {attn:<9} {T:>6} {r['tokens_per_s']:>9.0f} tok/s {r['peak_rss_mib']:>7.0f} MiB",
                  flush=True)  # fmt: skip
    return results


def table(results: list[dict]) -> str:
    """Markdown: tokens/s and peak RSS per row length, and each length's tokens/s over 512's."""
    base = {(r["algorithm"], r["attn"]): r["tokens_per_s"] for r in results if r["tokens"] == min(
        x["tokens"] for x in results)}  # fmt: skip
    lines = ["| algorithm | attention | row tokens | tokens/s | vs shortest row | peak RSS MiB |",
             "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in results:
        b = base.get((r["algorithm"], r["attn"]))
        rel = f"{r['tokens_per_s'] / b:.2f}x" if b else "—"
        attn = "dense mask" if r["attn"] == "sdpa" else r["attn"]
        lines.append(f"| {r['algorithm']} | {attn} | {r['tokens']} | {r['tokens_per_s']:.0f} | {rel} | "
                     f"{r['peak_rss_mib']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for algorithm, attn in CONFIGS:
        rs = [r for r in results if (r["algorithm"], r["attn"]) == (algorithm, attn)]
        if not rs:
            continue
        label = f"{algorithm}, {'dense mask' if attn == 'sdpa' else attn}"
        style = "--" if attn == "sdpa" and algorithm != "dflash" else "-"
        x = [r["tokens"] for r in rs]
        a.plot(x, [r["tokens_per_s"] for r in rs], style, marker="o", label=label)
        b.plot(x, [r["peak_rss_mib"] for r in rs], style, marker="o", label=label)
    for ax, what in ((a, "training tokens/s"), (b, "peak RSS (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("row length (tokens, one document)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    fig.suptitle("spec train step vs row length (synthetic states, SmolLM2-135M verifier, 2 CPU cores)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    r = sub.add_parser("run")
    r.add_argument("algorithm")
    r.add_argument("attn")
    r.add_argument("tokens", type=int)
    r.add_argument("--steps", type=int, default=1)
    ap.add_argument("--lengths", default="512,2048,4096,8192")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=600, help="Seconds per configuration.")
    ap.add_argument("--algorithms", default="eagle3,peagle,dflash")
    ap.add_argument("--json", type=Path, help="Write the results here.")
    ap.add_argument("--png", type=Path, help="Write the chart here.")
    a = ap.parse_args()
    if a.cmd == "run":
        print(json.dumps(run_one(a.algorithm, a.attn, a.tokens, a.steps)))
        return
    results = bench([int(x) for x in a.lengths.split(",")], a.steps, a.timeout, a.algorithms.split(","))
    print(table(results))
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    if a.png:
        plot(results, a.png)


if __name__ == "__main__":
    main()
