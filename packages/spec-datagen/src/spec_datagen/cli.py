"""`spec` subcommands contributed by spec-datagen."""

from __future__ import annotations

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
    "0 = embeddings, L = last layer before the final norm). Default: EAGLE-3's 2,L/2,L-3,L.",
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
    from spec_format.fingerprint import default_eagle3_layers, read_model_config

    layer_ids = _parse_layers(layers)
    template_kwargs = _parse_json(chat_template_kwargs, "--chat-template-kwargs")
    extra_engine = _parse_json(engine_kwargs, "--engine-kwargs")
    n = read_model_config(target)["num_hidden_layers"]
    # Validated before the engine starts (a minute) so that a typo fails at once.
    layer_ids = validate_layer_ids(layer_ids or default_eagle3_layers(n), n)
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
