"""`spec` subcommands contributed by spec-train: train, eval, quickstart.

`spec train`'s flags are made from spec_train.config.TrainConfig's fields, one per field with its help and
default (values of --config FILE first, flags override them)."""

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

    from spec_datagen.targets import check_target
    from spec_format.checkpoint import read_config, write_speculative_tokens
    from spec_format.errors import SpecError
    from spec_train.eval_prompts import load_prompts, warmup_prompt_ids
    from spec_train.evaluate import (
        acceptance_stderr,
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
    configs = speculative_configs(draft_dir, ks, baseline_k, ngram=not no_ngram, suffix=suffix)
    if not offline:  # a target vLLM cannot pair with this draft, first (spec_datagen.targets)
        check_target(verifier, method=configs[0].spec["method"])
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
                      "acceptance_length_stderr": acceptance_stderr(run.per_prompt),
                      "acceptance_per_position": run.counters.acceptance_per_position,
                      "counters": msgspec.to_builtins(run.counters)},
            "acceptance_by_context": msgspec.to_builtins(run.by_context()),
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
    help="Rough time budget on a 2-core CPU with AMX (bf16 training); an AVX2-only CPU takes about 1.7x as "
    "long (docs/eval.md). More minutes = more data and training (e.g. 60).",
)
@click.option("--algorithm", type=click.Choice(BUILTIN), default="eagle3", show_default=True, help="The draft to train (spec train --algorithm).")  # fmt: skip
@click.option("--plan", "plan_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              hidden=True, help="JSON of quickstart.Plan fields instead of --minutes (the test suite's tiny run).")  # fmt: skip
def quickstart(out: Path, minutes: float, algorithm: str, plan_file: Path | None) -> None:
    """The whole pipeline on the shipped SmolLM2-135M-Instruct: synthesise prompts and replies, capture,
    train a draft (EAGLE-3 by default), and measure it in vLLM."""
    import msgspec

    from spec_train.quickstart import Plan, explain, read_plan, run

    plan = read_plan(plan_file) if plan_file else Plan().scaled(minutes)
    report = run(out, minutes, msgspec.structs.replace(plan, algorithm=algorithm))
    click.echo(explain(report, out))


_floats = comma_separated(float, "1,0.8,0.64")


# TrainConfig fields without a flag (the dataset is the argument), and click types richer than the field's.
_NO_FLAG = {"dataset", "betas", "world_size"}
_CLICK_TYPES = {
    "verifier": click.Path(exists=True, file_okay=False),
    "init_from": click.Path(exists=True, file_okay=False),
    "out": click.Path(file_okay=False),
    "online": click.Path(exists=True, file_okay=False),
    "data": click.Path(exists=True, dir_okay=False),
    "algorithm": click.Choice(BUILTIN),
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
        elif isinstance(t, mi.ListType) and isinstance(t.item_type, mi.StrType):  # repeatable
            decls, kwargs["multiple"], kwargs["type"] = [name], True, _CLICK_TYPES.get(f.name)
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
@click.argument("dataset", type=click.Path(exists=True, file_okay=False), required=False)
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON or TOML file of settings (TrainConfig field names); flags override it.")  # fmt: skip
@_train_options
@click.option("--nproc", type=click.IntRange(min=1), default=None, help="Processes on this node: re-runs this command under torchrun.")  # fmt: skip
def train_command(config_file, nproc, **flags) -> None:
    """Train a draft (EAGLE-3, or --algorithm peagle / dflash) on DATASET (spec datagen's output) against its verifier,
    or online: --online TARGET --data CONVERSATIONS captures the hidden states with vLLM while training.

    Writes RUN/checkpoints/step-NNNNNN/ (speculator directory + training state), RUN/final/ (the latest
    checkpoint, served by `vllm serve RUN/final` or `spec serve`), RUN/best/ (best simulated acceptance on
    validation), RUN/train_config.json, RUN/metrics.jsonl and RUN/loss.png, RUN/acceptance.png.
    """
    from spec_train import config as config_mod

    if nproc and nproc > 1:
        from spec_train.distributed import relaunch

        args = sys.argv[2:] if sys.argv[1:2] == ["train"] else sys.argv[1:]  # `spec train ...` or `python -m`
        sys.exit(relaunch(nproc, _argv_without_nproc(args)))
    flags["data"] = list(flags["data"]) or None  # a repeatable option gives () when absent
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
