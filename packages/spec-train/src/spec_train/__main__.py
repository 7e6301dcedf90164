"""`python -m spec_train DATASET ...` is `spec train DATASET ...`: the entry point torchrun starts."""

import sys

import click

from spec_format.errors import SpecError
from spec_train.cli import train_command

if __name__ == "__main__":
    try:
        train_command.main(prog_name="python -m spec_train", standalone_mode=False)
    except SpecError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
