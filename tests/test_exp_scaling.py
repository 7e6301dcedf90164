"""tools/exp_scaling.py: its variants are real `spec train` flags, its cached held-out measurement is the
`spec eval --offline` simulation, and its cost columns are the pool's seconds pro rata."""

import subprocess

import numpy as np
import pytest

from spec_format.tensors import load_tensors


@pytest.fixture(scope="module")
def tool(tool_module):
    return tool_module("exp_scaling")


def test_every_variant_flag_is_a_spec_train_option(tool, spec_cli):
    help_text = subprocess.run(
        [spec_cli, "train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    flags = {f for _, overrides, _ in tool.VARIANTS.values() for f in overrides} | set(
        tool.base_flags(tool.Plan())
    )
    missing = [f for f in sorted(flags) if f"{f} " not in help_text and f"{f}\n" not in help_text]
    assert not missing, missing


def test_base_flags_are_what_the_quick_start_trains_with(tool, tmp_path, monkeypatch):
    """The "base" variant claims the quick start's recipe: its flags are those spec_train.quickstart.run
    passes to `spec train` (read from the command it would run, stopped there)."""
    from spec_train import quickstart

    class Stop(Exception):
        pass

    def stage(name, marker, argv):
        if name == "train":
            raise Stop(argv)

    monkeypatch.setattr(quickstart, "_stage", stage)
    with pytest.raises(Stop) as e:
        quickstart.run(tmp_path, plan=tool.Plan())
    argv = e.value.args[0]
    given = {a: argv[i + 1] for i, a in enumerate(argv) if a.startswith("--") and i + 1 < len(argv)}
    flags = tool.base_flags(tool.Plan())
    assert {f: given.get(f) for f in flags} == flags
    assert tool.VARIANTS["base"][1:] == ({}, None)  # no change, the plan's samples


def test_cost_columns_are_the_pools_seconds_pro_rata(tool):
    pool = {"synth_s": 100.0, "capture_s": 20.0, "tokens": 1000}
    run = {"train_tokens": 500, "train_s": 90.0}
    assert tool.minutes(run, pool) == pytest.approx((1.0, 1.5))


@pytest.mark.e2e
def test_cached_heldout_measurement_is_the_offline_simulation(tool, random_eagle3, demo_model, tmp_path):
    """HeldOut computes the target's side once (continuations cached on disk, hidden states per layer set);
    its counts are those of spec_train.simulate.simulate_draft (`spec eval --offline`) on the same prompts."""
    from spec_train.eval_prompts import load_prompts
    from spec_train.simulate import simulate_draft

    draft = random_eagle3(tmp_path / "draft", demo_model, k=3)
    held = tool.HeldOut(demo_model, tmp_path, num_prompts=2, max_tokens=24)
    assert (tmp_path / "heldout-2x24.json").is_file()
    got = held.measure(draft, 3)
    for name in ("chat", "humaneval"):
        prompts = [p.ids for p in load_prompts([name], demo_model, limit=2)]
        want = simulate_draft(draft, demo_model, prompts, 3, 24)
        assert got[name]["drafts"] == want.counters.drafts > 0
        assert got[name]["per_position"] == want.counters.acceptance_per_position
        assert got[name]["mean_acceptance_length"] == want.mean_acceptance_length
        # the share of the target's continuation tokens that the draft's vocabulary holds (d2t from its file)
        d2t = load_tensors(draft / "model.safetensors", names=["d2t"])["d2t"]
        vocab = set((np.arange(len(d2t)) + d2t).tolist())
        tokens = [t for c in held.sets[name]["continuations"] for t in c]
        assert got[name]["coverage"] == pytest.approx(sum(t in vocab for t in tokens) / len(tokens))
        assert got[name]["coverage"] < 1  # a 1024-token vocabulary: some tokens fall outside
    again = tool.HeldOut(demo_model, tmp_path, num_prompts=2, max_tokens=24)  # from the cache file
    assert again.sets == held.sets
