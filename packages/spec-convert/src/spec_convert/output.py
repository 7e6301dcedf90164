"""The output directory appears complete or not at all: files are written into a temporary sibling, checked,
and renamed into place. A non-empty --out is replaced only with --force."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from spec_format.errors import SpecError


def check_out(out: Path, force: bool) -> None:
    """Refuse before any work is done rather than after."""
    if out.exists() and not out.is_dir():
        raise SpecError(f"{out}: exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise SpecError(f"{out}: not empty; choose another --out or pass --force to replace it")


@contextlib.contextmanager
def staged_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yields an empty temporary directory next to `out`; on success it becomes `out`, on any error it is
    removed and `out` is left as it was."""
    check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        check_out(out, force)  # someone may have written there meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)
