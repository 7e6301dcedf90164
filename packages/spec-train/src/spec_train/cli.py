"""`spec` subcommands contributed by spec-train: train, eval, quickstart.

`spec train` flags map one to one onto spec_train.config.TrainConfig (values of --config FILE first, flags
override them)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from spec_format.cli import comma_separated
from spec_train.algorithms import BUILTIN


def _int_list(value: str, what: str, example: str) -> list[int]:
    """Comma-separated positive integers; anything else is a SpecError (one line, before any engine starts)."""
    from spec_format.errors import SpecError

    try:
        levels = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise SpecError(f"{what} '{value}': expected comma-separated integers such as {example}") from None
    if not levels or min(levels) < 1:
        raise SpecError(f"{what} '{value}': every value must be a positive integer, such as {example}")
    return sorted(set(levels))


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
    default=None,
    help="Draft tokens per step, or several to sweep, e.g. 1,2,3,4,6 (default: the draft's).",
)
@click.option(
    "--write-k",
    is_flag=True,
    help="Write the best single-stream k (highest median speed-up) into the draft's config.json.",
)
@click.option("--max-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True)
@click.option(
    "--concurrency",
    default="1",
    show_default=True,
    help="Comma-separated concurrency levels, e.g. 1,8 (1 is always measured).",
)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Interleaved timing rounds; figures are medians with their spread.",
)
@click.option(
    "--max-engines",
    type=click.IntRange(min=2),
    default=3,
    show_default=True,
    help="vLLM engines alive at once (4-5 GB each): the target alone + the speculative ones timed beside it.",
)
@click.option(
    "--num-prompts", type=click.IntRange(min=1), default=None, help="At most this many prompts per source."
)
@click.option("--no-ngram", is_flag=True, help="Skip the n-gram baseline.")
@click.option(
    "--no-suffix",
    is_flag=True,
    help="Skip the suffix-decoding baseline (measured when arctic_inference is installed).",
)
@click.option(
    "--allow-mismatch",
    is_flag=True,
    help="Only warn when greedy output with speculation differs from the target's (else exit 1).",
)
@click.option(
    "--offline", is_flag=True, help="Estimate acceptance without vLLM (target in transformers, greedy)."
)
@click.option(
    "--report",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write eval.json, acceptance.png and speed.png here.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout (logs go to stderr)."
)
def eval_cmd(
    draft_dir,
    sources,
    verifier,
    k,
    write_k,
    max_tokens,
    temperature,
    concurrency,
    rounds,
    max_engines,
    num_prompts,
    no_ngram,
    no_suffix,
    allow_mismatch,
    offline,
    report,
    as_json,
):
    """Measure DRAFT_DIR in vLLM: acceptance length per position and speed-up over no speculation, n-gram
    and suffix decoding, at one k or over several (--k 1,2,3,4,6), in interleaved timing rounds."""
    import msgspec

    from spec_format.checkpoint import read_config, write_speculative_tokens
    from spec_format.errors import SpecError
    from spec_train.eval_prompts import load_prompts, warmup_prompt_ids
    from spec_train.evaluate import (
        evaluate,
        mismatch_message,
        speculative_configs,
        suffix_available,
        write_report,
    )

    levels = _int_list(concurrency, "--concurrency", "1,8")
    cfg, _ = read_config(draft_dir)
    own_k = cfg.speculative_tokens
    ks = _int_list(k, "--k", "1,2,3,4,6") if k else [own_k]
    verifier = verifier or cfg.verifier_name
    if not Path(verifier).is_dir():
        raise SpecError(f"the draft's verifier '{verifier}' is not a local directory: pass --verifier DIR")
    if offline and (len(ks) > 1 or write_k):
        raise SpecError(
            "--offline estimates acceptance at one k and measures no speed: drop --offline, or pass one --k and no --write-k"
        )
    suffix = not no_suffix and not offline and suffix_available()
    baseline_k = ks[0] if len(ks) == 1 else own_k  # n-gram's k
    # A k vLLM cannot serve fails here, before any engine starts.
    speculative_configs(draft_dir, ks, baseline_k, ngram=not no_ngram, suffix=suffix)
    prompts = load_prompts(list(sources), verifier, limit=num_prompts)
    ids = [p.ids for p in prompts]
    out = _stdout_for_json() if as_json else None
    mismatches: list[str] = []
    if offline:
        from spec_train.simulate import simulate_draft

        run = simulate_draft(draft_dir, verifier, ids, ks[0], max_tokens)
        result = {
            "offline": True, "num_prompts": len(ids), "k": ks[0], "max_tokens": max_tokens,
            "generated_tokens": run.generated_tokens,
            "draft": {"mean_acceptance_length": run.mean_acceptance_length,
                      "acceptance_per_position": run.counters.acceptance_per_position,
                      "counters": msgspec.to_builtins(run.counters)},
        }  # fmt: skip
    else:
        evaluation = evaluate(
            draft_dir, verifier, ids, ks=ks, warmup=warmup_prompt_ids(verifier, ids), sources=[p.source for p in prompts],
            baseline_k=baseline_k, max_tokens=max_tokens, temperature=temperature, concurrencies=levels,
            ngram=not no_ngram, suffix=suffix, rounds=rounds, max_engines=max_engines,
        )  # fmt: skip
        mismatches = [mismatch_message(m) for m in evaluation.mismatches]
        if write_k and (allow_mismatch or not mismatches):
            old = write_speculative_tokens(draft_dir, evaluation.best_k)
            evaluation.written_k = {
                "path": str(Path(draft_dir) / "config.json"),
                "old": old,
                "new": evaluation.best_k,
            }
        result = msgspec.to_builtins(evaluation)
    if report is not None:
        write_report(result, report, f"{Path(draft_dir).name}, k={result['k']}")
    if out is not None:
        out.write(json.dumps(result) + "\n")
        out.flush()
    else:
        _print_summary(result)
    for i, message in enumerate(mismatches):
        if i == 0 and not allow_mismatch:  # the report above is written first: nothing measured is lost
            raise SpecError(message)
        print(f"warning: {message}", file=sys.stderr)


def _stdout_for_json():
    """The real standard output, kept for the one JSON object; file descriptor 1 then points at stderr for
    the rest of the run, because vLLM and its engine processes (which inherit fd 1) log to stdout."""
    sys.stdout.flush()
    real = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return real


def _print_summary(result: dict) -> None:
    draft = result["draft"]
    se = draft.get("acceptance_length_stderr")
    click.echo(
        f"mean acceptance length (k={result['k']}): {draft['mean_acceptance_length']:.3f}"
        + (f" ± {se:.3f} (standard error over prompts)" if se is not None else "")
    )
    click.echo("acceptance per position: " + ", ".join(f"{a:.3f}" for a in draft["acceptance_per_position"]))
    if result.get("offline"):
        return
    click.echo(f"timing: {result['rounds']} interleaved round(s); medians, ± half the spread (max - min)")
    if len(result["per_k"]) > 1:
        for p in result["per_k"]:
            speeds = ", ".join(
                f"c={c}: {s['tokens_per_second']:.1f} ± {s['tokens_per_second_spread'] / 2:.1f} tok/s ({s['speedup']:.2f}x)"
                for c, s in p["per_concurrency"].items()
            )
            click.echo(f"  k={p['k']}: acceptance length {p['mean_acceptance_length']:.3f}; {speeds}")
        best = ", ".join(f"concurrency {c}: k={k}" for c, k in result["best_k_by_concurrency"].items())
        click.echo(f"best k: {best}")
    for name in ("ngram", "suffix"):
        if result.get(name):
            click.echo(f"{name} mean acceptance length: {result[name]['mean_acceptance_length']:.3f}")
    for name in ("baseline", "draft", "ngram", "suffix"):
        entry = result.get(name)
        if entry:
            for run in entry["runs"]:
                speed = entry.get("speedup", {}).get(str(run["concurrency"]))
                extra = f"  ({speed:.2f}x)" if speed else ""
                click.echo(
                    f"{name:>9} @ concurrency {run['concurrency']}: {run['tokens_per_second']:.1f} "
                    f"± {run['tokens_per_second_spread'] / 2:.1f} tok/s{extra}"
                )
    click.echo(f"outputs identical with and without speculation: {result['outputs_identical']}")
    if result.get("written_k"):
        w = result["written_k"]
        click.echo(f"wrote k={w['new']} into {w['path']} (was {w['old']})")


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


_floats = comma_separated(float, "1,0.8,0.64")


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
