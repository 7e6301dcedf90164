"""`spec` subcommands contributed by spec-train: train, eval, quickstart.

`spec train` flags map one to one onto spec_train.config.TrainConfig (values of --config FILE first, flags
override them)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from spec_train.algorithms import BUILTIN


def _concurrency(value: str) -> list[int]:
    try:
        levels = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"'{value}': expected comma-separated integers such as 1,8") from None
    if not levels or min(levels) < 1:
        raise click.BadParameter(f"'{value}': concurrency levels must be positive integers")
    return levels


@click.command("eval")
@click.argument("draft_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--data",
    "sources",
    multiple=True,
    required=True,
    help="Prompt file(s) in any datagen layout, or a built-in set: chat, humaneval. Repeatable.",
)
@click.option(
    "--verifier",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Target model directory (default: the verifier recorded in the draft).",
)
@click.option(
    "-k",
    "--k",
    "k",
    type=click.IntRange(min=1),
    default=None,
    help="Draft tokens per step (default: the draft's).",
)
@click.option("--max-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True)
@click.option(
    "--concurrency", default="1", show_default=True, help="Comma-separated concurrency levels, e.g. 1,8."
)
@click.option(
    "--num-prompts", type=click.IntRange(min=1), default=None, help="At most this many prompts per source."
)
@click.option("--no-ngram", is_flag=True, help="Skip the n-gram baseline.")
@click.option(
    "--offline", is_flag=True, help="Estimate acceptance without vLLM (target in transformers, greedy)."
)
@click.option(
    "--report",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write eval.json and acceptance.png here.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout (logs go to stderr)."
)
def eval_cmd(
    draft_dir,
    sources,
    verifier,
    k,
    max_tokens,
    temperature,
    concurrency,
    num_prompts,
    no_ngram,
    offline,
    report,
    as_json,
):
    """Measure DRAFT_DIR in vLLM: acceptance length per position and speed-up over no speculation and n-gram."""
    import msgspec

    from spec_format.checkpoint import read_config
    from spec_train.eval_prompts import load_prompt_ids
    from spec_train.evaluate import evaluate, plot_acceptance

    levels = _concurrency(concurrency)
    out = _stdout_for_json() if as_json else None
    cfg, _ = read_config(draft_dir)
    verifier = verifier or cfg.verifier_name
    if not Path(verifier).is_dir():
        raise click.UsageError(
            f"the draft's verifier '{verifier}' is not a local directory: pass --verifier DIR"
        )
    k = k or cfg.speculative_tokens
    prompts = load_prompt_ids(list(sources), verifier, limit=num_prompts)
    if offline:
        from spec_train.simulate import simulate_draft

        run = simulate_draft(draft_dir, verifier, prompts, k, max_tokens)
        result = {
            "offline": True, "num_prompts": len(prompts), "k": k, "max_tokens": max_tokens,
            "generated_tokens": run.generated_tokens,
            "draft": {"mean_acceptance_length": run.mean_acceptance_length,
                      "acceptance_per_position": run.counters.acceptance_per_position,
                      "counters": msgspec.to_builtins(run.counters)},
        }  # fmt: skip
        per_position = {"draft (offline)": run.counters.acceptance_per_position}
    else:
        result = msgspec.to_builtins(
            evaluate(
                draft_dir,
                verifier,
                prompts,
                k=k,
                max_tokens=max_tokens,
                temperature=temperature,
                concurrencies=levels,
                ngram=not no_ngram,
            )  # fmt: skip
        )
        per_position = {"draft": result["draft"]["acceptance_per_position"]}
        if result.get("ngram"):
            per_position["ngram"] = result["ngram"]["acceptance_per_position"]
    if report is not None:
        report.mkdir(parents=True, exist_ok=True)
        (report / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_acceptance(per_position, report / "acceptance.png", f"{Path(draft_dir).name}, k={k}")
    if out is not None:
        out.write(json.dumps(result) + "\n")
        out.flush()
    else:
        _print_summary(result)
    if result.get("outputs_identical") is False:
        print("warning: outputs with the draft differ from outputs without it (greedy)", file=sys.stderr)


def _stdout_for_json():
    """The real standard output, kept for the one JSON object; file descriptor 1 then points at stderr for
    the rest of the run, because vLLM and its engine processes (which inherit fd 1) log to stdout."""
    sys.stdout.flush()
    real = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return real


def _print_summary(result: dict) -> None:
    draft = result["draft"]
    click.echo(f"mean acceptance length (k={result['k']}): {draft['mean_acceptance_length']:.3f}")
    click.echo("acceptance per position: " + ", ".join(f"{a:.3f}" for a in draft["acceptance_per_position"]))
    if result.get("offline"):
        return
    if result.get("ngram"):
        click.echo(f"n-gram mean acceptance length: {result['ngram']['mean_acceptance_length']:.3f}")
    for name in ("baseline", "draft", "ngram"):
        entry = result.get(name)
        if entry:
            for run in entry["runs"]:
                speed = entry.get("speedup", {}).get(str(run["concurrency"]))
                extra = f"  ({speed:.2f}x)" if speed else ""
                click.echo(
                    f"{name:>9} @ concurrency {run['concurrency']}: {run['tokens_per_second']:.1f} tok/s{extra}"
                )
    click.echo(f"outputs identical with and without the draft: {result['outputs_identical']}")


@click.command("quickstart")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("quickstart"),
    show_default=True,
    help="Working directory; the trained draft ends up in OUT/draft. Run again to reuse finished stages.",
)
@click.option(
    "--minutes",
    type=click.FloatRange(min=5),
    default=20.0,
    show_default=True,
    help="Rough time budget on a 2-core CPU; more minutes = more data and training (e.g. 60).",
)
@click.option("--algorithm", type=click.Choice(BUILTIN), default="eagle3", show_default=True, help="The draft to train (spec train --algorithm).")  # fmt: skip
def quickstart(out: Path, minutes: float, algorithm: str) -> None:
    """The whole pipeline on the shipped SmolLM2-135M-Instruct: synthesise prompts and replies, capture,
    train a draft (EAGLE-3 by default), and measure it in vLLM."""
    import msgspec

    from spec_train.quickstart import Plan, explain, run

    report = run(out, minutes, msgspec.structs.replace(Plan().scaled(minutes), algorithm=algorithm))
    click.echo(explain(report, out))


def _floats(ctx, param, value):
    if value is None:
        return None
    try:
        return [float(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated numbers, e.g. 1,0.8,0.64") from None


@click.command("train", context_settings={"show_default": True})
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.option("--verifier", type=click.Path(exists=True, file_okay=False), help="The target model's HF directory the dataset was captured from.")  # fmt: skip
@click.option(
    "--out", type=click.Path(file_okay=False), help="Run directory (checkpoints/, final/, best/, metrics)."
)
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON or TOML file of settings (TrainConfig field names); flags override it.")  # fmt: skip
@click.option("--verifier-name", default=None, help="Target name recorded in the draft (e.g. a hub id); default: the --verifier path.")  # fmt: skip
@click.option("--algorithm", type=click.Choice(BUILTIN), default=None, help="eagle3: sequential drafting (TTT); peagle: P-EAGLE, all k tokens in one forward; dflash: a block of k = --ttt-steps masked slots filled in one non-causal forward. [default: eagle3]")  # fmt: skip
@click.option("--max-anchors", type=int, default=None, help="DFlash: blocks sampled per packed row. [default: 64]")  # fmt: skip
@click.option("--init-from", type=click.Path(exists=True, file_okay=False), default=None, help="Fine-tune this draft directory instead of starting from the verifier.")  # fmt: skip
@click.option("--mask-token-id", type=int, default=None, help="P-EAGLE: the token read at drafted positions after the first [default: the verifier's pad/unk token]; DFlash: the token whose embedding fills masked slots [default: the tokenizer's mask token, else its last spare special token].")  # fmt: skip
@click.option("--cod-ratio", type=float, default=None, help="P-EAGLE COD sampling: depth d keeps max(ratio**d, --cod-min) of the slots. [default: 0.7]")  # fmt: skip
@click.option("--cod-min", type=float, default=None, help="P-EAGLE COD sampling floor. [default: 0.2]")
@click.option("--num-layers", type=int, default=None, help="Draft decoder layers. [default: 1]")
@click.option("--layer-init", type=click.Choice(["verifier", "random"]), default=None, help="Start the draft's layers as the verifier's layers after its deepest aux layer (fc passing that state through), or from N(0, 0.02). [default: verifier]")  # fmt: skip
@click.option(
    "--layer-type",
    type=click.Choice(["llama", "qwen3"]),
    default=None,
    help="[default: the verifier's family]",
)
@click.option("--ttt-steps", type=int, default=None, help="TTT depth, written as the draft's k (speculative_tokens). [default: 3]")  # fmt: skip
@click.option("--draft-vocab-size", type=int, default=None, help="[default: min(32768, target vocabulary)]")
@click.option("--norm-before-residual/--no-norm-before-residual", default=None, help="EAGLE-3 variant: RMSNorm on the residual entering layer 0. [default: off]")  # fmt: skip
@click.option("--norm-before-fc/--no-norm-before-fc", default=None, help="EAGLE-3 variant: RMSNorm over the concatenated aux states before fc. [default: off]")  # fmt: skip
@click.option("--fc-norm/--no-fc-norm", default=None, help="EAGLE-3 variant: RMSNorm on each aux layer's state before fc. [default: off]")  # fmt: skip
@click.option("--norm-output/--no-norm-output", default=None, help="EAGLE-3 variant: pass the normed state to the next step. [default: off]")  # fmt: skip
@click.option("--train-lm-head/--no-train-lm-head", default=None, help="Train the draft's lm_head (else keep the verifier's rows). [default: on]")  # fmt: skip
@click.option("--loss", type=click.Choice(["kl", "ce"]), default=None, help="Forward KL to the verifier, or CE on its top-1 token. [default: kl]")  # fmt: skip
@click.option("--step-weights", callback=_floats, default=None, help="Loss weight per TTT step, comma-separated. [default: 0.8**j]")  # fmt: skip
@click.option("--loss-chunk", type=int, default=None, help="Tokens per chunk of the vocabulary-sized loss. [default: 1024]")  # fmt: skip
@click.option("--batch-tokens", type=int, default=None, help="Tokens per packed row (one micro-batch per process). [default: 2048]")  # fmt: skip
@click.option("--grad-accum", type=int, default=None, help="Micro-batches per optimiser step and process. [default: 1]")  # fmt: skip
@click.option("--epochs", type=float, default=None, help="[default: 1 unless --max-steps]")
@click.option(
    "--max-steps", type=int, default=None, help="Optimiser steps (runs across epochs); wins over --epochs."
)
@click.option("--val-fraction", type=float, default=None, help="Share of samples held out. [default: 0.05]")
@click.option("--max-val-samples", type=int, default=None, help="[default: 256]")
@click.option("--noise", type=float, default=None, help="Uniform noise U(-x, x) on the auxiliary hidden states. [default: 0]")  # fmt: skip
@click.option("--loss-mask", type=click.Choice(["dataset", "all"]), default=None, help="Positions trained on: the dataset's loss mask (assistant turns) or all; the target is the verifier's distribution at each, so prompts the target wrote (spec synth) teach too. Validation uses the dataset's mask. [default: dataset]")  # fmt: skip
@click.option("--seed", type=int, default=None, help="[default: 0]")
@click.option("--lr", type=float, default=None, help="Peak learning rate. [default: 1e-3]")
@click.option(
    "--min-lr-ratio", type=float, default=None, help="Cosine floor as a share of --lr. [default: 0.1]"
)
@click.option("--warmup-steps", type=int, default=None, help="[default: 5% of the steps]")
@click.option("--weight-decay", type=float, default=None, help="[default: 0]")
@click.option("--grad-clip", type=float, default=None, help="Max gradient norm, 0 = off. [default: 1]")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16"]), default=None, help="Compute precision (weights and optimiser state stay fp32). [default: auto: bf16 on GPUs and CPUs with AMX, else fp32]")  # fmt: skip
@click.option("--attn", type=click.Choice(["sdpa", "flex"]), default=None, help="[default: sdpa]")
@click.option(
    "--fsdp/--no-fsdp", default=None, help="FSDP2 instead of DDP with several processes. [default: off]"
)
@click.option(
    "--resume", is_flag=True, default=None, help="Continue from the last complete checkpoint in --out."
)
@click.option(
    "--save-every", type=int, default=None, help="Checkpoint every N steps. [default: 5 over the run]"
)
@click.option("--eval-every", type=int, default=None, help="[default: --save-every]")
@click.option("--keep-last", type=int, default=None, help="Checkpoints kept (final/ and best/ are kept apart). [default: 3]")  # fmt: skip
@click.option("--log-every", type=int, default=None, help="[default: 1]")
@click.option(
    "--max-eval-rows", type=int, default=None, help="Packed rows evaluated per split. [default: 64]"
)
@click.option(
    "--save-dtype", type=click.Choice(["bfloat16", "float32"]), default=None, help="[default: bfloat16]"
)
@click.option("--num-workers", type=int, default=None, help="Data-loader processes. [default: 0]")
@click.option(
    "--tensorboard/--no-tensorboard", default=None, help="Also log to RUN/tensorboard. [default: off]"
)
@click.option("--progress/--no-progress", default=None, help="[default: on]")
@click.option("--nproc", type=click.IntRange(min=1), default=None, help="Processes on this node: re-runs this command under torchrun.")  # fmt: skip
def train_command(config_file, nproc, **flags) -> None:
    """Train a draft (EAGLE-3, or --algorithm peagle / dflash) on DATASET (spec datagen's output) against its verifier.

    Writes RUN/checkpoints/step-NNNNNN/ (speculator directory + training state), RUN/final/ (the latest
    checkpoint, served by `vllm serve RUN/final` or `spec serve`), RUN/best/ (best simulated acceptance on
    validation), RUN/train_config.json, RUN/metrics.jsonl and RUN/loss.png, RUN/acceptance.png.
    """
    from spec_train import config as config_mod

    if nproc and nproc > 1:
        from spec_train.distributed import relaunch

        args = sys.argv[2:] if sys.argv[1:2] == ["train"] else sys.argv[1:]  # `spec train ...` or `python -m`
        sys.exit(relaunch(nproc, _argv_without_nproc(args)))
    cfg = config_mod.resolve(flags, config_file)
    from spec_train.train import train

    train(cfg)


def _argv_without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out
