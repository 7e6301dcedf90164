"""`spec convert`: external drafts into the spec format (strictly), and spec-format drafts out to other
layouts (spec_convert.convert.FORMATS and EXPORTS: the choices below are read from them)."""

from __future__ import annotations

from pathlib import Path

import click

from spec_convert.convert import EXPORTS, FORMATS
from spec_format.cli import comma_separated


@click.command("convert")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--from", "fmt", type=click.Choice(["auto", *FORMATS]), default="auto", show_default=True,
              help="Source layout: " + "; ".join(f"{name}: {m.WHAT}" for name, m in FORMATS.items()) + ".")  # fmt: skip
@click.option("--to", "to", type=click.Choice(["spec", *EXPORTS]), default="spec", show_default=True,
              help="spec: the format vLLM serves; " + "; ".join(f"{name}: export a spec-format SRC to the {e.what}"
                                                             for name, e in EXPORTS.items()) + ".")  # fmt: skip
@click.option(
    "--verifier",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The target model directory (config.json, tokenizer): sizes, vocabulary, layer count, fingerprint.",
)
@click.option(
    "--verifier-name", help="Record this name (e.g. a Hub id) as the verifier instead of the --verifier path."
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option(
    "--k", type=click.IntRange(min=1), help="Speculative tokens per step (default: the source's, else 3)."
)
@click.option(
    "--layers",
    callback=comma_separated(int, "2,16,29"),
    help="Auxiliary verifier layers as vLLM capture ids (id k = the state entering decoder layer k), e.g. 2,16,29.",
)
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
def convert(
    src: Path,
    fmt: str,
    to: str,
    verifier: Path | None,
    verifier_name: str | None,
    out: Path,
    k: int | None,
    layers: list[int] | None,
    force: bool,
) -> None:
    """Convert the draft in SRC. Every source tensor is mapped or dropped for a stated reason, every tensor
    the format needs must be there with the shape the verifier implies; otherwise nothing is written and
    each problem is printed on its own line."""
    from spec_convert.build import Options
    from spec_convert.convert import convert_to_spec, export, summary
    from spec_convert.strict import ConversionError

    try:
        if to != "spec":
            if fmt != "auto" or k is not None or layers is not None or verifier_name is not None:
                raise click.UsageError(
                    f"--to {to} exports a spec-format SRC as it is; convert other layouts to the spec format "
                    "first (--from/--k/--layers/--verifier-name do not apply)"
                )
            notes = export(src, out, to, verifier, force)
            click.echo(f"exported {src} -> {out} ({EXPORTS[to].what})")
            for line in notes:
                click.echo(f"  note: {line}")
            return
        if verifier is None:
            raise click.UsageError("--verifier is required: the draft's shapes are checked against it")
        converted, fmt, why = convert_to_spec(
            src, out, verifier, fmt, Options(k=k, layers=layers), verifier_name, force
        )
    except ConversionError as e:
        for line in e.problems:
            click.echo(f"error: {line}", err=True)
        click.echo(f"error: {src}: not converted ({len(e.problems)} problems); nothing was written", err=True)
        raise click.exceptions.Exit(1) from None
    click.echo(f"converted {src} ({fmt}: {why}) -> {out}")
    for line in summary(converted):
        click.echo(f"  {line}")
    click.echo(f"{out}: valid checkpoint")
