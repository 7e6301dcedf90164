"""The verifier a draft runs with: its config.json and fingerprint (read from the directory alone)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from spec_format.fingerprint import TargetInfo, fingerprint_model_dir, read_model_config


class Target(msgspec.Struct):
    """The verifier the draft runs with: its config.json and fingerprint."""

    dir: Path
    config: dict[str, Any]
    info: TargetInfo

    @property
    def num_layers(self) -> int:
        return self.info.num_hidden_layers


def read_target(verifier_dir: str | Path, name: str | None = None) -> Target:
    """`name` is what the output records as the verifier (default: the directory's absolute path)."""
    d = Path(verifier_dir)
    return Target(dir=d, config=read_model_config(d), info=fingerprint_model_dir(d, name_or_path=name))
