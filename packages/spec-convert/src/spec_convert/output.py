"""The output directory appears complete or not at all: files are written into a temporary sibling, checked,
and renamed into place. A non-empty --out is replaced only with --force."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from spec_convert.strict import ConversionError
from spec_convert.target import read_target
from spec_format.checkpoint import SpeculatorConfig, read_checkpoint
from spec_format.errors import SpecError
from spec_format.validate import validate_checkpoint


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


@dataclass(frozen=True)
class Export:
    """`spec convert --to NAME`: write(src_dir, cfg, tensors, num_target_layers, out, force) -> notes."""

    write: Callable[..., list[str]]
    what: str  # for the user: "z-lab's DFlashDraftModel layout"


def read_spec_checkpoint(
    src_dir: str | Path, verifier: str | Path | None
) -> tuple[SpeculatorConfig, dict, int]:
    """(config, tensors, the verifier's layer count) of a valid spec-format checkpoint to export."""
    try:
        raw = json.loads((Path(src_dir) / "config.json").read_text())
    except (OSError, ValueError):
        raw = {}  # validate_checkpoint below names the problem
    if isinstance(raw, dict) and raw and "speculators_config" not in raw:
        raise SpecError(
            f"{src_dir}: not a spec-format checkpoint (its config.json has no speculators_config); convert it "
            "first with spec convert SRC --verifier DIR --out DIR, then export that directory"
        )
    report = validate_checkpoint(src_dir, verifier)
    if not report.ok:
        raise ConversionError(report.errors)
    cfg, tensors = read_checkpoint(src_dir)
    if cfg.spec is not None and cfg.spec.verifier is not None:
        return cfg, tensors, cfg.spec.verifier.num_hidden_layers
    if verifier is not None:
        return cfg, tensors, read_target(verifier).num_layers
    raise SpecError(
        f"{src_dir}: the checkpoint records no verifier fingerprint; pass --verifier so the layer ids can be checked"
    )
