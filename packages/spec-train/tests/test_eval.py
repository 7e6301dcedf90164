"""`spec eval`: the lossless check, acceptance from per-request counters, bad input before any engine
starts, --write-k. The k sweep in vLLM, its --write-k and its charts: test_e2e.py (on a trained P-EAGLE
draft).

Engine starts: none in this process; the bad-input tests check that spec eval starts none either.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from spec_datagen.runtime import SpecDecodeCounters, request_counters
from spec_format.checkpoint import read_config, write_speculative_tokens
from spec_format.errors import SpecError
from spec_train.evaluate import (
    Measurement,
    acceptance_stderr,
    find_mismatches,
    first_difference,
    mismatch_message,
)

HELD_OUT = ["Explain why the sky is blue.", "Write a haiku about rain.", "What is 17 times 3?"]


@pytest.fixture(scope="module")
def draft(random_eagle3, demo_model, tmp_path_factory) -> Path:
    """A random-weight EAGLE-3 draft for SmolLM2 at k = 3 (acceptance near zero; the plumbing is tested)."""
    return random_eagle3(tmp_path_factory.mktemp("eval") / "draft", demo_model, k=3)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval-prompts") / "held_out.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HELD_OUT))
    return path


def test_lossless_check_finds_the_first_altered_token():
    # first_difference and find_mismatches are pure: token lists of the shape greedy outputs have suffice.
    reference = [[(7 * i + 3 * j) % 50 + 1 for j in range(24)] for i in range(3)]
    assert first_difference(reference, [list(r) for r in reference]) is None

    altered = [list(r) for r in reference]
    altered[1][5] += 1
    altered[2][3] += 1  # a later prompt: the first one is reported
    assert first_difference(reference, altered) == (1, 5)
    shorter = [list(r) for r in reference]
    shorter[0] = shorter[0][:7]  # output that stops early differs where it stops
    assert first_difference(reference, shorter) == (0, 7)

    measured = {
        "baseline": {1: [Measurement(reference, 1.0, None)]},
        "draft k=2": {1: [Measurement(reference, 1.0, None), Measurement(altered, 1.0, None)]},
        "ngram": {1: [Measurement(reference, 1.0, None)]},
    }
    sources = [f"held_out.jsonl:{i + 1}" for i in range(3)]
    (m,) = find_mismatches(measured, ["draft k=2", "ngram"], sources)
    assert (m.config, m.prompt, m.position, m.round) == ("draft k=2", 1, 5, 2)
    assert (m.expected, m.got) == (reference[1][5], altered[1][5])
    message = mismatch_message(m)
    assert "prompt 1 (held_out.jsonl:2), output token 5" in message and "\n" not in message


def test_request_counters_match_vllms_aggregate_definition():
    from vllm.v1.metrics.stats import RequestSpecDecodeMetrics

    # Steps with 0, 0, 1, 2, 3 accepted of k = 3: what vLLM's aggregate counters would count.
    metrics = RequestSpecDecodeMetrics.new(3)
    for accepted in (0, 0, 1, 2, 3):
        metrics.observe(num_draft_tokens=3, num_accepted=accepted)
    c = request_counters(metrics)
    assert (c.drafts, c.draft_tokens, c.accepted, c.accepted_per_position) == (5, 15, 6, [3, 2, 1])
    assert c.mean_acceptance_length == pytest.approx(2.2)
    assert (c + c).accepted_per_position == [6, 4, 2]


def test_acceptance_stderr_is_the_ratio_estimators():
    # Two prompts with the same rate have no spread; unequal rates give the ratio estimator's error.
    same = [SpecDecodeCounters(drafts=10, accepted=5), SpecDecodeCounters(drafts=20, accepted=10)]
    assert acceptance_stderr(same) == 0.0
    per_prompt = [SpecDecodeCounters(drafts=10, accepted=2), SpecDecodeCounters(drafts=10, accepted=8)]
    # r = 0.5; residuals -3, 3; sqrt(18 / 2) / 10 = 0.3 (= the standard error of the two rates 0.2, 0.8)
    assert acceptance_stderr(per_prompt) == pytest.approx(0.3)
    assert acceptance_stderr(per_prompt[:1]) == 0.0


def test_write_speculative_tokens_is_validated_and_keeps_other_fields(draft, tmp_path):
    d = shutil.copytree(draft, tmp_path / "d")
    before = json.loads((d / "config.json").read_text())
    assert write_speculative_tokens(d, 2) == 3
    after = json.loads((d / "config.json").read_text())
    assert after["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 2
    after["speculators_config"]["proposal_methods"][0]["speculative_tokens"] = 3
    assert after.pop("spec_sha256") != before.pop("spec_sha256")  # sealed again, for the new bytes
    assert after == before and read_config(d)[0].speculative_tokens == 2
    with pytest.raises(SpecError, match="speculative_tokens"):
        write_speculative_tokens(d, 0)
    assert read_config(d)[0].speculative_tokens == 2 and not list(d.glob(".*tmp*"))


def _engine_starts(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--k", "0,2"], "--k '0,2': every value must be a positive integer"),
        (["--k", "two"], "--k 'two': expected comma-separated integers"),
        (["--concurrency", "0"], "--concurrency '0': every value must be a positive integer"),
        (["--bad-prompts"], "no usable prompt (2 rows skipped; first: "),
    ],
)
def test_bad_input_is_one_line_before_any_engine(args, expected, spec_cli, draft, prompt_file, tmp_path):
    if args == ["--bad-prompts"]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": 3}\n{"nothing": "here"}\n')
        args = ["--data", str(bad)]
    log = Path(os.environ["SPEC_ENGINE_LOG"])
    starts = _engine_starts(log)
    proc = subprocess.run([spec_cli, "eval", str(draft), "--data", str(prompt_file), *args],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    # The target's pairing is checked first (a target vLLM cannot run is the more basic error), and that
    # imports vLLM, which prints one notice of its own on a CPU without Triton's CPU backend.
    lines = [x for x in proc.stderr.strip().splitlines() if not x.startswith("Triton is installed, but")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert _engine_starts(log) == starts


@pytest.mark.e2e
def test_suffix_decoding_baseline_where_installed(spec_cli, draft, prompt_file, tmp_path):
    """Only where the optional extra is installed (tools/install_suffix_decoding.sh). Engines in their own
    processes: in-process, stopping a fresh suffix engine tears down vLLM's process-wide parallel state
    that the still running target-alone engine uses ("pipeline model parallel group is not initialized")."""
    pytest.importorskip("arctic_inference.suffix_decoding")
    proc = subprocess.run(
        [spec_cli, "eval", str(draft), "--data", str(prompt_file), "--k", "1", "--rounds", "2", "--max-tokens", "32",
         "--no-ngram", "--json"], capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    suffix = report["suffix"]
    assert report["outputs_identical"] is True and suffix["counters"]["drafts"] > 0
    # Two measured rounds; the speed-up's pairing with each round's baseline is the fake-engine test's below.
    assert len(suffix["runs"][0]["tokens_per_second_rounds"]) == 2 and set(suffix["speedup"]) == {"1"}
    # a fresh engine for each round: the second round starts with an empty cache again, as the first did
    assert proc.stderr.count("suffix: starting vLLM") == 2


def test_drafted_share_counts_the_decode_steps_that_checked_a_draft():
    """n-gram drafts only on a match; acceptance.png labels its rates with the share of steps it drafted on.
    Two requests of 10 and 7 tokens: 2 from the prefills, then 5 + 5 decode steps, 2 + 1 with a draft
    (4 + 1 accepted). A draft model drafting at every step (9 tokens, 4 steps, 4 accepted) has share 1."""
    from spec_datagen.runtime import SpecDecodeCounters
    from spec_train.evaluate import Config, Measurement, _summarise

    ngram = Measurement([[0] * 10, [0] * 7], 1.0, [SpecDecodeCounters(2, 6, 4, [3, 1, 0]),
                                                   SpecDecodeCounters(1, 3, 1, [1, 0, 0])])  # fmt: skip
    r = _summarise(Config("ngram", {"method": "ngram"}, 3), {1: [ngram, ngram]}, {1: [1.0, 1.0]})
    assert r.drafted_share == pytest.approx(3 / 10)
    draft = Measurement([[0] * 9], 1.0, [SpecDecodeCounters(4, 12, 4, [3, 1, 0])])
    assert _summarise(Config("draft", {"method": "eagle3"}, 3), {1: [draft]}, {1: [1.0]}).drafted_share == 1.0


def test_interleaved_rounds_pair_each_speedup_with_its_rounds_baseline():
    """Fake engines on a machine whose load doubles every round: the target alone makes 10 tokens/s and
    each draft 2x or 3x that at the same load, so paired speed-ups stay exact while tokens/s drift."""
    from spec_train.evaluate import Config, _interleaved

    speed = {"baseline": 10.0, "a": 20.0, "b": 30.0, "c": 30.0}
    started, order = [], []

    def start(config):
        started.append(config.name)
        return config.name

    def measure(llm, concurrency, spec):
        calls = len(order)  # 6 measurements per round with the group [a, b], then 4 with [c]
        load = 2 ** (calls // 6 if calls < 18 else (calls - 18) // 4)
        order.append((llm, concurrency))
        return Measurement([[1] * 40] * 2, 80 / speed[llm] * load, [SpecDecodeCounters()] if spec else None)

    configs = [Config(n, {"method": n}, 1) for n in ("a", "b", "c")]
    measured, speedups = _interleaved(Config("baseline", None), configs, [1, 4], 3, 2, start, measure)
    assert started == ["baseline", "a", "b", "c"]  # one start each: groups [a, b] and [c] beside the baseline
    assert [len(measured[n][1]) for n in ("baseline", "a", "b", "c")] == [6, 3, 3, 3]
    assert order[:6] == [("baseline", 1), ("baseline", 4), ("a", 1), ("a", 4), ("b", 1), ("b", 4)]
    assert order[6:8] == [("a", 1), ("a", 4)]  # round 2 starts one later
    for name, ratio in (("a", 2.0), ("b", 3.0), ("c", 3.0)):
        assert speedups[name][1] == speedups[name][4] == pytest.approx([ratio] * 3)
    tps = [40 * 2 / m.seconds for m in measured["a"][1]]
    assert tps == pytest.approx([20.0, 10.0, 5.0])  # what an unpaired comparison would have mixed
