"""Lines for the user while a command runs."""

from __future__ import annotations

import sys


def say(msg: str, tag: str | None = None) -> None:
    """Progress or a warning on stderr (stdout carries a command's results), flushed at once so that it
    interleaves with progress bars and subprocess output; `tag` names the speaker: "[tag] msg"."""
    print(f"[{tag}] {msg}" if tag else msg, file=sys.stderr, flush=True)
