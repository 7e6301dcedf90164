"""`python -m spec_format ...` is the `spec` command."""

from spec_format.cli import main

main()
