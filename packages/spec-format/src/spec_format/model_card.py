"""The draft directory's README.md: a Hugging Face model card written from what the directory records.

Every figure comes from JSON, never typed: what the draft is from its config.json; what it was trained on
(data, rows, tokens, steps, wall time, hardware, vocabulary coverage) from the provenance `spec train`
writes into that config (`spec.provenance`); its measured table from `spec eval`'s report. `spec train`
writes the card whenever it updates RUN/final and RUN/best; `spec eval` rewrites it with the measurements.
vLLM and `spec validate` ignore the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from spec_format.algorithms import vllm_speculative_config
from spec_format.checkpoint import SpeculatorConfig, read_config

CARD = "README.md"
NAMES = {"eagle3": "EAGLE-3", "peagle": "P-EAGLE", "dflash": "DFlash"}


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _front_matter(cfg: SpeculatorConfig) -> list[str]:
    base = cfg.verifier_name
    local = base.startswith(("/", ".", "~")) or Path(base).exists()
    note = "  # a local path: put the verifier's Hub id here before uploading" if local else ""
    algo = cfg.speculators_model_type
    return [
        "---",
        f"base_model: {json.dumps(base)}{note}",
        "library_name: vllm",
        "pipeline_tag: text-generation",
        "tags:",
        *(f"- {t}" for t in ("speculative-decoding", algo, "draft-model", "speculators", "spec")),
        "---",
        "",
    ]


def _what(cfg: SpeculatorConfig, prov: dict) -> list[str]:
    layer = cfg.transformer_layer_config
    v = cfg.spec.verifier if cfg.spec else None
    target_vocab = v.vocab_size if v else layer.get("vocab_size")
    draft_vocab = cfg.draft_vocab_size or target_vocab
    vocab = f"{draft_vocab} of the target's {target_vocab} tokens"
    if prov.get("draft_vocab_coverage") is not None:
        vocab += f", covering {100 * prov['draft_vocab_coverage']:.2f}% of the supervised training tokens"
    rows = [
        _row("Algorithm", f"{NAMES.get(cfg.algorithm, cfg.algorithm)} (`{cfg.speculators_model_type}`)"),
        _row("Verifier", f"`{cfg.verifier_name}`"
             + (f" ({v.architecture}, {v.num_hidden_layers} layers, hidden size {v.hidden_size})" if v else "")),
        _row("Draft decoder layers", f"{layer.get('num_hidden_layers', 1)} (hidden size {layer.get('hidden_size')})"),
        _row("Target layers read (vLLM capture ids)", ", ".join(map(str, cfg.aux_layer_ids))),
        _row("Draft vocabulary", vocab),
        _row("Draft tokens per step (k)", cfg.speculative_tokens),
    ]  # fmt: skip
    return ["## What it is", "", _row("", ""), _row("---", "---"), *rows, ""]


def _serve(cfg: SpeculatorConfig, draft_dir: Path) -> list[str]:
    spec = vllm_speculative_config(cfg, str(draft_dir))
    return [
        "## Serve it",
        "",
        "With vLLM (the draft's `model` is this directory; once uploaded, its Hub id):",
        "",
        "```bash",
        f"vllm serve {cfg.verifier_name} \\",
        f"  --speculative-config '{json.dumps(spec)}'",
        "```",
        "",
        f"or `spec serve {draft_dir}` (the same engine, with the settings read from this directory).",
        "",
    ]


def _training(prov: dict) -> list[str]:
    if not prov:
        return []
    sources = prov.get("data_sources") or []
    if sources:
        data = "; ".join(
            f"`{s['source']}`" + (f" ({s['dataset_id']}, config {s.get('config')}, split {s.get('split')}"
                                  + (f", revision {s['revision']}" if s.get("revision") else "") + ")"
                                  if s.get("dataset_id") else "")
            for s in sources
        )  # fmt: skip
    elif prov.get("online"):
        data = (
            ", ".join(f"`{d}`" for d in prov.get("data") or [])
            + f" (captured online from `{prov['online']}`)"
        )
    else:
        data = f"`{prov.get('dataset')}`"
    rows = [_row("Data", data)]
    if prov.get("held_out_dropped") is not None:
        rows.append(_row("Evaluation prompts kept out", f"{', '.join(prov.get('held_out') or [])}: "
                         f"{prov['held_out_dropped']} rows dropped as near-duplicates"))  # fmt: skip
    for key, label, fmt in (
        ("dataset_samples", "Samples", str),
        ("tokens", "Tokens trained on", str),
        ("step", "Optimiser steps", str),
        ("elapsed_s", "Wall time", _duration),
        ("hardware", "Hardware", str),
        ("run", "Run directory", lambda r: f"`{r}`"),
    ):
        if prov.get(key) is not None:
            rows.append(_row(label, fmt(prov[key])))
    return ["## Training", "", _row("", ""), _row("---", "---"), *rows, ""]


def _measured(report: dict) -> list[str]:
    draft = report["draft"]
    k = report["k"]
    se = draft.get("acceptance_length_stderr")
    positions = draft["acceptance_per_position"]
    lines = [
        "## Measured (spec eval)",
        "",
        f"Mean acceptance length at k = {k}: **{draft['mean_acceptance_length']:.3f}**"
        + (f" ± {se:.3f} (standard error over prompts)" if se is not None else "")
        + f" tokens per target forward ({k + 1} = every draft token accepted).",
        "",
        _row("Position", *range(1, len(positions) + 1)),
        _row("---", *["---"] * len(positions)),
        _row("Acceptance", *(f"{a:.3f}" for a in positions)),
        "",
    ]
    if not report.get("offline"):
        lines += [
            _row("Configuration", "Concurrency", "Tokens/s", "Speed-up", "Mean acceptance length"),
            _row("---", "---", "---", "---", "---"),
        ]
        for name, label in (("baseline", "target alone"), ("draft", f"draft, k = {k}"), ("ngram", "n-gram"),
                            ("suffix", "suffix decoding")):  # fmt: skip
            entry = report.get(name)
            if not entry:
                continue
            if name in ("ngram", "suffix"):
                label += f", k = {entry['k']}"
            length = entry.get("mean_acceptance_length")
            for run in entry["runs"]:
                c = run["concurrency"]
                speed = 1.0 if name == "baseline" else entry["speedup"][str(c)]
                lines.append(_row(label, c, f"{run['tokens_per_second']:.1f}", f"{speed:.2f}x",
                                  "" if length is None else f"{length:.3f}"))  # fmt: skip
        lines.append("")
        lines.append(
            f"Medians of {report['rounds']} interleaved timing round(s); greedy outputs identical with and "
            f"without speculation: {report.get('outputs_identical')}."
        )
    else:
        lines.append("Estimated offline (target in transformers, greedy); no speed measured.")
    setup = [f"{report['num_prompts']} prompts"]
    if report.get("prompts"):
        setup[0] += f" from {', '.join(report['prompts'])}"
    setup.append(f"{report['max_tokens']} tokens each")
    if "temperature" in report:
        setup.append(f"temperature {report['temperature']}")
    if report.get("hardware"):
        setup.append(f"on {report['hardware']}")
    lines += ["", "Prompts: " + ", ".join(setup) + ".", ""]
    return lines


def card_text(draft_dir: str | Path, report: dict | None = None) -> str:
    """The model card of `draft_dir`; with `report` (spec eval's JSON, plus optional "prompts" and
    "hardware"), its measured table."""
    draft_dir = Path(draft_dir)
    cfg, _ = read_config(draft_dir)
    prov = dict(cfg.spec.provenance) if cfg.spec else {}
    name = NAMES.get(cfg.algorithm, cfg.algorithm)
    lines = [
        *_front_matter(cfg),
        f"# {draft_dir.resolve().name}: {name} draft for {cfg.verifier_name}",
        "",
        f"A speculative-decoding draft model: it proposes {cfg.speculative_tokens} tokens per step that "
        f"`{cfg.verifier_name}` verifies in one forward, so outputs are the verifier's own while it runs "
        "fewer forwards. Trained with `spec` on the verifier's own hidden states.",
        "",
        *_what(cfg, prov),
        *_serve(cfg, draft_dir.resolve()),
        *_training(prov),
    ]
    if report is not None:
        lines += _measured(report)
    else:
        lines += [
            "## Measured",
            "",
            "Not measured yet: `spec eval " + str(draft_dir) + " --data chat` adds it.",
            "",
        ]
    return "\n".join(lines)


def write_card(draft_dir: str | Path, report: dict | None = None) -> Path:
    """Write (atomically) DRAFT_DIR/README.md; returns its path."""
    path = Path(draft_dir) / CARD
    tmp = path.with_name(f".{CARD}.tmp-{os.getpid()}")
    tmp.write_text(card_text(draft_dir, report))
    tmp.replace(path)
    return path
