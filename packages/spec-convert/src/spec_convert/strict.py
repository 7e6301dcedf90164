"""Strict tensor mapping: every source tensor is renamed into the format or dropped for a stated reason,
every tensor the format requires is produced, and every shape and dtype matches what the config and the
verifier imply. Anything else is a problem line naming the source tensor and its target name; a
conversion with problems writes nothing.

Converters that "warn about missing weights" and then save randomly initialised tensors produce drafts
whose acceptance is near zero, silently. Nothing here is ever filled in.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import msgspec
import numpy as np

from spec_format.algorithms import Layout
from spec_format.errors import SpecError


class ConversionError(SpecError):
    """All problems of one conversion; the CLI prints one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(problems[0] + more)


class Mapped(msgspec.Struct):
    tensors: dict[str, np.ndarray]  # format name -> array
    origin: dict[str, str]  # format name -> source name (or how it was derived)
    dropped: dict[str, str]  # source name -> reason
    problems: list[str]


def _shape(s) -> str:
    return "[" + ", ".join(str(int(x)) for x in s) + "]"


def map_tensors(
    tensors: dict[str, np.ndarray],
    rename: Callable[[str], str],
    drops: list[tuple[str, str]],
) -> Mapped:
    """Apply `drops` (regex on the source name, reason) and `rename` to every source tensor."""
    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    dropped: dict[str, str] = {}
    problems: list[str] = []
    for name in sorted(tensors):
        reason = next((r for pattern, r in drops if re.fullmatch(pattern, name)), None)
        if reason is not None:
            dropped[name] = reason
            continue
        new = rename(name)
        if new in out:
            problems.append(f"tensors '{origin[new]}' and '{name}' both map to '{new}'")
            continue
        out[new] = tensors[name]
        origin[new] = name
    return Mapped(out, origin, dropped, problems)


def _label(m: Mapped, name: str) -> str:
    src = m.origin.get(name, name)
    return f"'{src}'" if src == name else f"'{src}' (-> '{name}')"


def check_layout(
    m: Mapped, layout: Layout, what: str, source_name: Callable[[str], str] = lambda name: name
) -> list[str]:
    """Unknown, missing, mis-shaped and mis-typed tensors of `m` against the format's layout.
    `source_name` gives the name a missing tensor has in the source layout."""
    problems = list(m.problems)
    known = {**layout.optional, **layout.required}
    for name in sorted(set(m.tensors) - set(known)):
        problems.append(
            f"unknown tensor {_label(m, name)} {_shape(m.tensors[name].shape)}: not part of {what}"
        )
    for name in sorted(set(layout.required) - set(m.tensors)):
        src, shape = source_name(name), _shape(layout.required[name])
        label = f"'{src}' (shape {shape})" if src == name else f"'{src}' (-> '{name}', shape {shape})"
        problems.append(f"missing tensor {label} in {what}")
    for name in sorted(set(m.tensors) & set(known)):
        arr, want = m.tensors[name], tuple(known[name])
        if tuple(arr.shape) != want:
            problems.append(
                f"tensor {_label(m, name)}: expected shape {_shape(want)}, found {_shape(arr.shape)}"
            )
        kind = layout.dtypes.get(name)
        if kind == "I64" and arr.dtype.kind not in "iu":
            problems.append(f"tensor {_label(m, name)}: expected integer ids, found {arr.dtype}")
        elif kind == "BOOL" and arr.dtype != np.bool_ and arr.dtype.kind not in "iu":
            problems.append(f"tensor {_label(m, name)}: expected a boolean mask, found {arr.dtype}")
        elif kind is None and arr.dtype.kind != "f":
            problems.append(f"tensor {_label(m, name)}: expected floating-point weights, found {arr.dtype}")
        elif kind is None and not np.isfinite(arr).all():
            problems.append(
                f"tensor {_label(m, name)}: holds {int((~np.isfinite(arr)).sum())} NaN/Inf values"
            )
    return problems
