"""`spec doctor` on the real model: the shared trained EAGLE-3 draft (conftest.py `trained`) is healthy, and
each fault built from it on purpose is named: aux layer ids shifted by one, a verifier with another config,
prompts past the trained length, a draft vocabulary pruned of the tokens the target writes.

Offline measurement only (the target in transformers): no engine starts beyond the shared plain target the
`trained` fixture uses. Four short prompts, 32 tokens each.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from spec_format.checkpoint import WEIGHTS_NAME, read_config, reseal_checkpoint
from spec_format.dataset import Dataset
from spec_format.tensors import load_tensors, save_tensors
from spec_format.validate import validate_checkpoint
from spec_train import doctor
from spec_train.eval_prompts import load_prompts

# Held-out prompts in the trained draft's domain (conftest.TRAIN_PROMPTS), not among them.
SHORT = ["Explain thunderstorms in simple terms.", "Give me three facts about cats.",
         "Explain how a fridge keeps food cold.", "Give me three facts about the desert."]  # fmt: skip
# ~300 tokens of context, longer than any sample the draft was trained on (prompt + 160-token reply).
PASSAGE = " ".join(
    f"Note {i}: the {t} was discussed at length by the committee, who agreed it deserved more study."
    for i, t in enumerate(["river", "forest", "harbour", "market", "bridge", "valley", "castle", "garden",
                           "station", "library", "mill", "orchard"])
)  # fmt: skip
LONG = [f"{PASSAGE}\n\nNow, ignoring the notes above, {p[0].lower()}{p[1:]}" for p in SHORT[:2]]
TOKENS = 32


def _prompts(demo_model, texts, tmp_path) -> list[list[int]]:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return [p.ids for p in load_prompts([str(path)], demo_model)]


def _copy_draft(trained, tmp_path) -> Path:
    return Path(shutil.copytree(Path(trained.run) / "final", tmp_path / "draft"))


def _edit_config(draft: Path, **fields) -> None:
    raw = json.loads((draft / "config.json").read_text())
    raw.update(fields)
    (draft / "config.json").write_text(json.dumps(raw))
    reseal_checkpoint(draft)


@pytest.mark.e2e
def test_a_healthy_draft_gets_no_problem_found(trained, demo_model, spec_cli, in_process_env, tmp_path):
    prompts = tmp_path / "held_out.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in SHORT))
    out = tmp_path / "doctor.json"
    # --vllm too, its engine in the command's process (8 s a start; the quick-start test covers engines in
    # their own processes)
    proc = subprocess.run([spec_cli, "doctor", str(Path(trained.run) / "final"), "--verifier", str(demo_model),
                           "--data", str(prompts), "--max-tokens", str(TOKENS), "--json", str(out), "--vllm"],
                          capture_output=True, text=True, timeout=600, env=in_process_env)  # fmt: skip
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    # (vLLM's engine logs to stdout before the summary)
    assert "\nverdict: no problem found\n" in "\n" + proc.stdout, proc.stdout[-3000:]
    report = json.loads(out.read_text())
    m = report["measured"]
    assert report["verdict"] == "no problem found" and not [f for f in report["findings"] if f["problem"]]
    assert m["mean_acceptance_length"] > doctor.LOW_ACCEPTANCE
    assert f"mean acceptance length {m['mean_acceptance_length']:.3f}" in proc.stdout
    # every verification round is in a bucket: each emits its accepted drafts + 1 (the first token of each
    # prompt is the prefill's; a last round that accepts all it can adds one token past the continuation)
    emitted = sum(b["drafts"] * b["mean_acceptance_length"] for b in m["by_context"])
    assert m["generated_tokens"] - len(SHORT) - 1e-6 <= emitted <= m["generated_tokens"] + 1e-6
    assert {p["cause"] for p in m["probes"]} == {"layer-ids", "norm-flags"}
    # no neighbouring convention accepts far more (one may tie: adjacent layers are close, see below)
    assert not any(
        doctor.gains_far(p["mean_acceptance_length"], m["mean_acceptance_length"]) for p in m["probes"]
    )
    assert m["trained_max_tokens"] >= m["longest_context"]
    # vLLM's own counters on the same prompts: what the offline replay predicted, within 5%, and each
    # prompt's rounds in its prompt-length bucket
    served = m["vllm"]
    assert f"vLLM: mean acceptance length {served['mean_acceptance_length']:.3f}" in proc.stdout
    assert served["mean_acceptance_length"] == pytest.approx(m["mean_acceptance_length"], rel=0.05), served
    assert len(served["acceptance_per_position"]) == m["k"]
    assert sum(b["drafts"] for b in served["by_context"]) > 0


@pytest.mark.e2e
def test_layer_ids_shifted_by_one_are_named(trained, demo_model, tmp_path):
    draft = _copy_draft(trained, tmp_path)
    ids = read_config(draft)[0].aux_layer_ids
    _edit_config(draft, eagle_aux_hidden_state_layer_ids=[i + 1 for i in ids])
    report = doctor.run(draft, demo_model, _prompts(demo_model, SHORT, tmp_path), max_tokens=TOKENS)
    print(doctor.summary(report))
    assert report.verdict == "layer-ids"
    messages = [f.message for f in report.problems if f.cause == "layer-ids"]
    # the dataset's own ids name the shift whatever acceptance says
    assert any(f"its dataset captured {ids} (all shifted by +1)" in x for x in messages), messages
    # The probe one down (the draft as trained) accepts at least as much as the ids as configured; it is
    # named (what a user without the dataset gets) when it accepts far more. Adjacent layers of SmolLM2's
    # residual stream are close: this 48-step draft loses 5-21% of its accepted tokens per step to the
    # shift (1.263-1.302 as trained against 1.238-1.250 shifted, depending on the threads it trained
    # with), so either branch may be the one taken.
    m = report.measured
    probe = next(p for p in m.probes if p.name.startswith("aux layer ids -1"))
    assert probe.mean_acceptance_length >= m.mean_acceptance_length
    named = any(f"with aux layer ids -1 ({', '.join(map(str, ids))})" in x for x in messages)
    assert named == doctor.gains_far(probe.mean_acceptance_length, m.mean_acceptance_length), messages


@pytest.mark.e2e
def test_a_verifier_with_another_config_is_named(trained, demo_model, tmp_path):
    other = tmp_path / "other-target"
    other.mkdir()
    for f in Path(demo_model).iterdir():
        (other / f.name).symlink_to(f)
    cfg = json.loads((Path(demo_model) / "config.json").read_text())
    (other / "config.json").unlink()
    rope = cfg["rope_parameters"]
    changed = {**rope, "rope_theta": rope["rope_theta"] * 10}
    (other / "config.json").write_text(json.dumps({**cfg, "rope_parameters": changed}))
    report = doctor.run(
        Path(trained.run) / "final",
        other,
        _prompts(demo_model, SHORT, tmp_path),
        max_tokens=TOKENS,
        probes=False,
    )
    print(doctor.summary(report))
    assert report.verdict == "verifier"
    message = report.problems[0].message
    assert "config_sha256" in message and f"rope_parameters: {rope!r} -> {changed!r}" in message


@pytest.mark.e2e
def test_prompts_past_the_trained_length_are_measured_apart(trained, demo_model, tmp_path):
    """Two short prompts and two of ~300 tokens, past the longest sample trained on (197 tokens): the rounds
    on each side are measured apart and compared. This draft holds up there (2026-12-07: 1.319 past, 1.312
    within), so it is a note; a fall under 70% per step would be the verdict (test_the_verdict_names_...)."""
    draft = Path(trained.run) / "final"
    trained_max = read_config(draft)[0].spec.provenance["max_sample_tokens"]
    assert trained_max == min(max(Dataset(trained.dataset).lengths), 1024)  # recorded at training time
    prompts = _prompts(demo_model, SHORT[2:] + LONG, tmp_path)
    assert min(len(p) for p in prompts[2:]) > trained_max >= max(len(p) + TOKENS for p in prompts[:2])
    report = doctor.run(draft, demo_model, prompts, max_tokens=TOKENS, probes=False)
    print(doctor.summary(report))
    m = report.measured
    w, p = m.within_trained, m.past_trained
    assert w.rounds > 0 and p.rounds > 0 and m.longest_context > trained_max
    assert sum(b.drafts for b in m.by_context if b.lo >= 256) == p.rounds  # the long prompts' rounds
    (finding,) = [f for f in report.findings if f.cause == "context-length"]
    assert (
        f"{p.rounds} verification rounds drafted from contexts past the trained length of {trained_max}"
        in finding.message
    )
    fell = p.mean_acceptance_length - 1 < doctor.CONTEXT_DROP * (w.mean_acceptance_length - 1)
    assert finding.problem == fell and (report.verdict == "context-length") == fell


@pytest.mark.e2e
def test_a_vocabulary_pruned_of_the_served_tokens_is_named(trained, demo_model, tmp_path):
    """The 300 target tokens most frequent in training are swapped out of the draft vocabulary for ids it
    never saw (lm_head rows follow their tokens, so everything else drafts as before)."""
    draft = _copy_draft(trained, tmp_path)
    tensors = load_tensors(draft / WEIGHTS_NAME)
    old = np.arange(len(tensors["d2t"])) + tensors["d2t"]
    freq = Dataset(trained.dataset).manifest.token_frequencies
    top = {i for _, i in sorted(zip(freq.counts, freq.ids), reverse=True)[:300]}
    fillers = [i for i in range(len(tensors["t2d"]) - 1, -1, -1) if not tensors["t2d"][i]][
        : len(top & set(old))
    ]
    keep = [i for i in old if i not in top]
    rows = {t: r for r, t in enumerate(old)}
    dropped_rows = [rows[t] for t in old if t in top]
    new = sorted(keep + fillers)
    row_of = {**{t: rows[t] for t in keep}, **dict(zip(fillers, dropped_rows))}
    tensors["lm_head.weight"] = tensors["lm_head.weight"][[row_of[t] for t in new]]
    tensors["d2t"] = np.asarray(new, np.int64) - np.arange(len(new))
    tensors["t2d"] = np.isin(np.arange(len(tensors["t2d"])), new)
    save_tensors(draft / WEIGHTS_NAME, tensors)
    reseal_checkpoint(draft)
    assert not validate_checkpoint(draft, demo_model).errors
    report = doctor.run(
        draft, demo_model, _prompts(demo_model, SHORT, tmp_path), max_tokens=TOKENS, probes=False
    )
    print(doctor.summary(report))
    assert report.verdict == "vocabulary"
    lacked = 1 - report.measured.vocab_coverage
    assert lacked >= doctor.VOCAB_SHARE * (1 - report.measured.acceptance_per_position[0])
    assert "most of its misses are tokens it can never propose" in report.problems[0].message


# ---------------------------------------------------------------------------------------------
# Cheap: the verdict from figures, the config checks on tiny targets, bad input.


def _measured(length=1.5, coverage=0.97, within=None, past=None, probes=()) -> doctor.Measured:
    return doctor.Measured(
        num_prompts=4, generated_tokens=128, k=3, mean_acceptance_length=length, acceptance_length_stderr=0.05,
        acceptance_per_position=[0.3, 0.15, 0.05], by_context=[], vocab_coverage=coverage, trained_max_tokens=200,
        longest_context=300, within_trained=within, past_trained=past, probes=list(probes),
    )  # fmt: skip


def test_the_verdict_names_what_the_figures_show():
    probe = doctor.Probe("aux layer ids -1 (1, 4, 5)", "layer-ids", 1.45)
    # a neighbouring convention accepting 0.45 per step against 0.1 is named; 0.12 against 0.1 is not
    assert doctor.verdict(doctor.diagnose(_measured(1.1, probes=[probe]))) == "layer-ids"
    assert doctor.diagnose(_measured(1.1, probes=[doctor.Probe("x", "layer-ids", 1.12)])) == []
    flag = doctor.Probe("norm_output=True", "norm-flags", 2.0)
    assert (
        doctor.verdict(doctor.diagnose(_measured(1.2, probes=[flag, probe]))) == "layer-ids"
    )  # the more basic
    # tokens the vocabulary lacks: named when they are at least half the misses at position 1 (here 0.7)
    assert doctor.verdict(doctor.diagnose(_measured(coverage=0.6))) == "vocabulary"
    assert doctor.verdict(doctor.diagnose(_measured(coverage=0.8))) == "no problem found"
    # past the trained length: named when acceptance there falls below 70% of that within (per step)
    fall = _measured(within=doctor.Split(40, 1.6), past=doctor.Split(30, 1.3))
    assert doctor.verdict(doctor.diagnose(fall)) == "context-length"
    held = doctor.diagnose(_measured(within=doctor.Split(40, 1.6), past=doctor.Split(30, 1.5)))
    assert [(f.cause, f.problem) for f in held] == [("context-length", False)]  # a note: no fall
    assert doctor.verdict(doctor.diagnose(_measured(past=doctor.Split(30, 1.5)))) == "context-length"
    assert doctor.verdict(doctor.diagnose(_measured(1.05))) == "low-acceptance"
    assert doctor.verdict(doctor.diagnose(_measured())) == "no problem found"


def test_config_checks_on_tiny_targets(tiny_model, random_eagle3, tmp_path):
    llama, qwen = tiny_model("llama"), tiny_model("qwen3")
    draft = random_eagle3(tmp_path / "draft", llama)
    assert doctor.check_configs(draft, llama) == []
    other = doctor.check_configs(draft, qwen)  # another architecture: the fingerprint differs
    assert other and all(f.cause == "verifier" and f.problem for f in other)
    assert "architecture: LlamaForCausalLM != Qwen3ForCausalLM" in other[0].message
    _edit_config(draft, eagle_aux_hidden_state_layer_ids=[2, 4, 9], target_hidden_size=96)
    found = doctor.check_configs(draft, llama)
    assert [(f.cause, f.blocking) for f in found if f.blocking] == [("verifier", True), ("layer-ids", True)]
    assert "aux layer ids [9] are outside [0, 8]" in found[1].message
    report = doctor.run(draft, llama, [[1, 2, 3]])
    assert report.measured is None and report.verdict == "verifier"  # nothing measured: the draft cannot run


def test_bad_input_is_one_line(spec_cli, tiny_model, random_eagle3, tmp_path):
    draft = random_eagle3(tmp_path / "draft", tiny_model("llama"))
    proc = subprocess.run([spec_cli, "doctor", str(draft), "--verifier", str(tiny_model("llama")), "--data",
                           str(tmp_path / "missing.jsonl")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing.jsonl'}: no such file or directory (or built-in prompt set: chat, humaneval)"
    ], proc.stderr
