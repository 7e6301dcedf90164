"""`spec train`: flags map one to one onto spec_train.config.TrainConfig (values of --config FILE first,
flags override them)."""

from __future__ import annotations

import sys

import click


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
@click.option("--algorithm", type=click.Choice(["eagle3"]), default=None, help="[default: eagle3]")
@click.option("--init-from", type=click.Path(exists=True, file_okay=False), default=None, help="Fine-tune this draft directory instead of starting from the verifier.")  # fmt: skip
@click.option("--num-layers", type=int, default=None, help="Draft decoder layers. [default: 1]")
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
@click.option("--seed", type=int, default=None, help="[default: 0]")
@click.option("--lr", type=float, default=None, help="Peak learning rate. [default: 1e-3]")
@click.option(
    "--min-lr-ratio", type=float, default=None, help="Cosine floor as a share of --lr. [default: 0.1]"
)
@click.option("--warmup-steps", type=int, default=None, help="[default: 5% of the steps]")
@click.option("--weight-decay", type=float, default=None, help="[default: 0]")
@click.option("--grad-clip", type=float, default=None, help="Max gradient norm, 0 = off. [default: 1]")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16"]), default=None, help="Compute precision (weights and optimiser state stay fp32). [default: auto: bf16 on GPUs, fp32 on CPUs]")  # fmt: skip
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
    """Train a draft (EAGLE-3) on DATASET (spec datagen's output) against its verifier.

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
