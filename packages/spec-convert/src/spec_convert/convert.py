"""Conversions as functions: detect a source layout, convert it into a spec-format checkpoint (checked by
spec-format's validator before it appears), or export one to the SafeAILab/SGLang layout."""

from __future__ import annotations

import json
from pathlib import Path

from spec_convert import dflash, eagle3, modelopt, specforge, speculators
from spec_convert.build import Converted, Options
from spec_convert.output import check_out, staged_dir
from spec_convert.source import Source, is_torch_source, read_source
from spec_convert.strict import ConversionError
from spec_convert.target import read_target
from spec_convert.to_eagle3 import eagle3_layout, write_eagle3
from spec_format.checkpoint import read_checkpoint, write_checkpoint
from spec_format.errors import SpecError
from spec_format.tensors import tensor_dtypes
from spec_format.validate import validate_checkpoint

FORMATS = {m.NAME: m for m in (eagle3, specforge, modelopt, speculators, dflash)}


def detect_format(src: Source) -> tuple[str, str]:
    """(format, why) from the files alone; a SpecError when no known layout fits."""
    cfg = src.config
    if cfg.get("speculators_model_type") == "dflash":
        return "dflash", "config.json has speculators_model_type dflash"
    if isinstance(cfg.get("dflash_config"), dict) or "DFlashDraftModel" in (cfg.get("architectures") or []):
        return "dflash", "config.json has z-lab's dflash_config / DFlashDraftModel"
    if "speculators_config" in cfg or "speculators_model_type" in cfg:
        return "speculators", "config.json has speculators_config"
    midlayer = any(n.startswith("midlayer.") for n in src.tensors)
    if midlayer and is_torch_source(src):
        return "eagle3", "midlayer.* tensors in a torch .bin (what SafeAILab's DeepSpeed training saves)"
    if midlayer:
        return "specforge", (
            "midlayer.* tensors in safetensors (what SpecForge's save_pretrained writes; SafeAILab's trainer "
            "writes .bin; pass --from eagle3 for the EAGLE code's conventions)"
        )
    ec = cfg.get("eagle_config")
    if (
        isinstance(ec, dict)
        and "use_aux_hidden_state" in ec
        and any(n.startswith("layers.") for n in src.tensors)
    ):
        return "modelopt", "layers.* tensors with ModelOpt's eagle_config (use_aux_hidden_state, ...)"
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


def export_to_eagle3(
    src_dir: str | Path, out: str | Path, verifier: str | Path | None = None, force: bool = False
) -> list[str]:
    """Export a spec-format checkpoint; returns the notes for the user."""
    out = Path(out)
    check_out(out, force)
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
        num_layers = cfg.spec.verifier.num_hidden_layers
    elif verifier is not None:
        num_layers = read_target(verifier).num_layers
    else:
        raise SpecError(
            f"{src_dir}: the checkpoint records no verifier fingerprint; pass --verifier so the layer ids can be checked"
        )
    stored = {
        d for d in tensor_dtypes(Path(src_dir) / "model.safetensors").values() if d in ("F16", "BF16", "F32")
    }
    float_dtype = (
        {"F16": "float16", "BF16": "bfloat16"}.get(stored.pop(), "float32") if len(stored) == 1 else "float32"
    )
    config, out_tensors, notes = eagle3_layout(cfg, tensors, float_dtype, num_layers)
    with staged_dir(out, force) as tmp:
        write_eagle3(tmp, config, out_tensors, float_dtype)
    return notes


def export_to_zlab(
    src_dir: str | Path, out: str | Path, verifier: str | Path | None = None, force: bool = False
) -> None:
    """Export a spec-format DFlash checkpoint to z-lab's DFlashDraftModel layout (dflash.zlab_layout)."""
    out = Path(out)
    check_out(out, force)
    report = validate_checkpoint(src_dir, verifier)
    if not report.ok:
        raise ConversionError(report.errors)
    cfg, tensors = read_checkpoint(src_dir)
    if cfg.algorithm != "dflash":
        raise SpecError(f"{src_dir}: a '{cfg.algorithm}' checkpoint; --to zlab exports DFlash drafts")
    if cfg.spec is not None and cfg.spec.verifier is not None:
        num_layers = cfg.spec.verifier.num_hidden_layers
    elif verifier is not None:
        num_layers = read_target(verifier).num_layers
    else:
        raise SpecError(f"{src_dir}: the checkpoint records no verifier fingerprint; pass --verifier")
    config, out_tensors = dflash.zlab_layout(cfg, tensors, num_layers)
    with staged_dir(out, force) as tmp:
        write_eagle3(tmp, config, out_tensors, "bfloat16")


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
