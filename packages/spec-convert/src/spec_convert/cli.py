"""`spec convert`: external drafts into the spec format (strictly), and spec-format drafts out to the
SafeAILab/SGLang EAGLE-3 layout."""

from __future__ import annotations

from pathlib import Path

import click

SOURCES = ("auto", "eagle3", "specforge", "modelopt", "speculators", "dflash")


def _layers(_ctx, _param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(x) for x in value.replace(",", " ").split()]
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a list of layer ids such as 2,16,29") from None


@click.command("convert")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--from",
    "fmt",
    type=click.Choice(SOURCES),
    default="auto",
    show_default=True,
    help="Source layout: eagle3 (SafeAILab EAGLE-3), specforge, modelopt, speculators (older directories), dflash (z-lab DFlashDraftModel or speculators dflash).",
)
@click.option(
    "--to",
    "to",
    type=click.Choice(["spec", "eagle3", "zlab"]),
    default="spec",
    show_default=True,
    help="spec: the format vLLM serves; eagle3: export a spec-format SRC to the SafeAILab/SGLang layout; "
    "zlab: export a spec-format DFlash SRC to z-lab's DFlashDraftModel layout.",
)
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
    callback=_layers,
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
    from spec_convert.convert import convert_to_spec, export_to_eagle3, export_to_zlab, summary
    from spec_convert.strict import ConversionError

    try:
        if to == "eagle3":
            if fmt != "auto" or k is not None or layers is not None or verifier_name is not None:
                raise click.UsageError(
                    "--to eagle3 exports a spec-format SRC as it is; convert other layouts to the spec format "
                    "first (--from/--k/--layers/--verifier-name do not apply)"
                )
            notes = export_to_eagle3(src, out, verifier, force)
            click.echo(f"exported {src} -> {out} (SafeAILab/SGLang EAGLE-3 layout)")
            for line in notes:
                click.echo(f"  note: {line}")
            return
        if to == "zlab":
            export_to_zlab(src, out, verifier, force)
            click.echo(f"exported {src} -> {out} (z-lab DFlashDraftModel layout)")
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
