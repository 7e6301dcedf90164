"""`spec doctor`: why a draft serves worse than it validated.

The causes are few and checkable (docs/doctor.md):
- the target is not the verifier the draft (or its dataset) was made for: hidden size, vocabulary, layer
  count, config.json or tokenizer bytes (the fingerprints), rope settings;
- aux layer ids out of range, not the ones the dataset captured, or off by one (another code base's
  convention: docs/architecture.md "Layer ids");
- norm flags vLLM reads differently from how the draft was trained;
- a draft vocabulary that misses the tokens the target writes;
- contexts longer than anything trained on.

The config checks read files only. The measurement is the offline estimate (spec_train.simulate: the
target in transformers, vLLM's greedy verification replayed) on a few prompts, per draft position and per
context-length bucket, plus the share of the target's generated tokens the draft vocabulary holds. The
target's states at every layer come from one forward per sequence, so the neighbouring conventions (aux ids
shifted by +-1, each norm flag flipped) are measured on the same rounds at the cost of the draft alone.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import click
import msgspec

from spec_format.errors import SpecError
from spec_train.buckets import Bucket

# A neighbouring convention "accepts far more" when its accepted tokens per draft step are at least this
# many times the draft's as configured, and at least MIN_GAIN more.
FAR_MORE, MIN_GAIN = 1.25, 0.05
# The vocabulary is named when the generated tokens it lacks are at least this share of the draft's misses
# at position 1, and at least MIN_LACKED of all generated tokens.
VOCAB_SHARE, MIN_LACKED = 0.5, 0.05
# Accepted per draft past the trained length below this fraction of that within it: the length is named.
CONTEXT_DROP = 0.7
# Mean acceptance length below this with no other cause found: the draft itself is named.
LOW_ACCEPTANCE = 1.1

# The order causes are named in when several are found (the most basic first).
CAUSES = ("verifier", "layer-ids", "norm-flags", "vocabulary", "context-length", "low-acceptance", "dtype")


class Finding(msgspec.Struct):
    cause: str  # one of CAUSES
    problem: bool  # False: a note that explains nothing by itself
    message: str  # one line, with its evidence
    blocking: bool = False  # the draft cannot run against this target: nothing to measure


class Probe(msgspec.Struct):
    """The draft measured under a neighbouring convention."""

    name: str  # e.g. "aux layer ids -1 (1, 14, 26)" or "norm_output=True"
    cause: str  # "layer-ids" or "norm-flags"
    mean_acceptance_length: float


class Split(msgspec.Struct):
    rounds: int
    mean_acceptance_length: float


class Measured(msgspec.Struct):
    num_prompts: int
    generated_tokens: int
    k: int
    mean_acceptance_length: float
    acceptance_length_stderr: float
    acceptance_per_position: list[float]
    by_context: list[Bucket]
    vocab_coverage: float | None  # share of the target's generated tokens the draft vocabulary holds
    trained_max_tokens: int | None  # the longest context trained on (the draft's provenance)
    longest_context: int  # prompt + generated tokens of the longest measured sequence
    within_trained: Split | None = None  # rounds drafted from contexts <= trained_max_tokens
    past_trained: Split | None = None  # and past it
    probes: list[Probe] = []
    vllm: dict | None = None  # with --vllm: mean acceptance length, per position, by_context


class DoctorReport(msgspec.Struct):
    draft: str
    verifier: str
    verdict: str  # "no problem found" or the first problem's cause
    findings: list[Finding]
    measured: Measured | None = None

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.problem]


# ---------------------------------------------------------------------------------------------
# Config checks (files only).


def _config_diff(a: dict, b: dict, limit: int = 4) -> str:
    """'rope_theta: 100000 -> 10000, ...' over the keys whose values differ (volatile keys left out)."""
    from spec_format.fingerprint import _VOLATILE_CONFIG_KEYS

    keys = sorted((set(a) | set(b)) - _VOLATILE_CONFIG_KEYS)
    diffs = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
    more = f" (+{len(diffs) - limit} more)" if len(diffs) > limit else ""
    return ", ".join(diffs[:limit]) + more


def _fingerprint_findings(
    recorded, actual, recorded_dir: Path | None, verifier: Path, whose: str
) -> list[Finding]:
    from spec_format.fingerprint import read_model_config

    diffs = recorded.mismatches(actual)
    if not diffs:
        return []
    evidence = re.sub(r"\b([0-9a-f]{12})[0-9a-f]{52}\b", r"\1...", "; ".join(diffs))  # sha256s, shortened
    if (
        any(d.startswith("config_sha256") for d in diffs)
        and recorded_dir
        and (recorded_dir / "config.json").is_file()
    ):
        evidence += f"; config.json {recorded_dir} -> {verifier}: " + _config_diff(
            read_model_config(recorded_dir), read_model_config(verifier)
        )
    if diffs == [d for d in diffs if d.startswith("tokenizer_sha256")]:
        evidence += (
            " (tokenizer files or chat template changed: prompts are rendered differently than in training)"
        )
    return [Finding("verifier", True, f"{verifier} is not the verifier {whose} was made for: {evidence}")]


def _dataset_manifest(cfg):
    """The manifest of the dataset the draft was trained on, when its provenance names one that still exists."""
    from spec_format.dataset import Dataset

    path = (cfg.spec.provenance if cfg.spec else {}).get("dataset")
    if not path or not (Path(path) / "manifest.json").is_file():
        return None
    try:
        return Dataset(path).manifest
    except SpecError:
        return None


def check_configs(draft_dir: Path, verifier: Path) -> list[Finding]:
    """The draft's config against the target's config.json and the fingerprints recorded in the draft and
    its dataset."""
    from spec_format.checkpoint import read_config
    from spec_format.fingerprint import fingerprint_model_dir, read_model_config

    cfg, _ = read_config(draft_dir)
    tcfg = read_model_config(verifier)
    actual = fingerprint_model_dir(verifier)
    lc = cfg.transformer_layer_config
    out: list[Finding] = []
    hidden = cfg.target_hidden_size or lc.get("hidden_size")
    if hidden != actual.hidden_size:
        out.append(Finding("verifier", True, f"the draft reads target states of size {hidden}; {verifier} has hidden_size {actual.hidden_size}", blocking=True))  # fmt: skip
    if lc.get("vocab_size") != actual.vocab_size:
        out.append(Finding("verifier", True, f"the draft's vocab_size is {lc.get('vocab_size')}; {verifier} has {actual.vocab_size}", blocking=True))  # fmt: skip
    L = actual.num_hidden_layers
    ids = cfg.aux_layer_ids
    bad = [i for i in ids if not 0 <= i <= L]
    if bad:
        out.append(Finding("layer-ids", True, f"aux layer ids {bad} are outside [0, {L}] for a {L}-layer target (vLLM capture ids)", blocking=True))  # fmt: skip
    manifest = _dataset_manifest(cfg)
    if manifest is not None and ids:
        captured = [
            i for i in manifest.layer_ids if i != manifest.target.num_hidden_layers
        ] or manifest.layer_ids
        if sorted(ids) != sorted(captured) and len(ids) == len(captured):
            shifts = {a - b for a, b in zip(sorted(ids), sorted(captured))}
            how = f" (all shifted by {shifts.pop():+d})" if len(shifts) == 1 else ""
            out.append(Finding("layer-ids", True, f"the draft reads aux layer ids {ids}, its dataset captured {captured}{how}"))  # fmt: skip
    recorded = cfg.spec.verifier if cfg.spec else None
    if recorded is not None:
        rdir = Path(recorded.name_or_path)
        out += _fingerprint_findings(recorded, actual, rdir if rdir.is_dir() else None, verifier, "the draft")
    if manifest is not None:
        rdir = Path(manifest.target.name_or_path)
        out += _fingerprint_findings(
            manifest.target, actual, rdir if rdir.is_dir() else None, verifier, "its dataset"
        )
        if manifest.dtype == "fp8":
            out.append(Finding("dtype", False, "the dataset holds fp8 states; served states are the target's own dtype"))  # fmt: skip
    for key in ("rope_theta", "rope_scaling", "rope_parameters"):
        if key in lc and lc.get(key) != tcfg.get(key):
            # The draft rotates by its own config in training and in vLLM alike: a difference is a hint that
            # it was made for another version of the target, not a fault by itself.
            out.append(Finding("verifier", False, f"the draft's {key} is {lc.get(key)!r}, {verifier}'s is {tcfg.get(key)!r}"))  # fmt: skip
    if "quantization_config" in tcfg:
        method = tcfg["quantization_config"].get("quant_method", "?")
        out.append(Finding("dtype", False, f"{verifier} is quantized ({method}): its states differ from the unquantized ones a draft is usually trained on; measure with --vllm"))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# Measurement.


def _aux(states, ids: list[int]):
    """[T, len(ids) * H] from target_states."""
    import torch

    return torch.cat([states[i] for i in ids], dim=-1)


def _flag_variants(draft) -> list[tuple[str, object]]:
    """(name, draft copy) for each norm flag that can be flipped without weights the checkpoint lacks:
    norm_before_residual and norm_output either way; fc_norm and norm_before_fc off when on."""
    spec = getattr(draft, "spec", None)
    if spec is None or not hasattr(spec, "norm_output"):
        return []
    out = []
    for flag in ("norm_before_residual", "norm_output", "fc_norm", "norm_before_fc"):
        value = getattr(spec, flag)
        if flag in ("fc_norm", "norm_before_fc") and not value:
            continue
        d = copy.deepcopy(draft)
        d.spec = msgspec.structs.replace(spec, **{flag: not value})
        if flag == "norm_before_residual":
            for layer in d.layers:
                layer.norm_before_residual = not value
        elif flag == "fc_norm":
            d.fc_norm = None
        elif flag == "norm_before_fc":
            d.input_norm = None
        out.append((f"{flag}={not value}", d))
    return out


def measure(draft_dir: Path, verifier: Path, prompts: list[list[int]], k: int | None, max_tokens: int,
            probes: bool = True) -> Measured:  # fmt: skip
    """The offline estimate of the draft on `prompts` (the target's greedy continuations of `max_tokens`),
    and with `probes` the same rounds under each neighbouring convention."""
    import torch
    from transformers import AutoModelForCausalLM

    from spec_datagen.template import end_of_turn_ids, load_tokenizer
    from spec_format.console import say
    from spec_models import load
    from spec_train.evaluate import acceptance_stderr
    from spec_train.simulate import greedy_continuations, simulate, target_states

    draft = load(draft_dir, verifier).float().eval()
    k = k or draft.config.speculative_tokens
    target = AutoModelForCausalLM.from_pretrained(verifier, dtype=torch.float32).eval()
    eos = end_of_turn_ids(verifier, load_tokenizer(verifier))
    say(f"target greedy continuations of {len(prompts)} prompts ({max_tokens} tokens at most)", "doctor")
    conts = greedy_continuations(target, prompts, max_tokens, eos)
    states = [target_states(target, p + c) for p, c in zip(prompts, conts)]
    L = states[0].shape[0] - 1
    ids = draft.config.aux_layer_ids

    def run(d, layer_ids):
        return simulate(d, target, prompts, conts, k, auxes=[_aux(s, layer_ids) for s in states])

    say(f"replaying verification rounds with k={k}", "doctor")
    base = run(draft, ids)
    tried: list[Probe] = []
    if probes:
        for shift in (-1, 1):
            shifted = [i + shift for i in ids]
            if all(0 <= i <= L for i in shifted):
                r = run(draft, shifted)
                name = f"aux layer ids {shift:+d} ({', '.join(map(str, shifted))})"
                tried.append(Probe(name, "layer-ids", r.mean_acceptance_length))
        for name, d in _flag_variants(draft):
            tried.append(Probe(name, "norm-flags", run(d, ids).mean_acceptance_length))
    vocab = draft.to_target(torch.arange(len(draft.d2t))).tolist() if hasattr(draft, "d2t") else None
    generated = [t for c in conts for t in c]
    coverage = None
    if vocab is not None and generated:
        held = set(vocab)
        coverage = sum(t in held for t in generated) / len(generated)
    trained = (draft.config.spec.provenance if draft.config.spec else {}).get("max_sample_tokens")
    return Measured(
        num_prompts=len(prompts), generated_tokens=base.generated_tokens, k=k,
        mean_acceptance_length=base.mean_acceptance_length, acceptance_length_stderr=acceptance_stderr(base.per_prompt),
        acceptance_per_position=base.counters.acceptance_per_position, by_context=base.by_context(),
        vocab_coverage=coverage, trained_max_tokens=trained,
        longest_context=max(len(p) + len(c) for p, c in zip(prompts, conts)),
        within_trained=_split_at(base, trained, past=False), past_trained=_split_at(base, trained, past=True),
        probes=tried,
    )  # fmt: skip


def _split_at(run, trained: int | None, past: bool) -> Split | None:
    """The rounds drafted from contexts within (<=) or past the trained length."""
    if not trained:
        return None
    acc = [a for n, a in zip(run.round_contexts, run.round_accepted) if (n > trained) == past]
    return Split(len(acc), 1.0 + sum(acc) / len(acc)) if acc else None


def measure_in_vllm(
    draft_dir: Path, verifier: Path, prompts: list[list[int]], k: int, max_tokens: int
) -> dict:
    """vLLM's own acceptance on the same prompts (greedy, one engine with the draft): mean acceptance length,
    per position, and per prompt-length bucket from its per-request counters."""
    from vllm import SamplingParams

    from spec_datagen.runtime import make_llm, request_counters, shutdown_llm
    from spec_format.algorithms import vllm_speculative_config
    from spec_format.checkpoint import read_config
    from spec_train.buckets import by_prompt

    cfg = read_config(draft_dir)[0]
    spec = vllm_speculative_config(cfg, str(draft_dir), k)
    llm = make_llm(str(verifier), speculative_config=spec, per_request_spec_decode_metrics="summary")
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)  # fmt: skip
    finally:
        shutdown_llm(llm)
    per_prompt = [request_counters(o.outputs[0].spec_decode_metrics) for o in outs]
    total = sum(per_prompt[1:], per_prompt[0])
    return {
        "mean_acceptance_length": total.mean_acceptance_length,
        "acceptance_per_position": total.acceptance_per_position,
        "by_context": msgspec.to_builtins(by_prompt([len(p) for p in prompts], per_prompt)),
    }


# ---------------------------------------------------------------------------------------------
# Verdict.


def gains_far(probe: float, base: float) -> bool:
    """Does a probe's acceptance length beat the draft's far (accepted tokens per step)?"""
    a, b = probe - 1.0, base - 1.0
    return a >= FAR_MORE * b and a - b >= MIN_GAIN


def diagnose(m: Measured) -> list[Finding]:
    """Findings from the measurement: neighbouring conventions that accept far more, a vocabulary that
    misses the target's tokens, acceptance falling past the trained length, acceptance low for no reason
    found."""
    out: list[Finding] = []
    figures = f"mean acceptance length {m.mean_acceptance_length:.3f} ± {m.acceptance_length_stderr:.3f}"
    for cause in ("layer-ids", "norm-flags"):
        better = [
            p
            for p in m.probes
            if p.cause == cause and gains_far(p.mean_acceptance_length, m.mean_acceptance_length)
        ]
        if better:
            best = max(better, key=lambda p: p.mean_acceptance_length)
            what = (
                "the aux layer ids are off by one"
                if cause == "layer-ids"
                else "a norm flag is read differently than trained"
            )
            out.append(Finding(cause, True, f"{what}: with {best.name} the draft accepts {best.mean_acceptance_length:.3f}, as configured {m.mean_acceptance_length:.3f}"))  # fmt: skip
    if m.vocab_coverage is not None:
        # Tokens outside the draft vocabulary are misses the draft cannot avoid: named when they account for
        # at least half of its misses at the first position (coverage over all generated tokens stands for
        # the first position's).
        lacked, missed = 1.0 - m.vocab_coverage, 1.0 - (m.acceptance_per_position or [0.0])[0]
        share = f"the draft vocabulary lacks {lacked:.1%} of the tokens the target generated; the draft misses {missed:.1%} at position 1"
        if lacked >= VOCAB_SHARE * missed and lacked >= MIN_LACKED:
            out.append(Finding("vocabulary", True, f"{share}: most of its misses are tokens it can never propose ({figures})"))  # fmt: skip
    w, p = m.within_trained, m.past_trained
    if p is not None:
        past = f"{p.rounds} verification rounds drafted from contexts past the trained length of {m.trained_max_tokens} tokens accept {p.mean_acceptance_length:.3f}"
        if w is None:
            out.append(Finding("context-length", True, f"every measured context is longer than the draft was trained on: {past}"))  # fmt: skip
        elif (p.mean_acceptance_length - 1.0) < CONTEXT_DROP * (w.mean_acceptance_length - 1.0):
            out.append(Finding("context-length", True, f"acceptance falls past the trained length: {past}, the {w.rounds} within it {w.mean_acceptance_length:.3f}"))  # fmt: skip
        else:
            out.append(Finding("context-length", False, f"{past}, the {w.rounds} within it {w.mean_acceptance_length:.3f}: no fall"))  # fmt: skip
    if not out and m.mean_acceptance_length < LOW_ACCEPTANCE:
        out.append(Finding("low-acceptance", True, f"acceptance is low ({figures}) and no checked cause explains it: the draft needs more training or data closer to these prompts"))  # fmt: skip
    return out


def verdict(findings: list[Finding]) -> str:
    problems = sorted((f for f in findings if f.problem), key=lambda f: CAUSES.index(f.cause))
    return problems[0].cause if problems else "no problem found"


def run(draft_dir: Path, verifier: Path, prompts: list[list[int]], *, k: int | None = None, max_tokens: int = 64,
        vllm: bool = False, probes: bool = True) -> DoctorReport:  # fmt: skip
    """Every check; the measurement is skipped when the draft cannot run against this target at all. Without
    `probes` the neighbouring conventions are not tried (each costs a replay of the draft)."""
    findings = check_configs(draft_dir, verifier)
    measured = None
    if not any(f.blocking for f in findings):
        measured = measure(draft_dir, verifier, prompts, k, max_tokens, probes=probes)
        findings += diagnose(measured)
        if vllm:
            measured.vllm = measure_in_vllm(draft_dir, verifier, prompts, measured.k, max_tokens)
    findings.sort(key=lambda f: (not f.problem, CAUSES.index(f.cause)))
    return DoctorReport(str(draft_dir), str(verifier), verdict(findings), findings, measured)


def summary(report: DoctorReport) -> str:
    """The verdict, its evidence and the figures, for a terminal."""
    lines = []
    if report.problems:
        lines.append(f"verdict: {report.verdict}: {report.problems[0].message}")
        lines += [f"  also: {f.cause}: {f.message}" for f in report.problems[1:]]
    else:
        lines.append("verdict: no problem found")
    lines += [f"  note: {f.cause}: {f.message}" for f in report.findings if not f.problem]
    m = report.measured
    if m is not None:
        lines.append(f"offline, k={m.k}, {m.num_prompts} prompts, {m.generated_tokens} generated tokens: mean acceptance "
                     f"length {m.mean_acceptance_length:.3f} ± {m.acceptance_length_stderr:.3f}; per position "
                     + ", ".join(f"{a:.3f}" for a in m.acceptance_per_position))  # fmt: skip
        lines.append("by context length: " + ", ".join(
            f"{b.lo}-{b.hi}: {b.mean_acceptance_length:.3f} ({b.drafts} rounds)" for b in m.by_context))  # fmt: skip
        if m.vocab_coverage is not None:
            lines.append(f"draft vocabulary coverage of the target's tokens: {m.vocab_coverage:.1%}")
        if m.trained_max_tokens:
            lines.append(
                f"trained on contexts up to {m.trained_max_tokens} tokens; longest measured {m.longest_context}"
            )
        if m.probes:
            lines.append(
                "neighbouring conventions: "
                + ", ".join(f"{p.name}: {p.mean_acceptance_length:.3f}" for p in m.probes)
            )
        if m.vllm:
            lines.append(f"vLLM: mean acceptance length {m.vllm['mean_acceptance_length']:.3f}")
    return "\n".join(lines)


@click.command("doctor")
@click.argument("draft_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--verifier", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Target model directory as served (default: the verifier recorded in the draft).")  # fmt: skip
@click.option("--data", "sources", multiple=True, default=("chat", "humaneval"), show_default=True,
              help="Prompt file(s) in any datagen layout, or a built-in set: chat, humaneval. Repeatable.")  # fmt: skip
@click.option("--num-prompts", type=click.IntRange(min=1), default=4, show_default=True, help="At most this many prompts per source.")  # fmt: skip
@click.option("--max-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="Tokens the target generates per prompt.")  # fmt: skip
@click.option("-k", "--k", "k", type=click.IntRange(min=1), default=None, help="Draft tokens per step (default: the draft's).")  # fmt: skip
@click.option("--vllm", is_flag=True, help="Also measure acceptance in vLLM (one engine start; offline only by default).")  # fmt: skip
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the report as JSON here.")  # fmt: skip
def doctor_cmd(draft_dir, verifier, sources, num_prompts, max_tokens, k, vllm, json_out):
    """Why does DRAFT_DIR serve worse than it validated? Checks its config against the target and the
    recorded fingerprints, measures acceptance offline on a few prompts (per position, per context length,
    vocabulary coverage), tries the neighbouring layer-id and norm conventions, and names the most likely
    cause. Exits 0 when it finds no problem, 1 when it names one."""
    import sys

    from spec_format.checkpoint import read_config
    from spec_train.eval_prompts import load_prompts

    cfg, _ = read_config(draft_dir)
    verifier = verifier or Path(cfg.verifier_name)
    if not verifier.is_dir():
        raise SpecError(f"the draft's verifier '{verifier}' is not a local directory: pass --verifier DIR")
    prompts = [p.ids for p in load_prompts(list(sources), verifier, limit=num_prompts)]
    report = run(draft_dir, verifier, prompts, k=k, max_tokens=max_tokens, vllm=vllm)
    if json_out is not None:
        tmp = json_out.with_name(f".{json_out.name}.tmp")
        tmp.write_bytes(msgspec.json.format(msgspec.json.encode(report)) + b"\n")
        tmp.replace(json_out)
    click.echo(summary(report))
    sys.exit(1 if report.problems else 0)
