"""`spec` subcommands contributed by spec-train: train, eval, quickstart.

`spec train`'s flags are made from spec_train.config.TrainConfig's fields, one per field with its help and
default (values of --config FILE first, flags override them)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click


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
@click.option("--plan", "plan_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              hidden=True, help="JSON of quickstart.Plan fields instead of --minutes (the test suite's tiny run).")  # fmt: skip
def quickstart(out: Path, minutes: float, plan_file: Path | None) -> None:
    """The whole pipeline on the shipped SmolLM2-135M-Instruct: synthesise prompts and replies, capture,
    train an EAGLE-3 draft, and measure it in vLLM."""
    from spec_train.quickstart import explain, read_plan, run

    report = run(out, minutes, read_plan(plan_file) if plan_file else None)
    click.echo(explain(report, out))


def _floats(ctx, param, value):
    if value is None:
        return None
    try:
        return [float(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated numbers, e.g. 1,0.8,0.64") from None


# TrainConfig fields without a flag (the dataset is the argument), and click types richer than the field's.
_NO_FLAG = {"dataset", "betas", "world_size"}
_CLICK_TYPES = {
    "verifier": click.Path(exists=True, file_okay=False),
    "init_from": click.Path(exists=True, file_okay=False),
    "out": click.Path(file_okay=False),
}


def _train_options(command):
    """One --flag per TrainConfig field, its help and [default: ...] read from the field (config.Help), so
    that the struct is the one place a default is written. Every flag defaults to None (not given): then the
    --config file's value or the field's default applies (config.resolve)."""
    import msgspec.inspect as mi

    from spec_train.config import TrainConfig

    for f in reversed(mi.type_info(TrainConfig).fields):
        if f.name in _NO_FLAG:
            continue
        t, help_text = f.type, ""
        if isinstance(t, mi.Metadata):
            t, help_text = t.type, t.extra_json_schema.get("description", "")
        if isinstance(t, mi.UnionType):  # X | None
            t = next(x for x in t.types if not isinstance(x, mi.NoneType))
        name = "--" + f.name.replace("_", "-")
        kwargs = {}
        if isinstance(t, mi.BoolType):
            decls = [f"{name}/--no-{name[2:]}"]
        elif isinstance(t, mi.LiteralType):
            decls, kwargs["type"] = [name], click.Choice(list(t.values))
        elif isinstance(t, mi.ListType):
            decls, kwargs["callback"] = [name], _floats
        else:
            decls = [name]
            kwargs["type"] = _CLICK_TYPES.get(f.name) or {mi.IntType: int, mi.FloatType: float}.get(
                type(t), str
            )
        if f.default not in (None, mi.NODEFAULT):
            shown = ("on" if f.default else "off") if isinstance(f.default, bool) else f.default
            help_text = f"{help_text} [default: {shown}]".strip()
        command = click.option(*decls, f.name, default=None, help=help_text, **kwargs)(command)
    return command


@click.command("train")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON or TOML file of settings (TrainConfig field names); flags override it.")  # fmt: skip
@_train_options
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
