"""`spec` subcommands contributed by spec-datagen."""

from __future__ import annotations

import click


@click.command("demo-model")
@click.option("--cache-dir", type=click.Path(), default=None, help="Where to keep the converted model.")
def demo_model(cache_dir: str | None) -> None:
    """Build (once) and print the path of the SmolLM2-135M-Instruct demo target."""
    from spec_datagen.demo_model import demo_model_dir

    click.echo(str(demo_model_dir(cache_dir)))
