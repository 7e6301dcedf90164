"""The recipe study: which data, how much of it and which training make the best draft per CPU-minute.

One factor at a time from the quick start's recipe (spec_train.quickstart.Plan), on the real model:

  pool     `spec synth --respond` writes --pool prompts and the target's replies (seed 0 and the quick
           start's openers, so the first 320 rows are the quick start's own data); rows near a held-out
           prompt are dropped; `spec datagen` captures the pool once.
  runs     `spec train` on the first S samples of the pool (`--max-train-samples`, which also counts the
           draft vocabulary over those S samples only) with one change each (VARIANTS).
  measure  every draft offline on the same held-out prompts (default 16 chat + 16 HumanEval, 128 tokens):
           spec_train.simulate replays vLLM's greedy verification (exact to vLLM's counters, docs/eval.md);
           the target's continuations and hidden states are computed once for all drafts.
  confirm  `--confirm NAME,...`: those drafts in vLLM (`spec eval`, with the target alone and n-gram).

Data minutes are the pool's measured synth + capture seconds pro rata to the run's tokens; train minutes
are the run's own wall time (the study needs the machine to itself: do not time anything beside it).

    .venv/bin/python tools/exp_scaling.py --work /work/exp/scaling                        # every variant
    .venv/bin/python tools/exp_scaling.py --work /work/exp/scaling --only base,data-1280  # some of them
    .venv/bin/python tools/exp_scaling.py --work /work/exp/scaling --table                # what is done
    .venv/bin/python tools/exp_scaling.py --work /work/exp/scaling --confirm data-1280    # vLLM check

Each step leaves its result in --work (pool/, runs/NAME/, results.json), so a rerun skips finished work
and a killed one continues. Writes results.md (the table) and scaling.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

import msgspec

from spec_train.quickstart import Plan

# name -> (what changes, `spec train` flags that replace the base recipe's, training samples or None: all
# of the base's). The base is the quick start's Plan: 320 samples, 640 steps of 2 x 512 tokens.
VARIANTS: dict[str, tuple[str, dict[str, str], int | None]] = {
    "base": ("the quick start's recipe", {}, None),
    "data-160": ("half the data", {}, 160),
    "data-640": ("2x the data", {}, 640),
    "data-1280": ("4x the data", {}, 1280),
    "steps-320": ("half the steps", {"--max-steps": "320"}, None),
    "steps-1280": ("2x the steps", {"--max-steps": "1280"}, None),
    "data-1280-steps-1280": ("4x the data, 2x the steps", {"--max-steps": "1280"}, 1280),
    "vocab-8k": ("draft vocabulary 8192", {"--draft-vocab-size": "8192"}, None),
    "vocab-16k": ("draft vocabulary 16384", {"--draft-vocab-size": "16384"}, None),
    "layers-2": ("2 draft layers", {"--num-layers": "2"}, None),
    "ttt-2": ("TTT depth 2", {"--ttt-steps": "2"}, None),
    "ttt-4": ("TTT depth 4", {"--ttt-steps": "4"}, None),
    "lr-1e-3": ("lr 1e-3", {"--lr": "1e-3"}, None),
    "lr-6e-3": ("lr 6e-3", {"--lr": "6e-3"}, None),
    "loss-ce": ("CE on the target's top-1 token instead of KL", {"--loss": "ce"}, None),
    "loss-lk": ("LK-style loss: -log sum min(p, q)", {"--loss": "lk"}, None),
    "weights-flat": ("equal TTT step weights", {"--step-weights": "1,1,1"}, None),
    "mask-dataset": ("loss on replies only", {"--loss-mask": "dataset"}, None),
    "algo-peagle": ("P-EAGLE: all k tokens in one forward", {"--algorithm": "peagle"}, None),
    "layer-init-random": ("draft layer from N(0, 0.02), not the target's", {"--layer-init": "random"}, None),
}
SETS = ("chat", "humaneval")


def log(msg: str) -> None:
    print(f"[exp_scaling] {msg}", file=sys.stderr, flush=True)


def spec(*args: str) -> float:
    """Run `spec ARGS` (its output on this terminal); the wall seconds it took."""
    log("$ spec " + " ".join(args))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "spec_format", *args], check=True)
    return time.perf_counter() - start


def base_flags(plan: Plan) -> dict[str, str]:
    """The quick start's `spec train` flags (spec_train.quickstart.run passes the same)."""
    return {
        "--max-steps": str(plan.train_steps), "--batch-tokens": str(plan.row_tokens),
        "--grad-accum": str(plan.grad_accum), "--loss-mask": plan.loss_mask, "--lr": str(plan.lr),
        "--draft-vocab-size": str(plan.draft_vocab), "--ttt-steps": str(plan.k), "--algorithm": plan.algorithm,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The pool: synthesised prompts with the target's replies, decontaminated, captured once.


def make_pool(target: Path, work: Path, n: int, plan: Plan) -> dict:
    """work/pool/{train.jsonl, dataset/, pool.json}; pool.json holds the stage seconds and sizes."""
    from spec_format.dataset import Dataset
    from spec_train.eval_prompts import decontaminate, prompt_texts

    pool = work / "pool"
    info_file = pool / "pool.json"
    if info_file.is_file():
        return json.loads(info_file.read_text())
    pool.mkdir(parents=True, exist_ok=True)
    raw, rows = pool / "synth.jsonl", pool / "train.jsonl"
    info = json.loads((pool / "synth.json").read_text()) if (pool / "synth.json").is_file() else {}
    if not info:
        openers = str(files("spec_train") / "resources" / "quickstart_openers.txt")
        seconds = spec("synth", str(target), "--n", str(n), "--openers", openers, "--respond",
                       "--reply-max-tokens", str(plan.reply_tokens), "--max-model-len", "1024", "--out", str(raw),
                       "--no-progress")  # fmt: skip
        info = {"synth_s": round(seconds, 1)}
        (pool / "synth.json").write_text(json.dumps(info) + "\n")
    synth_rows = [json.loads(x) for x in raw.read_text().splitlines() if x.strip()]
    kept, dropped = decontaminate(synth_rows, prompt_texts(list(SETS)))
    rows.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    dataset = pool / "dataset"
    capture_s = spec("datagen", str(target), "--data", str(rows), "--out", str(dataset), "--max-len", "1024",
                     "--algorithm", plan.algorithm, "--no-progress")  # fmt: skip
    ds = Dataset(dataset)
    info.update(rows=len(kept), dropped_near_eval=dropped, capture_s=round(capture_s, 1), samples=len(ds),
                tokens=int(ds.manifest.num_tokens))  # fmt: skip
    info_file.write_text(json.dumps(info, indent=1) + "\n")
    log(f"pool: {len(kept)} rows ({dropped} dropped as near a held-out prompt), {info['tokens']} tokens, "
        f"synth {info['synth_s']:.0f} s, capture {capture_s:.0f} s")  # fmt: skip
    return info


# ---------------------------------------------------------------------------------------------
# Training runs.


def train(target: Path, work: Path, name: str, plan: Plan, base_samples: int) -> dict:
    """work/runs/NAME (a `spec train` run) and its run.json: flags, samples, tokens, seconds."""
    from spec_format.dataset import Dataset
    from spec_train.config import TrainConfig
    from spec_train.data import training_split

    change, overrides, samples = VARIANTS[name]
    samples = samples or base_samples
    run = work / "runs" / name
    info_file = run / "run.json"
    if info_file.is_file():
        return json.loads(info_file.read_text())
    dataset = work / "pool" / "dataset"
    flags = {**base_flags(plan), **overrides, "--max-train-samples": str(samples)}
    argv = ["train", str(dataset), "--verifier", str(target), "--out", str(run), "--resume", "--no-progress"]
    seconds = spec(*argv, *[x for kv in flags.items() for x in kv])
    ds = Dataset(dataset)
    cfg = TrainConfig(dataset=str(dataset), verifier=str(target), out=str(run), max_train_samples=samples)
    split = training_split(cfg, len(ds))
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r.get("split") == "val"]
    # a run resumed by a rerun of this tool: its own clock (training only, start-up not counted)
    seconds = max(seconds, max((r.get("elapsed_s", 0.0) for r in records), default=0.0))
    info = {
        "name": name, "change": change, "flags": flags, "samples": len(split.train),
        "train_tokens": int(ds.lengths[split.train].sum()), "steps": int(flags["--max-steps"]),
        "train_s": round(seconds, 1), "val_acceptance_length": val[-1]["acceptance_length"] if val else None,
    }  # fmt: skip
    info_file.write_text(json.dumps(info, indent=1) + "\n")
    return info


def draft_dir(run: Path) -> Path:
    """The checkpoint the quick start serves: best/ where validation chose one, else final/."""
    return run / "best" if (run / "best" / "config.json").is_file() else run / "final"


# ---------------------------------------------------------------------------------------------
# Offline measurement on the held-out prompts: the target's side once, every draft replayed against it.


class HeldOut:
    """The held-out prompts, the target's greedy continuations (cached in work/heldout.json) and, per set
    of aux layers, the target's hidden states (in memory)."""

    def __init__(self, target: Path, work: Path, num_prompts: int, max_tokens: int):
        import torch
        from transformers import AutoModelForCausalLM

        from spec_datagen.template import end_of_turn_ids, load_tokenizer
        from spec_train.eval_prompts import load_prompts
        from spec_train.simulate import greedy_continuations

        self.target = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
        cache = work / f"heldout-{num_prompts}x{max_tokens}.json"
        if cache.is_file():
            self.sets = json.loads(cache.read_text())
        else:
            eos = end_of_turn_ids(target, load_tokenizer(target))
            self.sets = {}
            for name in SETS:
                prompts = [p.ids for p in load_prompts([name], target, limit=num_prompts)]
                log(f"held-out {name}: the target's greedy continuations of {len(prompts)} prompts")
                conts = greedy_continuations(self.target, prompts, max_tokens, eos)
                self.sets[name] = {"prompts": prompts, "continuations": conts}
            cache.write_text(json.dumps(self.sets) + "\n")
        self._aux: dict[tuple, dict[str, list]] = {}

    def aux(self, layer_ids: list[int]) -> dict[str, list]:
        from spec_train.simulate import aux_states

        key = tuple(layer_ids)
        if key not in self._aux:
            self._aux[key] = {
                name: [
                    aux_states(self.target, p + c, layer_ids)
                    for p, c in zip(s["prompts"], s["continuations"])
                ]
                for name, s in self.sets.items()
            }
        return self._aux[key]

    def measure(self, draft_path: Path, k: int) -> dict:
        """Per set and pooled: mean acceptance length ± its standard error over prompts, per-position
        rates, and the share of the target's held-out tokens inside the draft's vocabulary."""
        import numpy as np

        from spec_models import load
        from spec_train.evaluate import acceptance_stderr
        from spec_train.simulate import simulate

        draft = load(draft_path).float().eval()
        auxes = self.aux(draft.config.aux_layer_ids)
        # target ids the draft can propose: draft id + d2t[draft id] (every id where the vocabulary is full)
        d2t = draft.d2t.cpu().numpy()
        inside = np.zeros(max(int(self.target.config.vocab_size), len(d2t)), dtype=bool)
        inside[np.arange(len(d2t)) + d2t] = True
        out, pooled = {}, []
        for name, s in self.sets.items():
            run = simulate(draft, self.target, s["prompts"], s["continuations"], k, auxes=auxes[name])
            tokens = np.concatenate([np.asarray(c, dtype=np.int64) for c in s["continuations"]])
            coverage = float(inside[tokens].mean())
            out[name] = {
                "mean_acceptance_length": run.mean_acceptance_length,
                "stderr": acceptance_stderr(run.per_prompt),
                "per_position": run.counters.acceptance_per_position,
                "drafts": run.counters.drafts, "coverage": coverage,
            }  # fmt: skip
            pooled += run.per_prompt
        drafts = sum(c.drafts for c in pooled)
        out["both"] = {
            "mean_acceptance_length": 1 + sum(c.accepted for c in pooled) / drafts,
            "stderr": acceptance_stderr(pooled),
        }
        return out


# ---------------------------------------------------------------------------------------------
# The table and the figure.


def minutes(info: dict, pool: dict) -> tuple[float, float]:
    """(data minutes pro rata to the run's tokens, train minutes)."""
    data_s = (pool["synth_s"] + pool["capture_s"]) * info["train_tokens"] / pool["tokens"]
    return data_s / 60, info["train_s"] / 60


def table(results: dict, pool: dict) -> str:
    head = (
        "| run | change | samples | tokens | steps | data min | train min | chat | HumanEval | both | "
        "per position (both sets) | coverage | val |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"
    )
    lines = [head]
    for name in VARIANTS:
        r = results.get(name)
        if not r or "heldout" not in r:
            continue
        h, (dm, tm) = r["heldout"], minutes(r, pool)
        cell = {s: f"{h[s]['mean_acceptance_length']:.3f} ± {h[s]['stderr']:.3f}" for s in (*SETS, "both")}
        pos = [
            sum(h[s]["per_position"][j] * h[s]["drafts"] for s in SETS) / sum(h[s]["drafts"] for s in SETS)
            for j in range(len(h["chat"]["per_position"]))
        ]
        cov = sum(h[s]["coverage"] for s in SETS) / len(SETS)
        val = f"{r['val_acceptance_length']:.3f}" if r.get("val_acceptance_length") else ""
        lines.append(
            f"| {name} | {r['change']} | {r['samples']} | {r['train_tokens']} | {r['steps']} | {dm:.1f} | {tm:.1f} "
            f"| {cell['chat']} | {cell['humaneval']} | **{cell['both']}** | {', '.join(f'{a:.3f}' for a in pos)} "
            f"| {cov:.1%} | {val} |"
        )
    confirmed = [(n, r["vllm"]) for n, r in results.items() if r.get("vllm")]
    if confirmed:
        lines += ["", "In vLLM (`--confirm`; the draft at k = 3, n-gram at k = 3, one request at a time):", "",
                  "| run | mean acceptance length | speed-up | n-gram speed-up |", "|---|---:|---:|---:|"]  # fmt: skip
        for name, v in confirmed:
            ngram = (v.get("ngram_speedup") or {}).get("1")
            lines.append(f"| {name} | {v['mean_acceptance_length']:.3f} ± {v['stderr'] or 0:.3f} | "
                         f"{v['speedup']['1']:.2f}x | {ngram:.2f}x |" if ngram else "")  # fmt: skip
    return "\n".join(lines)


def figure(results: dict, pool: dict, out: Path) -> None:
    """Held-out acceptance length (both sets, ± s.e.) against data + train minutes, one point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in results.items():
        if "heldout" not in r:
            continue
        dm, tm = minutes(r, pool)
        both = r["heldout"]["both"]
        ax.errorbar(dm + tm, both["mean_acceptance_length"], yerr=both["stderr"], fmt="o", capsize=3)
        ax.annotate(name, (dm + tm, both["mean_acceptance_length"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)  # fmt: skip
    ax.set(xlabel="CPU minutes (data pro rata + training)", ylabel="held-out mean acceptance length (k = 3)",
           title="Draft recipes: held-out acceptance against cost (offline, exact to vLLM)")  # fmt: skip
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--work", type=Path, required=True, help="Working directory (kept; reruns continue in it)."
    )
    p.add_argument(
        "--target", type=Path, default=None, help="Target model directory (default: the demo model)."
    )
    p.add_argument("--pool", type=int, default=1280, help="Synthesised prompts in the pool.")
    p.add_argument("--only", default=None, help="Comma-separated variants to run (default: all, in order).")
    p.add_argument("--num-prompts", type=int, default=16, help="Held-out prompts per set (chat, HumanEval).")
    p.add_argument(
        "--max-tokens", type=int, default=128, help="Tokens the target writes per held-out prompt."
    )
    p.add_argument("--table", action="store_true", help="Print the table of what is done and stop.")
    p.add_argument("--confirm", default=None, help="Comma-separated variants to measure in vLLM (spec eval).")
    p.add_argument("--confirm-prompts", type=int, default=8, help="With --confirm: prompts per set.")
    p.add_argument("--confirm-rounds", type=int, default=1, help="With --confirm: spec eval --rounds.")
    args = p.parse_args()
    unknown = sorted(
        set((args.only or "").split(",") + (args.confirm or "").split(",")) - set(VARIANTS) - {""}
    )
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if args.target is None:
        from spec_datagen.demo_model import demo_model_dir

        args.target = demo_model_dir()
    plan = Plan()
    args.work.mkdir(parents=True, exist_ok=True)
    results_file = args.work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    pool = (
        make_pool(args.target, args.work, args.pool, plan)
        if not args.table
        else json.loads((args.work / "pool" / "pool.json").read_text())
    )
    if not args.table:
        names = args.only.split(",") if args.only else ([] if args.confirm else list(VARIANTS))
        held = None
        for name in names:
            info = train(args.target, args.work, name, plan, plan.prompts)
            if "heldout" not in results.get(name, {}):
                held = held or HeldOut(args.target, args.work, args.num_prompts, args.max_tokens)
                log(f"{name}: measuring on the held-out prompts")
                info["heldout"] = held.measure(draft_dir(args.work / "runs" / name), plan.k)
                results[name] = info
                results_file.write_text(json.dumps(results, indent=1) + "\n")
        for name in args.confirm.split(",") if args.confirm else []:
            report = args.work / "runs" / name / "vllm.json"
            if not report.is_file():
                cmd = [sys.executable, "-m", "spec_format", "eval", str(draft_dir(args.work / "runs" / name)),
                       "--data", "chat", "--data", "humaneval", "--num-prompts", str(args.confirm_prompts),
                       "--max-tokens", str(args.max_tokens), "--rounds", str(args.confirm_rounds), "--no-suffix",
                       "--json"]  # fmt: skip
                log("$ spec " + " ".join(cmd[3:]))
                out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
                report.write_text(out)
            r = json.loads(report.read_text())
            results.setdefault(name, {})["vllm"] = {
                "mean_acceptance_length": r["draft"]["mean_acceptance_length"],
                "stderr": r["draft"].get("acceptance_length_stderr"),
                "speedup": r["draft"]["speedup"], "ngram_speedup": (r.get("ngram") or {}).get("speedup"),
            }  # fmt: skip
            results_file.write_text(json.dumps(results, indent=1) + "\n")
    text = table(results, pool)
    (args.work / "results.md").write_text(text + "\n")
    figure(results, pool, args.work / "scaling.png")
    print(msgspec.json.encode(pool).decode())
    print(text)


if __name__ == "__main__":
    main()
