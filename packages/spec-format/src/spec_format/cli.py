"""The `spec` command: one click group; every installed package adds subcommands.

A package registers a subcommand through the `spec.commands` entry-point group, e.g. in its pyproject:

    [project.entry-points."spec.commands"]
    datagen = "spec_datagen.cli:datagen"

Subcommand modules import their heavy dependencies (torch, vllm) inside the command function, so
`spec --help` stays fast and works where only spec-format is installed.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path

import click

from spec_format.errors import SpecError

ENTRY_POINT_GROUP = "spec.commands"
PACKAGES = ("spec-format", "spec-datagen", "spec-models", "spec-train", "spec-convert")


def comma_list(value: str, kind: type = int) -> list:
    """ "2,15,27" (or "2, 15, 27", "2 15 27") -> [kind(v), ...]; ValueError on anything else."""
    return [kind(v) for v in re.split(r"[,\s]+", value.strip()) if v]


def comma_separated(kind: type, example: str):
    """A click option callback for subcommands: "2,15,27" -> [kind(v), ...] (None when not given); anything
    else is a usage error that shows `example`."""
    noun = "integers" if kind is int else "numbers"

    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> list | None:
        if value is None:
            return None
        try:
            return comma_list(value, kind)
        except ValueError:
            raise click.BadParameter(f"{value!r}: give comma-separated {noun}, e.g. {example}") from None

    return parse


def installed_versions() -> dict[str, str]:
    """Versions of the spec packages installed in this environment."""
    found = {}
    for name in PACKAGES:
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def _print_versions(ctx: click.Context, _param, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    for name, v in installed_versions().items():
        click.echo(f"{name} {v}")
    ctx.exit()


class _PluginGroup(click.Group):
    """Lists and loads subcommands from the `spec.commands` entry points on demand."""

    def _entry_points(self) -> dict:
        return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._entry_points()))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        cmd = super().get_command(ctx, name)
        if cmd is not None:
            return cmd
        ep = self._entry_points().get(name)
        return ep.load() if ep is not None else None


@click.group(cls=_PluginGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_versions,
    help="Print the version of every installed spec package and exit.",
)
def cli() -> None:
    """Train and serve speculative-decoding drafts for vLLM."""


def main() -> None:
    """Console entry point: a SpecError anywhere becomes one line on stderr and exit code 1."""
    try:
        # Without standalone mode click returns (not raises) the code of a `click.exceptions.Exit`.
        rc = cli.main(standalone_mode=False)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except SpecError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


def _kind(path: Path) -> str:
    """'checkpoint' or 'dataset', decided by the files the directory holds."""
    from spec_format.checkpoint import is_checkpoint_dir

    if (path / "manifest.json").is_file():
        return "dataset"
    if is_checkpoint_dir(path):
        return "checkpoint"
    raise SpecError(
        f"{path}: neither a speculator checkpoint (config.json with speculators_config) nor a dataset (manifest.json)"
    )


@click.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--verifier",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Also check the fit to this target model directory.",
)
@click.option("--deep", is_flag=True, help="Datasets: verify every shard checksum.")
@click.option(
    "--reseal",
    is_flag=True,
    help="Checkpoints: after a deliberate edit of config.json (or model.safetensors), record their "
    "checksums as they are now, then validate.",
)
def validate(path: Path, verifier: Path | None, deep: bool, reseal: bool) -> None:
    """Validate a speculator checkpoint or a dataset directory (exit 1 with one line per problem)."""
    if reseal and _kind(path) != "dataset":
        from spec_format.checkpoint import reseal_checkpoint

        reseal_checkpoint(path)
    if _kind(path) == "dataset":
        from spec_format.dataset import validate_dataset

        errors, warnings = validate_dataset(path, deep=deep), []
    else:
        from spec_format.validate import validate_checkpoint

        report = validate_checkpoint(path, verifier)
        errors, warnings = report.errors, report.warnings
    for line in warnings:
        click.echo(f"warning: {line}", err=True)
    for line in errors:
        click.echo(f"error: {line}", err=True)
    if errors:
        raise click.exceptions.Exit(1)
    click.echo(f"{path}: valid {_kind(path)}")


@click.command("inspect")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect_cmd(path: Path, as_json: bool) -> None:
    """Summarise a speculator checkpoint or a dataset directory."""
    if _kind(path) == "dataset":
        from spec_format.dataset import describe_dataset

        info = describe_dataset(path)
    else:
        from spec_format.validate import describe_checkpoint

        info = describe_checkpoint(path)
    if as_json:
        click.echo(json.dumps(info))
        return
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        click.echo(f"{key:>30}: {value}")
