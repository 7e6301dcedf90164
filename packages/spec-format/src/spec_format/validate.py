"""Strict validation of a speculator checkpoint: every problem is one line naming the file, the field or
tensor, what was expected and what was found."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np

from spec_format.algorithms import layout_for
from spec_format.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    SpeculatorConfig,
    read_config,
    weights_problem,
)
from spec_format.errors import SpecError
from spec_format.fingerprint import fingerprint_model_dir, read_model_config
from spec_format.tensors import load_tensors, read_header
from spec_format.vocab import vocab_mapping_problems


class Report(msgspec.Struct):
    errors: list[str] = []
    warnings: list[str] = []

    @property
    def ok(self) -> bool:
        return not self.errors


def _shape(s) -> str:
    return "[" + ", ".join(str(int(x)) for x in s) + "]"


def check_tensors(cfg: SpeculatorConfig, weights: Path, config_source: str) -> list[str]:
    """Names, shapes, dtypes and values of the weights against the algorithm's layout."""
    layout = layout_for(cfg, config_source)
    header, _, _ = read_header(weights)
    errors = []
    for name in sorted(set(layout.required) - set(header)):
        errors.append(f"{weights}: missing tensor '{name}' (expected shape {_shape(layout.required[name])})")
    known = {**layout.optional, **layout.required}
    for name in sorted(set(header) & set(layout.forbidden)):
        errors.append(f"{weights}: tensor '{name}' must be absent: {layout.forbidden[name]}")
    for name in sorted(set(header) - set(known) - set(layout.forbidden)):
        errors.append(
            f"{weights}: unknown tensor '{name}' {_shape(header[name]['shape'])} for algorithm '{cfg.algorithm}'"
        )
    for name in sorted(set(header) & set(known)):
        found, want = tuple(header[name]["shape"]), tuple(known[name])
        if found != want:
            errors.append(f"{weights}: tensor '{name}': expected shape {_shape(want)}, found {_shape(found)}")
        dtype = header[name]["dtype"]
        want_dtype = layout.dtypes.get(name)
        if want_dtype and dtype != want_dtype:
            errors.append(f"{weights}: tensor '{name}': expected dtype {want_dtype}, found {dtype}")
        elif not want_dtype and dtype not in ("F32", "F16", "BF16"):
            errors.append(f"{weights}: tensor '{name}': expected a floating-point dtype, found {dtype}")
    if errors:
        return errors
    tensors = load_tensors(weights)
    for name, arr in sorted(tensors.items()):
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            errors.append(f"{weights}: tensor '{name}' holds {bad} NaN/Inf values")
    if "d2t" in tensors:
        target_vocab = int(cfg.transformer_layer_config["vocab_size"])
        errors += [
            f"{weights}: {p}"
            for p in vocab_mapping_problems(tensors["d2t"], tensors.get("t2d"), target_vocab)
        ]
    return errors


def check_verifier(
    cfg: SpeculatorConfig, verifier_dir: Path, config_source: str
) -> tuple[list[str], list[str]]:
    """The draft fits the verifier: hidden size, vocabulary, layer ids, and the recorded fingerprint."""
    errors, warnings = [], []
    vcfg = read_model_config(verifier_dir)
    where = f"{verifier_dir}/config.json"
    lc = cfg.transformer_layer_config
    target_h = cfg.target_hidden_size or lc.get("hidden_size")
    if vcfg.get("hidden_size") != target_h:
        errors.append(
            f"{config_source}: target hidden size {target_h} does not match the verifier's hidden_size {vcfg.get('hidden_size')} ({where})"
        )
    if vcfg.get("vocab_size") != lc.get("vocab_size"):
        errors.append(
            f"{config_source}: field 'transformer_layer_config.vocab_size' is {lc.get('vocab_size')}, the verifier's vocab_size is {vcfg.get('vocab_size')} ({where})"
        )
    n_layers = vcfg.get("num_hidden_layers")
    field = (
        "eagle_aux_hidden_state_layer_ids"
        if cfg.eagle_aux_hidden_state_layer_ids
        else "aux_hidden_state_layer_ids"
    )
    for layer in cfg.aux_layer_ids:
        if isinstance(n_layers, int) and not 0 <= layer <= n_layers:
            errors.append(
                f"{config_source}: field '{field}' holds {layer}, outside [0, {n_layers}] for a {n_layers}-layer verifier"
            )
    recorded = cfg.spec.verifier if cfg.spec else None
    if recorded is not None and not errors:
        actual = fingerprint_model_dir(verifier_dir)
        for diff in recorded.mismatches(actual):
            field = diff.split(":", 1)[0]
            line = f"{config_source}: verifier fingerprint differs from {verifier_dir}: {diff}"
            (warnings if field in ("config_sha256", "tokenizer_sha256") else errors).append(line)
    return errors, warnings


def validate_checkpoint(path: str | Path, verifier: str | Path | None = None) -> Report:
    """All problems of a checkpoint directory (and its fit to a verifier directory, when given)."""
    path = Path(path)
    source = str(path / CONFIG_NAME)
    try:
        cfg, warnings = read_config(path)
    except SpecError as e:
        return Report(errors=[str(e)])
    report = Report(warnings=list(warnings))
    weights = path / WEIGHTS_NAME
    if problem := weights_problem(path, cfg):
        return Report(errors=[problem], warnings=report.warnings)
    try:
        report.errors += check_tensors(cfg, weights, source)
        if verifier is not None:
            errors, warnings = check_verifier(cfg, Path(verifier), source)
            report.errors += errors
            report.warnings += warnings
    except SpecError as e:
        report.errors.append(str(e))
    return report


def describe_checkpoint(path: str | Path) -> dict:
    """A summary for `spec inspect`: algorithm, k, layers, vocabularies, parameters, verifier."""
    path = Path(path)
    cfg, _ = read_config(path)
    header, _, _ = read_header(path / WEIGHTS_NAME)
    params = sum(
        int(np.prod(info["shape"], dtype=np.int64))
        for info in header.values()
        if info["dtype"] in ("F32", "F16", "BF16")
    )
    embed = header.get("embed_tokens.weight")
    lc = cfg.transformer_layer_config
    return {
        "path": str(path),
        "algorithm": cfg.algorithm,
        "speculative_tokens": cfg.speculative_tokens,
        "draft_layers": lc.get("num_hidden_layers", 1),
        "layer_type": lc.get("model_type"),
        "hidden_size": lc.get("hidden_size"),
        "aux_layer_ids": cfg.aux_layer_ids,
        "draft_vocab_size": cfg.draft_vocab_size or lc.get("vocab_size"),
        "target_vocab_size": lc.get("vocab_size"),
        "parameters": params,
        "parameters_without_embeddings": params - (int(np.prod(embed["shape"])) if embed else 0),
        "dtype": sorted({info["dtype"] for info in header.values()}),
        "verifier": cfg.verifier_name,
        "verifier_fingerprint": msgspec.to_builtins(cfg.spec.verifier)
        if cfg.spec and cfg.spec.verifier
        else None,
        "format_version": cfg.spec.format_version if cfg.spec else None,
        "provenance": cfg.spec.provenance if cfg.spec else None,
    }
