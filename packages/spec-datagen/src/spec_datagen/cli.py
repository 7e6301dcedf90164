"""`spec` subcommands contributed by spec-datagen."""

from __future__ import annotations

import sys

import click


@click.command("demo-model")
@click.option("--cache-dir", type=click.Path(), default=None, help="Where to keep the converted model.")
def demo_model(cache_dir: str | None) -> None:
    """Build (once) and print the path of the SmolLM2-135M-Instruct demo target."""
    from spec_datagen.demo_model import demo_model_dir

    click.echo(str(demo_model_dir(cache_dir)))


def _parse_layers(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated integers, e.g. 2,15,27,30") from None


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


@click.command("datagen")
@click.argument("target", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--data",
    "data",
    multiple=True,
    required=True,
    type=click.Path(exists=True),
    help="Conversations: .jsonl/.json/.parquet/.arrow files, directories of them, or a "
    "datasets.save_to_disk directory (repeat for several; read in the order given).",
)
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Dataset directory to write."
)
@click.option(
    "--layers",
    default=None,
    help="Comma-separated capture ids in vLLM's convention (k = output of decoder layer k-1, "
    "0 = embeddings, L = last layer before the final norm). Default: the --algorithm's "
    "(EAGLE-3, P-EAGLE: 2,L/2,L-3,L; DFlash: five spread over 2..L-2, plus L).",
)
@click.option(
    "--algorithm",
    default="eagle3",
    show_default=True,
    type=click.Choice(["eagle3", "peagle", "dflash"]),
    help="The draft the dataset is for: picks the default --layers.",
)
@click.option(
    "--max-len",
    default=2048,
    show_default=True,
    type=click.IntRange(min=2),
    help="Longest sample, in tokens.",
)
@click.option(
    "--long",
    "long_policy",
    type=click.Choice(["truncate", "skip"]),
    default="truncate",
    show_default=True,
    help="What to do with samples longer than --max-len.",
)
@click.option(
    "--max-samples",
    default=None,
    type=click.IntRange(min=1),
    help="Use only the first N rows of this job's share of the input (rows skipped as broken or too "
    "long count).",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run after its last complete shard.")
@click.option(
    "--shard-index",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="This job's index among --num-shards jobs splitting one input (row i goes to job i % n).",
)
@click.option("--num-shards", default=1, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "bf16", "fp8"]),
    default="bf16",
    show_default=True,
    help="Stored precision of the hidden states.",
)
@click.option("--compress", type=click.Choice(["zstd"]), default=None, help="Compress shards.")
@click.option("--samples-per-shard", default=256, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--on-error",
    type=click.Choice(["skip", "fail"]),
    default="skip",
    show_default=True,
    help="A malformed row is reported as FILE:LINE and skipped, or stops the run.",
)
@click.option(
    "--chat-template",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="A Jinja chat template file to use instead of the target's own.",
)
@click.option(
    "--chat-template-kwargs",
    default=None,
    help="JSON object of extra template variables, e.g. '{\"enable_thinking\": false}'.",
)
@click.option(
    "--rewritten-turns",
    type=click.Choice(["unmask", "error"]),
    default="unmask",
    show_default=True,
    help="Assistant turns that the template renders differently once later turns follow (Qwen3 "
    "thinking): leave them out of the loss mask, or refuse the row.",
)
@click.option(
    "--tensor-parallel-size",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="GPUs per engine (vLLM tensor parallelism).",
)
@click.option(
    "--data-parallel-size",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Engines on this machine, each on its own --tensor-parallel-size GPUs and a share of the rows "
    "(jobs of one dataset; see spec_datagen.parallel).",
)
@click.option("--engine-kwargs", default=None, help="JSON object of extra vllm.LLM arguments.")
@click.option("--force", is_flag=True, help="Start even when the disk looks too small for the estimate.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def datagen(
    target,
    data,
    out_dir,
    layers,
    algorithm,
    max_len,
    long_policy,
    max_samples,
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
    from pathlib import Path

    from spec_datagen.capture import validate_layer_ids
    from spec_datagen.pipeline import Capturer, write_dataset
    from spec_format.algorithms import default_layers
    from spec_format.fingerprint import read_model_config

    layer_ids = _parse_layers(layers)
    template_kwargs = _parse_json(chat_template_kwargs, "--chat-template-kwargs")
    extra_engine = _parse_json(engine_kwargs, "--engine-kwargs")
    n = read_model_config(target)["num_hidden_layers"]
    # Validated before the engine starts (a minute) so that a typo fails at once.
    layer_ids = validate_layer_ids(layer_ids or default_layers(algorithm, n), n)
    template_text = Path(chat_template).read_text() if chat_template else None
    # Everything that decides the dataset's content, with defaults spelled out (recorded in the manifest).
    content = [str(target), *(a for d in data for a in ("--data", str(d))), "--out", str(out_dir),
               "--layers", ",".join(map(str, layer_ids)), "--max-len", str(max_len), "--long", long_policy,
               "--dtype", dtype, "--samples-per-shard", str(samples_per_shard), "--on-error", on_error,
               "--rewritten-turns", rewritten_turns]  # fmt: skip
    content += ["--max-samples", str(max_samples)] if max_samples else []
    content += ["--compress", compress] if compress else []
    content += ["--chat-template", str(chat_template)] if chat_template else []
    content += ["--chat-template-kwargs", chat_template_kwargs] if chat_template_kwargs else []
    if data_parallel_size > 1:
        from spec_datagen.parallel import data_parallel_jobs, run_jobs, visible_devices

        jobs = data_parallel_jobs(
            shard_index, num_shards, data_parallel_size, tensor_parallel_size, visible_devices()
        )
        flags = [
            f for f, on in (("--resume", resume), ("--force", force), ("--no-progress", not progress)) if on
        ]
        extra = ["--engine-kwargs", engine_kwargs] if engine_kwargs else []
        raise click.exceptions.Exit(
            run_jobs(jobs, [*content, "--tensor-parallel-size", str(tensor_parallel_size), *extra, *flags])
        )
    argv = ["spec", "datagen", *content, "--shard-index", str(shard_index), "--num-shards", str(num_shards)]
    with Capturer(
        target,
        layer_ids=layer_ids,
        max_len=max_len,
        chat_template=template_text,
        template_kwargs=template_kwargs,
        rewritten=rewritten_turns,
        tensor_parallel_size=tensor_parallel_size,
        engine_kwargs=extra_engine,
    ) as capturer:
        summary = write_dataset(
            capturer,
            list(data),
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
    default=None,
    help="Serve this target instead of the verifier recorded in the draft (e.g. a local copy).",
)
@click.option(
    "-k",
    "--num-speculative-tokens",
    type=click.IntRange(min=1),
    default=None,
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


def _default_context(target: str, cap: int = 4096) -> int:
    from spec_format.fingerprint import read_model_config

    return min(cap, int(read_model_config(target).get("max_position_embeddings") or cap))


def _sampling_options(f):
    """--temperature/--top-p/--top-k/--max-tokens/--seed, shared by regenerate and synth --respond."""
    f = click.option("--seed", default=None, type=int, help="Seed of sampled replies [default: 0].")(f)
    f = click.option(
        "--max-tokens",
        default=None,
        type=click.IntRange(min=1),
        help="Longest reply in tokens (default: the generation config's max_new_tokens, else 1024).",
    )(f)
    f = click.option("--top-k", default=None, type=click.IntRange(min=0), help="0 turns top-k off.")(f)
    f = click.option("--top-p", default=None, type=click.FloatRange(0, 1, min_open=True))(f)
    f = click.option(
        "--temperature",
        default=None,
        type=click.FloatRange(min=0),
        help="0 is greedy. Default: the target's generation_config.json, greedy when it sets no sampling.",
    )(f)
    return f


@click.command("regenerate")
@click.argument("target", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--data",
    "data",
    multiple=True,
    required=True,
    type=click.Path(exists=True),
    help="Conversations or prompts: .jsonl/.json/.parquet/.arrow files, directories of them, or a "
    "datasets.save_to_disk directory (repeat for several; read in the order given).",
)
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
@click.option(
    "--max-rows", default=None, type=click.IntRange(min=1), help="Regenerate only the first N readable rows."
)
@click.option(
    "--max-model-len",
    default=None,
    type=click.IntRange(min=16),
    help="Engine context (prompt + reply); a turn whose prompt does not fit cuts its conversation there "
    "[default: 4096, or the target's own if shorter].",
)
@click.option(
    "--on-error",
    type=click.Choice(["skip", "fail"]),
    default="skip",
    show_default=True,
    help="A malformed row is reported as FILE:LINE and skipped, or stops the run.",
)
@click.option(
    "--chat-template",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="A Jinja chat template file to use instead of the target's own.",
)
@click.option(
    "--chat-template-kwargs",
    default=None,
    help="JSON object of extra template variables, e.g. '{\"enable_thinking\": false}'.",
)
@click.option("--engine-kwargs", default=None, help="JSON object of extra vllm.LLM arguments.")
@click.option("--progress/--no-progress", default=True, show_default=True)
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

    from spec_datagen.regenerate import Regenerator, default_sampling, write_regenerated

    template_kwargs = _parse_json(chat_template_kwargs, "--chat-template-kwargs")
    extra_engine = _parse_json(engine_kwargs, "--engine-kwargs")
    sampling = default_sampling(
        target, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, seed=seed
    )
    if Path(out).exists() and not resume:  # before the engine starts (a minute)
        raise click.UsageError(f"{out} already exists; pass --resume to continue it, or remove it")
    with Regenerator(
        target,
        sampling=sampling,
        max_model_len=max_model_len or _default_context(target),
        chat_template=Path(chat_template).read_text() if chat_template else None,
        template_kwargs=template_kwargs,
        engine_kwargs=extra_engine,
    ) as regen:
        summary = write_regenerated(
            regen, list(data), out, resume=resume, max_rows=max_rows, on_error=on_error, progress=progress
        )
    for line in summary.lines():
        click.echo(line)


@click.command("synth")
@click.argument("target", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--n", "n", required=True, type=click.IntRange(min=1), help="Prompts to write (after filtering)."
)
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="JSONL file to write.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--topics",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="A text file of topics, one per line; prompt i is seeded with topic i mod their number.",
)
@click.option(
    "--openers",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="A text file of opening words, one per line; prompt i starts with opener i mod their number and "
    "the target writes the rest (steers small models, which ignore --topics).",
)
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option(
    "--max-tokens",
    default=256,
    show_default=True,
    type=click.IntRange(min=1),
    help="Longest prompt in tokens; longer ones are dropped as truncated.",
)
@click.option("--min-words", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--max-words", default=200, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--near-dup",
    default=0.7,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="Estimated Jaccard similarity (character 5-grams) from which a prompt counts as a near-duplicate.",
)
@click.option(
    "--max-attempts",
    default=None,
    type=click.IntRange(min=1),
    help="Give up after this many generated prompts [default: 20 n + 100].",
)
@click.option("--respond", is_flag=True, help="Also write the target's replies (as spec regenerate would).")
@click.option(
    "--reply-temperature",
    default=None,
    type=click.FloatRange(min=0),
    help="With --respond [default: the target's generation config, greedy when it sets none].",
)
@click.option(
    "--reply-max-tokens", default=None, type=click.IntRange(min=1), help="With --respond [default: 1024]."
)
@click.option(
    "--max-model-len",
    default=None,
    type=click.IntRange(min=16),
    help="Engine context [default: 4096, or the target's own if shorter].",
)
@click.option(
    "--chat-template",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="A Jinja chat template file to use instead of the target's own.",
)
@click.option("--engine-kwargs", default=None, help="JSON object of extra vllm.LLM arguments.")
@click.option("--progress/--no-progress", default=True, show_default=True)
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

    from spec_datagen.conversations import write_rows
    from spec_datagen.regenerate import Regenerator, RegenStats, RegenSummary, default_sampling
    from spec_datagen.runtime import make_llm, shutdown_llm
    from spec_datagen.synth import (
        TOPIC_SYSTEM,
        SynthOptions,
        SynthStats,
        read_topics,
        report_lines,
        synthesize_with_progress,
        user_turn_prefix,
    )
    from spec_datagen.template import ChatRenderer

    if Path(out).exists():
        raise click.UsageError(f"{out} already exists; remove it or pass another --out")
    Path(out).parent.mkdir(parents=True, exist_ok=True)  # now, not after minutes of generation
    template_text = Path(chat_template).read_text() if chat_template else None
    renderer = ChatRenderer.for_model(target, template_text)
    topic_list = read_topics(topics) if topics else None
    opener_list = read_topics(openers, "opener") if openers else None
    # A template that cannot seed topics, or none at all, is refused before the engine starts (a minute).
    user_turn_prefix(renderer, TOPIC_SYSTEM.format(topic=topic_list[0]) if topic_list else None)
    options = SynthOptions(
        seed=seed,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        min_words=min_words,
        max_words=max_words,
        near_dup=near_dup,
        max_attempts=max_attempts,
    )
    llm = make_llm(
        target,
        max_model_len=max_model_len or _default_context(target),
        **_parse_json(engine_kwargs, "--engine-kwargs"),
    )
    try:
        stats = SynthStats()
        convs = synthesize_with_progress(
            llm,
            renderer,
            n,
            options=options,
            topics=topic_list,
            openers=opener_list,
            stats=stats,
            progress=progress,
        )
        prompts = list(convs)
        reply_lines: list[str] = []
        if respond and convs:
            import time

            regen = Regenerator(
                target,
                llm=llm,
                chat_template=template_text,
                sampling=default_sampling(
                    target, temperature=reply_temperature, max_tokens=reply_max_tokens, seed=seed
                ),
            )
            rstats = RegenStats()
            t0 = time.perf_counter()
            from tqdm import tqdm

            replies = regen.regenerate(convs, stats=rstats)
            convs = list(tqdm(replies, total=len(convs), desc="replies", unit="conv", disable=not progress,
                              file=sys.stderr))  # fmt: skip
            reply_lines = RegenSummary(
                rstats, time.perf_counter() - t0, 0, regen.sampling.describe(), out
            ).lines()
    finally:
        shutdown_llm(llm)
    write_rows(out, convs)
    for line in report_lines(stats, prompts) + reply_lines:
        click.echo(line)
    click.echo(f"written: {len(convs)} rows to {out}")
    if len(convs) < n:
        raise click.ClickException(
            f"only {len(convs)} of {n} prompts passed the filters in {stats.attempts} attempts (see 'rejected' above); "
            "raise --max-attempts or --temperature, or loosen --near-dup/--min-words"
        )
