"""Training benchmark on data captured from the real SmolLM2-135M-Instruct: tokens/s and peak memory of
`spec train`'s step against a plain, unchunked reference loop, side by side in one run, with the ratios.

    uv run --no-sync python tools/bench_train.py bench DATASET [--steps 20]
    uv run --no-sync python tools/bench_train.py precision DATASET --batch-tokens 512 --draft-vocab 4096

DATASET: any spec-format dataset captured from SmolLM2-135M-Instruct, e.g. the quick start's
(`spec quickstart --out qs` leaves it in qs/dataset: the target's own replies to synthesised prompts,
captured by `spec datagen`).

bench: each trainer runs in its own process (peak RSS is per process) on the same rows, draft
configuration (1 layer, draft vocabulary 32768, k = 3) and precision:
  - ours: spec_train's objective (TTT forward, fused chunked loss) + AdamW, as train.py runs it;
  - reference: the same draft and TTT forward, then the textbook loss: full [S, T, V] draft logits and
    full verifier logits, log_softmax, KL, autograd.
precision: our step in fp32 against our step in bf16 autocast as `spec train` runs it on a CPU with AMX
(rows padded to a multiple of 128 tokens, attention in fp32); tokens/s count real tokens, not padding.
vllm-project/speculators' trainer is not run here: its Trainer assumes CUDA (device "cuda" when no
accelerator, model.to(local_rank), batches .to(local_rank)), so it cannot run on this CPU without
changing what it computes; tools/gpu_check.py runs it side by side with ours on a GPU.
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

# ---------------------------------------------------------------------------------------------
# One trainer in this process (the `run` subcommand), reporting JSON on stdout.


def run_one(data: Path, which: str, steps: int, batch_tokens: int, draft_vocab: int) -> dict:
    import numpy as np
    import torch

    from spec_datagen.demo_model import demo_model_dir
    from spec_format.dataset import Dataset
    from spec_format.vocab import build_vocab_mapping
    from spec_models import forward_ttt, init_eagle3_from_verifier, ttt_input_ids
    from spec_train.data import RowLoader, Stream, layer_indices, row_pad_multiple, supervised_slots
    from spec_train.loss import Objective
    from spec_train.targets import VerifierHead

    torch.manual_seed(0)
    verifier = demo_model_dir()
    ds = Dataset(data)
    aux_idx, last_idx = layer_indices(ds, None, verifier)
    mapping = build_vocab_mapping(ds.token_frequencies(), draft_vocab)
    aux_ids = [ds.manifest.layer_ids[i] for i in aux_idx]
    draft = init_eagle3_from_verifier(verifier, aux_layer_ids=aux_ids, vocab_mapping=mapping)
    head = VerifierHead(verifier, mapping.target_ids)
    obj = Objective(draft, head, 3, "kl", 1024, "sdpa")
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-3)
    dtype = torch.bfloat16 if which == "ours-bf16" else torch.float32
    head.to(dtype=dtype)
    stream = Stream(np.arange(len(ds)), ds.lengths, batch_tokens, 0)
    loader = RowLoader(data, aux_idx, last_idx, pad_multiple=row_pad_multiple(torch.device("cpu"), dtype))
    weights = torch.tensor([0.8**j for j in range(3)])
    weights /= weights.sum()

    def reference_loss(batch):
        ids, pos = batch["input_ids"][None], batch["position_ids"][None]
        normed = forward_ttt(draft, ttt_input_ids(ids, 3), batch["aux"][None], pos)[:, 0]  # [S, T, H]
        valid = supervised_slots(batch["loss_mask"], batch["position_ids"], 3)
        logq = torch.log_softmax(draft.lm_head(normed), -1)  # [S, T, V] held whole
        logp = torch.log_softmax(head.draft_logits(head.normed(batch["last"])), -1)  # [T, V]
        total = 0.0
        for j in range(3):
            t = valid[j].nonzero().squeeze(1)
            p = logp[t + 1 + j]
            total = total + weights[j] * (p.exp() * (p - logq[j, t])).sum() / max(len(t), 1)
        return total

    rows = [loader.load(stream.row(r)) for r in range(steps + 1)]
    real = [sum(n for _, n in stream.row(r)) for r in range(steps + 1)]  # tokens less padding
    times, tokens = [], 0
    for i, batch in enumerate(rows):
        t0 = time.perf_counter()
        if which != "reference":
            counts = supervised_slots(batch["loss_mask"], batch["position_ids"], 3).sum(-1)
            loss, _ = obj(batch, weights / counts.clamp(min=1), dtype)
        else:
            loss = reference_loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t0)
            tokens += real[i]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"which": which, "steps": steps, "tokens": tokens, "seconds": sum(times),
            "tokens_per_s": tokens / sum(times), "peak_rss_mib": peak_mib, "threads": torch.get_num_threads()}  # fmt: skip


def bench(
    data: Path, steps: int, batch_tokens: int, draft_vocab: int, trainers=("ours", "reference")
) -> list[dict]:
    results = []
    for which in trainers:
        cmd = [sys.executable, __file__, "run", str(data), which, "--steps", str(steps),
               "--batch-tokens", str(batch_tokens), "--draft-vocab", str(draft_vocab)]  # fmt: skip
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        if proc.returncode:
            raise SystemExit(f"{which} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    a, b = results
    print(f"{'trainer':<10} {'tokens/s':>10} {'peak RSS MiB':>13}")
    for r in results:
        print(f"{r['which']:<10} {r['tokens_per_s']:>10.0f} {r['peak_rss_mib']:>13.0f}")
    print(f"ratio {a['which']}/{b['which']}: throughput {a['tokens_per_s'] / b['tokens_per_s']:.2f}x, "
          f"peak memory {a['peak_rss_mib'] / b['peak_rss_mib']:.2f}x")  # fmt: skip
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("bench", "precision", "run"):
        b = sub.add_parser(name)
        b.add_argument("data", type=Path)
        if name == "run":
            b.add_argument("which", choices=["ours", "ours-bf16", "reference"])
        b.add_argument("--steps", type=int, default=10)
        b.add_argument("--batch-tokens", type=int, default=2048)
        b.add_argument("--draft-vocab", type=int, default=32768)
    a = ap.parse_args()
    if a.cmd == "run":
        print(json.dumps(run_one(a.data, a.which, a.steps, a.batch_tokens, a.draft_vocab)))
    elif a.cmd == "precision":
        bench(a.data, a.steps, a.batch_tokens, a.draft_vocab, ("ours-bf16", "ours"))
    else:
        bench(a.data, a.steps, a.batch_tokens, a.draft_vocab)


if __name__ == "__main__":
    main()
