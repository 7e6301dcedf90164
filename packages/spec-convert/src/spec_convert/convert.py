"""Conversions as functions: detect a source layout, convert it into a spec-format checkpoint (checked by
spec-format's validator before it appears), or export one to another layout. The layouts live in their
own modules (MODULES); nothing here names one."""

from __future__ import annotations

from pathlib import Path

from spec_convert import dflash, eagle3, modelopt, specforge, speculators, to_eagle3
from spec_convert.build import Converted, Options
from spec_convert.output import Export, check_out, read_spec_checkpoint, staged_dir
from spec_convert.source import Source, read_source
from spec_convert.strict import ConversionError
from spec_convert.target import read_target
from spec_format.checkpoint import write_checkpoint
from spec_format.errors import SpecError
from spec_format.validate import validate_checkpoint

# Every layout module: a source layout has NAME, detect(src) -> why | None and convert(src, target, options);
# an exporting one has EXPORTS {--to name: Export}. Detection asks them in this order (a module's detect
# may assume that those before it did not match): the one list a new layout adds to.
MODULES = (dflash, speculators, eagle3, specforge, modelopt, to_eagle3)
FORMATS = {m.NAME: m for m in MODULES if hasattr(m, "convert")}
EXPORTS: dict[str, Export] = {name: e for m in MODULES for name, e in getattr(m, "EXPORTS", {}).items()}


def detect_format(src: Source) -> tuple[str, str]:
    """(format, why) from the files alone; a SpecError when no known layout fits."""
    for name, module in FORMATS.items():
        why = module.detect(src)
        if why:
            return name, why
    raise SpecError(
        f"{src.path}: not a draft layout spec convert knows (no speculators_config, no midlayer.* tensors, "
        f"no ModelOpt eagle_config); pass --from one of {', '.join(FORMATS)}"
    )


def convert_source(
    src_dir: str | Path,
    verifier: str | Path,
    fmt: str = "auto",
    options: Options | None = None,
    verifier_name: str | None = None,
) -> tuple[Converted, str, str]:
    """(converted draft, format, why that format) in memory; nothing is written."""
    src = read_source(src_dir)
    why = "--from"
    if fmt == "auto":
        fmt, why = detect_format(src)
    if fmt not in FORMATS:
        raise SpecError(f"unknown source format '{fmt}'; choose one of {', '.join(FORMATS)}")
    target = read_target(verifier, verifier_name)
    return FORMATS[fmt].convert(src, target, options or Options()), fmt, why


def write_spec(converted: Converted, out: Path, verifier: str | Path, force: bool = False) -> Path:
    """Write the checkpoint and run spec-format's validator (with the verifier) before it becomes `out`."""
    with staged_dir(Path(out), force) as tmp:
        write_checkpoint(tmp, converted.config, converted.tensors, float_dtype=converted.float_dtype)
        report = validate_checkpoint(tmp, verifier)
        if not report.ok:
            raise ConversionError([e.replace(str(tmp), str(out)) for e in report.errors])
    return Path(out)


def convert_to_spec(
    src_dir: str | Path,
    out: str | Path,
    verifier: str | Path,
    fmt: str = "auto",
    options: Options | None = None,
    verifier_name: str | None = None,
    force: bool = False,
) -> tuple[Converted, str, str]:
    check_out(Path(out), force)
    converted, fmt, why = convert_source(src_dir, verifier, fmt, options, verifier_name)
    write_spec(converted, Path(out), verifier, force)
    return converted, fmt, why


def export(
    src_dir: str | Path, out: str | Path, to: str, verifier: str | Path | None = None, force: bool = False
) -> list[str]:
    """Export a valid spec-format checkpoint to the layout EXPORTS[to]; returns the notes for the user."""
    out = Path(out)
    check_out(out, force)
    cfg, tensors, num_layers = read_spec_checkpoint(src_dir, verifier)
    return EXPORTS[to].write(Path(src_dir), cfg, tensors, num_layers, out, force)


def summary(converted: Converted) -> list[str]:
    """What the user should know about a conversion, one line each."""
    prov = converted.config.spec.provenance if converted.config.spec else {}
    lines = [
        f"layer ids {prov['layer_ids']['value']} (vLLM capture ids): {prov['layer_ids']['from']}",
        f"d2t: {prov['vocab'].get('d2t', 'none')}",
        f"speculative tokens: {prov['speculative_tokens']}",
        f"weights: {prov['dtype']}",
    ]
    if "t2d" in prov["vocab"]:
        lines.append(f"t2d: {prov['vocab']['t2d']}")
    by_reason: dict[str, list[str]] = {}
    for name, reason in prov["dropped"].items():
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        lines.append(f"dropped {shown}: {reason}")
    return lines + [f"note: {n}" for n in converted.notes]
