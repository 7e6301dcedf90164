"""`spec train` end to end on tiny targets, in real subprocesses: the run layout, exact resume after SIGKILL
(mid-step and mid-checkpoint-write), DDP and FSDP2 with two gloo processes, bad input, MoE targets,
fine-tuning, configuration files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from spec_format.checkpoint import read_config
from spec_format.fingerprint import fingerprint_model_dir
from spec_format.validate import validate_checkpoint

# Every test here runs `spec train` in real subprocesses (torch start-up, a few seconds each): end to end.
pytestmark = pytest.mark.e2e

# Small rows and vocabulary: each step takes well under a second on two cores.
FAST = ["--draft-vocab-size", "256", "--batch-tokens", "160", "--no-progress", "--loss-chunk", "64"]


def weights(run: Path, step: int) -> dict[str, np.ndarray]:
    return load_file(str(run / "checkpoints" / f"step-{step:06d}" / "training" / "weights.safetensors"))


def train_lines(run: Path, split="train") -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["split"] == split]


@pytest.fixture(scope="module")
def baseline(ds, verifier, tmp_path_factory, run_train):
    """An uninterrupted 8-step run (checkpoints every 2 steps), the reference for the resume tests."""
    run = tmp_path_factory.mktemp("baseline") / "run"
    args = [str(ds), "--verifier", str(verifier), "--out", str(run), "--max-steps", "8", "--save-every", "2",
            "--keep-last", "10", "--noise", "0.05", "--tensorboard", *FAST]  # fmt: skip
    run_train(args)
    return run, args


def test_run_layout(baseline, verifier, series):
    run, _ = baseline
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step-{s:06d}" for s in (2, 4, 6, 8)]
    for d in (run / "final", run / "best", run / "checkpoints" / "step-000004"):
        assert not validate_checkpoint(d).errors, d
    assert sorted(p.name for p in (run / "final").iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    # final/ is the last checkpoint, hard-linked
    assert os.path.samefile(
        run / "final" / "model.safetensors", run / "checkpoints/step-000008/model.safetensors"
    )
    cfg, _ = read_config(run / "final")
    assert cfg.speculative_tokens == 3 and cfg.draft_vocab_size == 256
    assert cfg.spec.verifier.config_sha256 == fingerprint_model_dir(verifier).config_sha256
    assert cfg.spec.provenance["step"] == 8
    # The model card's training figures are the provenance's (test_model_card.py: every figure).
    card = (run / "final" / "README.md").read_text()
    assert (
        "| Optimiser steps | 8 |" in card
        and f"| Tokens trained on | {cfg.spec.provenance['tokens']} |" in card
    )
    assert 0 < cfg.spec.provenance["draft_vocab_coverage"] <= 1 and (run / "best" / "README.md").is_file()
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["max_steps"] == 8 and saved["noise"] == 0.05
    assert not list(run.glob("config.json")), "the run configuration is train_config.json only"
    assert [x["step"] for x in train_lines(run)] == list(range(1, 9))
    val = train_lines(run, "val")
    assert [x["step"] for x in val] == [2, 4, 6, 8] and len(val[0]["acceptance"]) == 3
    assert series(run / "loss.png") == [0, 1]  # train and validation (test_plots.py: every chart's curves)
    # --tensorboard: the same scalars as metrics.jsonl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run / "tensorboard"))
    tb.Reload()
    logged = tb.Scalars("train/loss")
    assert [e.step for e in logged] == [x["step"] for x in train_lines(run)]
    assert [e.value for e in logged] == pytest.approx([x["loss"] for x in train_lines(run)], rel=1e-6)
    assert [e.step for e in tb.Scalars("val/acceptance_length")] == [2, 4, 6, 8]
    best_step = read_config(run / "best")[0].spec.provenance["step"]
    lengths = {x["step"]: x["acceptance_length"] for x in val}
    assert lengths[best_step] == max(lengths.values())


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _rerun(baseline, tmp_path) -> tuple[Path, list[str], Path]:
    """(the baseline's run dir, the baseline's arguments writing to a fresh run dir instead, that dir)."""
    run0, args = baseline
    run = tmp_path / "run"
    return run0, [a if a != str(run0) else str(run) for a in args], run


def test_resume_after_sigkill_mid_step(baseline, tmp_path, run_train):
    run0, args, run = _rerun(baseline, tmp_path)
    killed = run_train(args, env={"SPEC_TRAIN_KILL_AT": "step:5"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    run_train([*args, "--resume"])
    _assert_same_weights(weights(run, 8), weights(run0, 8))  # bitwise, on this CPU
    assert [x["step"] for x in train_lines(run)] == list(range(1, 9)), "no step logged twice"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run / "tensorboard"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("train/loss")] == list(range(1, 9)), "TensorBoard too, none lost"


def test_resume_after_sigkill_mid_checkpoint_write(baseline, tmp_path, run_train):
    run0, args, run = _rerun(baseline, tmp_path)
    killed = run_train(args, env={"SPEC_TRAIN_KILL_AT": "checkpoint:6"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert leftovers, "the kill happened with half a checkpoint on disk"
    assert read_config(run / "final")[0].spec.provenance["step"] == 4  # final/ untouched by the torn write
    proc = run_train([*args, "--resume"])
    assert "left half-written" in proc.stderr and "resumed from" in proc.stderr
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    _assert_same_weights(weights(run, 8), weights(run0, 8))


def test_resume_after_external_sigkill(baseline, tmp_path, run_train):
    """kill -9 from outside at an arbitrary moment of the run (here: once step 3 is logged)."""
    run0, args, run = _rerun(baseline, tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "spec_train", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_train([*args, "--resume"])
    _assert_same_weights(weights(run, 8), weights(run0, 8))


def test_resume_refuses_another_config(baseline, run_train):
    run, args = baseline
    proc = run_train([*args, "--resume", "--lr", "0.5"], check=False)
    assert proc.returncode == 1
    assert "train_config.json: this run was made with lr=0.001, not 0.5" in proc.stderr
    proc = run_train(args, check=False)
    assert proc.returncode == 1 and "already holds a training run; pass --resume" in proc.stderr
    # Run-time settings may change: resuming a finished run with another cadence does nothing and succeeds.
    run_train([*args, "--resume", "--save-every", "3"])


def _ddp_run(run_train, ds, verifier, out, nproc, accum, extra=()):
    args = [str(ds), "--verifier", str(verifier), "--out", str(out), "--max-steps", "4", "--save-every", "4",
            "--grad-accum", str(accum), "--max-eval-rows", "2", *FAST, *extra]  # fmt: skip
    if nproc == 1:
        return run_train(args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "spec_train", *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_two_processes_ddp_match_one_process(ds, verifier, tmp_path, spec_cli, run_train):
    one = tmp_path / "one"
    _ddp_run(run_train, ds, verifier, one, 1, 2)
    two = tmp_path / "two"  # through `spec train --nproc 2` (re-launched under torchrun)
    args = [str(ds), "--verifier", str(verifier), "--out", str(two), "--max-steps", "4", "--save-every", "4",
            "--grad-accum", "1", "--max-eval-rows", "2", *FAST, "--nproc", "2"]  # fmt: skip
    proc = subprocess.run([spec_cli, "train", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = train_lines(one), train_lines(two)
    np.testing.assert_allclose([x["loss"] for x in b], [x["loss"] for x in a], rtol=1e-5)
    assert [x["tokens"] for x in b] == [x["tokens"] for x in a]
    wa, wb = weights(one, 4), weights(two, 4)
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert json.loads((two / "train_config.json").read_text())["world_size"] == 2


def test_two_processes_fsdp2_match_one_process(ds, verifier, tmp_path, run_train):
    one = tmp_path / "one"
    _ddp_run(run_train, ds, verifier, one, 1, 2)
    two = tmp_path / "two"
    _ddp_run(run_train, ds, verifier, two, 2, 1, ["--fsdp"])
    np.testing.assert_allclose(
        [x["loss"] for x in train_lines(two)], [x["loss"] for x in train_lines(one)], rtol=1e-5
    )
    wa, wb = weights(one, 4), weights(two, 4)
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert not validate_checkpoint(two / "final").errors


@pytest.mark.parametrize(
    "algorithm, extra, wrap",
    [
        ("peagle", ["--ttt-steps", "3"], []),
        ("dflash", ["--mask-token-id", "5", "--max-anchors", "16"], ["--fsdp"]),
    ],
)
def test_parallel_drafts_train_under_torchrun(ds, verifier, tmp_path, run_train, algorithm, extra, wrap):
    """P-EAGLE under DDP and DFlash under FSDP2, two ranks against one process with two micro-batches: the
    same rows per step (tokens), the same COD slots / anchors (drawn by seed and global row), so the same
    losses and weights as far as float sums go (a missing gradient all-reduce moves step 2's loss), and a
    valid checkpoint from rank 0."""
    one, two = tmp_path / "one", tmp_path / "two"
    _ddp_run(run_train, ds, verifier, one, 1, 2, ["--algorithm", algorithm, *extra])
    _ddp_run(run_train, ds, verifier, two, 2, 1, ["--algorithm", algorithm, *extra, *wrap])
    a, b = train_lines(one), train_lines(two)
    assert [x["tokens"] for x in b] == [x["tokens"] for x in a]
    np.testing.assert_allclose([x["loss"] for x in b], [x["loss"] for x in a], rtol=1e-5)
    wa, wb = weights(one, 4), weights(two, 4)
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert not validate_checkpoint(two / "final", verifier).errors
    assert read_config(two / "final")[0].algorithm == algorithm


def test_moe_target_trains_a_dense_draft(tiny_dataset, tiny_model, tmp_path, run_train):
    verifier = tiny_model("qwen3_moe")
    ds = tiny_dataset("qwen3_moe", n=8)
    run = tmp_path / "run"
    run_train([str(ds), "--verifier", str(verifier), "--out", str(run), "--max-steps", "3", *FAST])
    cfg, _ = read_config(run / "final")
    lc = cfg.transformer_layer_config
    vcfg = json.loads((verifier / "config.json").read_text())
    assert lc["model_type"] == "qwen3" and lc["intermediate_size"] == (
        vcfg.get("intermediate_size") or 3 * vcfg["hidden_size"]
    )
    assert not validate_checkpoint(run / "final").errors
    losses = [x["loss"] for x in train_lines(run)]
    assert all(np.isfinite(losses))


def test_config_file_flags_override_and_fine_tune(baseline, ds, verifier, tmp_path, run_train):
    run0, _ = baseline
    conf = tmp_path / "train.toml"
    conf.write_text('lr = 5e-4\nttt-steps = 2\nmax_steps = 2\nverifier_name = "my-org/tiny-llama"\n')
    run = tmp_path / "ft"
    run_train([str(ds), "--verifier", str(verifier), "--out", str(run), "--config", str(conf), "--lr", "2e-4",
               "--init-from", str(run0 / "final"), "--no-progress", "--batch-tokens", "160",
               "--loss-mask", "all"])  # fmt: skip
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["lr"] == 2e-4 and saved["ttt_steps"] == 2 and saved["init_from"]
    # --loss-mask all: the same first row as the baseline's, every position in the loss (prompts too),
    # validation still on the dataset's mask.
    first, ref = train_lines(run)[0], train_lines(run0)[0]
    assert first["tokens"] == ref["tokens"] and 0 < ref["supervised"] < first["supervised"]
    assert train_lines(run, "val")[0]["chains"] == train_lines(run0, "val")[0]["chains"]
    cfg, _ = read_config(run / "final")
    assert (
        cfg.speculative_tokens == 2 and cfg.draft_vocab_size == 256
    )  # the fine-tuned draft keeps its vocabulary
    assert cfg.verifier_name == "my-org/tiny-llama"
    assert cfg.spec.verifier.config_sha256 == fingerprint_model_dir(verifier).config_sha256
    proc = run_train([str(ds), "--verifier", str(verifier), "--out", str(tmp_path / "x"), "--init-from",
                      str(run0 / "final"), "--draft-vocab-size", "512", *FAST[2:]], check=False)  # fmt: skip
    assert proc.returncode == 1 and "keeps its vocabulary" in proc.stderr


def test_one_sample_trains_without_validation_across_epochs(tiny_dataset, verifier, tmp_path, run_train):
    ds = tiny_dataset("llama", n=1, seed=3)
    run = tmp_path / "run"
    proc = run_train([str(ds), "--verifier", str(verifier), "--out", str(run), "--max-steps", "3", *FAST])
    assert "training without validation" in proc.stderr
    assert [x["epoch"] for x in train_lines(run)] == [0, 1, 2]
    assert not (run / "best").exists() and (run / "final" / "config.json").exists()


def test_max_train_samples_trains_on_a_prefix_with_its_own_vocabulary(ds, verifier, tmp_path, run_train):
    """--max-train-samples N: the first N training samples, the whole dataset's validation split, and a
    draft vocabulary counted over those N samples only (a data-scaling study must not see the rest)."""
    from spec_format.dataset import Dataset
    from spec_format.vocab import build_vocab_mapping
    from spec_train.config import TrainConfig
    from spec_train.data import supervised_token_counts, training_split

    run = tmp_path / "run"
    proc = run_train([str(ds), "--verifier", str(verifier), "--out", str(run), "--max-steps", "2",
                      "--max-train-samples", "5", *FAST, "--draft-vocab-size", "16"])  # fmt: skip
    data = Dataset(ds)
    cfg = TrainConfig(dataset=str(ds), verifier=str(verifier), out=str(run), max_train_samples=5)
    split = training_split(cfg, len(data))
    whole = training_split(TrainConfig(dataset=str(ds), verifier=str(verifier), out=str(run)), len(data))
    assert split.train.tolist() == whole.train[:5].tolist() and split.val.tolist() == whole.val.tolist()
    tokens = int(data.lengths[split.train].sum())
    assert f"5 training samples ({tokens} tokens," in proc.stderr
    assert f"{len(whole.val)} validation samples" in proc.stderr
    V = fingerprint_model_dir(verifier).vocab_size
    want = build_vocab_mapping(
        supervised_token_counts(data, split.train, V), 16
    )  # fewer than either has seen
    assert not np.array_equal(want.d2t, build_vocab_mapping(data.token_frequencies(V), 16).d2t)
    with safe_open(str(run / "final" / "model.safetensors"), framework="np") as f:  # d2t alone: no bf16
        assert np.array_equal(f.get_tensor("d2t"), want.d2t)


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the problem, exit 1, before training starts.


def _fails(run_train, args, *needles):
    proc = run_train([*FAST, *args], check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for n in needles:
        assert n in last, last
    return last


def test_bad_input(ds, verifier, tiny_model, tmp_path, run_train, capture_dataset):
    out = ["--out", str(tmp_path / "run")]
    _fails(
        run_train,
        [str(ds), "--verifier", str(tiny_model("qwen3")), *out],
        "captured from another target",
        "architecture",
    )
    _fails(
        run_train,
        [str(ds), "--verifier", str(verifier), *out, "--draft-vocab-size", "60000"],
        "larger than the verifier",
    )
    no_last = capture_dataset(
        verifier, [(np.arange(10, 30), np.ones(20, bool))], tmp_path / "nolast", layer_ids=[2, 4, 5]
    )
    _fails(run_train, [str(no_last), "--verifier", str(verifier), *out], "lack capture id 8")
    from spec_format.dataset import DatasetWriter

    info = fingerprint_model_dir(verifier)
    with DatasetWriter(tmp_path / "empty", target=info, layer_ids=[2, 4, 5, 8], hidden_size=info.hidden_size):
        pass
    _fails(run_train, [str(tmp_path / "empty"), "--verifier", str(verifier), *out], "no samples")
    _fails(run_train, [str(ds), "--verifier", str(verifier), *out, "--step-weights", "1,2"], "--step-weights")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_corrupted_shard_mid_epoch_keeps_last_checkpoint(
    verifier, tmp_path, run_train, capture_dataset, make_rows
):
    """NaNs written over one sample's hidden states (the shard's structure is intact, so only reading it
    finds out): the run stops at the step that reads it, naming the shard; earlier checkpoints stay."""
    from spec_format.dataset import Dataset
    from spec_train.data import Stream, split_samples

    ds_dir = capture_dataset(verifier, make_rows(12, seed=5), tmp_path / "ds", samples_per_shard=4)
    ds = Dataset(ds_dir)
    split = split_samples(len(ds), 0.0, 256, 0)
    victim = Stream(split.train, ds.lengths, 160, 0).epoch(0).row(2)[0][0]  # read at step 3
    k, j = ds.locate(victim)
    reader = ds.shard(k)
    c = [col.name for col in reader.columns].index("hidden")  # index row: 3 counts, then (offset, nbytes)
    off, nbytes = int(reader.index[j, 3 + 2 * c]), int(reader.index[j, 4 + 2 * c])
    path = ds_dir / ds.manifest.shards[k].file
    del ds, reader
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(b"\xff" * nbytes)
    run = tmp_path / "run"
    last = _fails(run_train, [str(ds_dir), "--verifier", str(verifier), "--out", str(run), "--max-steps", "6",
                   "--save-every", "1", "--val-fraction", "0"], "non-finite loss at step 3", path.name)  # fmt: skip
    assert "spec validate --deep" in last
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert not validate_checkpoint(run / "final").errors


def test_peagle_fine_tunes_an_eagle3_draft_and_resumes_exactly(baseline, ds, verifier, tmp_path, run_train):
    """--algorithm peagle --init-from an EAGLE-3 draft: a P-EAGLE checkpoint (mask_hidden, k = 4) with the
    same metrics, starting from the EAGLE-3 draft's tensors; COD sampling draws by (seed, global row), so a
    run killed mid-step resumes bitwise."""
    run0, _ = baseline

    def args(run):
        return [str(ds), "--verifier", str(verifier), "--out", str(run), "--algorithm", "peagle", "--init-from",
                str(run0 / "final"), "--ttt-steps", "4", "--max-steps", "4", "--save-every", "2", "--keep-last",
                "10", *FAST]  # fmt: skip

    # The draft it starts from holds every tensor of the EAGLE-3 files, bit for bit, and a new mask_hidden.
    import torch
    from safetensors.torch import load_file as load_torch

    from spec_format.dataset import Dataset
    from spec_train import distributed, peagle
    from spec_train.config import TrainConfig

    cfg = TrainConfig(dataset=str(ds), verifier=str(verifier), out=str(tmp_path / "x"), algorithm="peagle",
                      init_from=str(run0 / "final"), ttt_steps=4)  # fmt: skip
    start = peagle.build_draft(cfg, Dataset(ds), distributed.Dist(0, 1, 0, torch.device("cpu")))[0]
    start, source = start.state_dict(), load_torch(str(run0 / "final" / "model.safetensors"))
    # embed_tokens: the verifier's when the file has none; t2d: derived from d2t when loaded
    assert {"mask_hidden"} <= start.keys() - source.keys() <= {"mask_hidden", "embed_tokens.weight"}
    assert source.keys() - start.keys() <= {"t2d"} and "fc.weight" in source
    for k in start.keys() & source.keys():
        assert torch.equal(start[k], source[k].to(start[k].dtype)), k
    run_train(args(tmp_path / "a"))
    assert not validate_checkpoint(tmp_path / "a" / "final", verifier).errors
    cfg, _ = read_config(tmp_path / "a" / "final")
    assert cfg.algorithm == "peagle" and cfg.speculative_tokens == 4 and cfg.mask_token_id is not None
    assert cfg.draft_vocab_size == 256 and "draft.mask_hidden" in weights(tmp_path / "a", 4)
    assert len(train_lines(tmp_path / "a", "val")[-1]["acceptance"]) == 4
    assert len(train_lines(tmp_path / "a")[-1]["loss_steps"]) == 4
    killed = run_train(args(tmp_path / "b"), env={"SPEC_TRAIN_KILL_AT": "step:3"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    run_train([*args(tmp_path / "b"), "--resume"])
    _assert_same_weights(weights(tmp_path / "b", 4), weights(tmp_path / "a", 4))


def test_cut_samples_are_counted_with_their_supervised_tokens(ds):
    """No silent loss: samples longer than --batch-tokens are reported with the supervised tokens past the
    budget (counted here from the loss masks themselves) and the flag value that keeps them whole."""
    from spec_format.dataset import Dataset
    from spec_train.data import cut_report

    data = Dataset(ds)
    samples = np.arange(len(data))
    budget = int(np.median(data.lengths))
    masks = [data.raw(i).loss_mask for i in samples]
    long = [m for m in masks if len(m) > budget]
    lost, total = sum(int(m[budget:].sum()) for m in long), sum(int(m.sum()) for m in masks)
    line = cut_report(data, samples, budget)
    assert 0 < lost < total
    assert f"{len(long)} of {len(samples)} training samples are longer than --batch-tokens {budget}" in line
    assert f"{lost} of {total} supervised tokens" in line
    keep = int(line.rsplit("--batch-tokens ", 1)[1].split()[0])
    assert keep % 128 == 0 and keep >= data.lengths.max()
    assert cut_report(data, samples, int(data.lengths.max())) is None
