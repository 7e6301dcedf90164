"""`spec` subcommands contributed by spec-datagen."""

from __future__ import annotations

import click


@click.command("demo-model")
@click.option("--cache-dir", type=click.Path(), default=None, help="Where to keep the converted model.")
def demo_model(cache_dir: str | None) -> None:
    """Build (once) and print the path of the SmolLM2-135M-Instruct demo target."""
    from spec_datagen.demo_model import demo_model_dir

    click.echo(str(demo_model_dir(cache_dir)))


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
