"""`spec train --algorithm dflash` on a tiny target: the run, exact resume after SIGKILL, the layers it
reads, bad input; and the training-time acceptance (one pass over many blocks) agreeing with spec-models'
proposer (which tests/test_models_vllm_parity.py holds to vLLM's proposals token for token)."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from spec_format.checkpoint import read_config
from spec_format.validate import validate_checkpoint

FAST = ["--draft-vocab-size", "256", "--batch-tokens", "160", "--no-progress", "--mask-token-id", "5",
        "--algorithm", "dflash", "--ttt-steps", "3", "--max-anchors", "16"]  # fmt: skip


@pytest.mark.e2e  # three training subprocesses (the quick loop has none)
def test_train_resume_and_layers(ds, verifier, tmp_path, run_train):
    args = [
        str(ds),
        "--verifier",
        str(verifier),
        "--max-steps",
        "4",
        "--save-every",
        "2",
        "--keep-last",
        "5",
        *FAST,
    ]
    base = run_train([*args, "--out", str(tmp_path / "a")])
    assert "DFlash reads the dataset's layers [2, 4, 5] (capture ids), blocks of 4" in base.stderr
    final = tmp_path / "a" / "final"
    assert not validate_checkpoint(final, verifier=verifier).errors
    cfg, _ = read_config(final)
    assert cfg.algorithm == "dflash" and cfg.speculative_tokens == 3 and cfg.block_size == 4
    assert cfg.aux_hidden_state_layer_ids == [2, 4, 5] and cfg.mask_token_id == 5
    val = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [len(x["acceptance"]) for x in val if x["split"] == "val"] == [3, 3]

    run = tmp_path / "b"
    killed = run_train([*args, "--out", str(run)], env={"SPEC_TRAIN_KILL_AT": "step:3"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    run_train([*args, "--out", str(run), "--resume"])
    w = "checkpoints/step-000004/training/weights.safetensors"
    a, b = load_file(str(tmp_path / "a" / w)), load_file(str(run / w))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # same anchors, same steps


@pytest.mark.e2e
def test_bad_input(ds, verifier, tmp_path, run_train, capture_dataset):
    out = ["--out", str(tmp_path / "run")]
    one = capture_dataset(
        verifier, [(np.arange(10, 40), np.ones(30, bool))], tmp_path / "one", layer_ids=[4, 8]
    )
    res = run_train([str(one), "--verifier", str(verifier), *out, *FAST], check=False)
    assert res.returncode == 1 and "DFlash reads at least two" in res.stderr and "Traceback" not in res.stderr
    res = run_train([str(ds), "--verifier", str(verifier), *out, *FAST, "--max-anchors", "0"], check=False)
    assert res.returncode == 1 and "--max-anchors must be at least 1" in res.stderr
    res = run_train([str(ds), "--verifier", str(verifier), *out, "--algorithm", "dflsh"], check=False)
    assert res.returncode != 0 and "dflsh" in res.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_block_counts_follow_the_proposer(verifier, ds):
    """Per anchor, the batched training-time blocks (spec_train.dflash: many blocks of one packed row in
    one forward) draft what propose_dflash drafts from that anchor's own context alone, and block_counts
    counts the chains those tokens make."""
    from spec_format.dataset import Dataset
    from spec_format.vocab import build_vocab_mapping
    from spec_models import init_dflash_from_verifier, propose_dflash
    from spec_train.data import RowLoader, supervised_slots
    from spec_train.dflash import block_counts, draft_blocks
    from spec_train.metrics import chain_counts
    from spec_train.targets import VerifierHead

    d = Dataset(ds)
    mapping = build_vocab_mapping(d.token_frequencies(49152), 256)
    draft = init_dflash_from_verifier(
        verifier, [2, 4, 5], mapping, num_layers=2, speculative_tokens=3, mask_token_id=5
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if name != "embed_tokens.weight":
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    head = VerifierHead(verifier, np.arange(1))
    row = RowLoader(ds, [0, 1, 2], 3).load([(i, int(d.lengths[i])) for i in range(3)])  # three documents
    ids, pos = row["input_ids"], row["position_ids"]
    eligible = supervised_slots(row["loss_mask"], pos, 3)  # [3, T] at slot t = anchor - 1
    anchors = eligible[0].nonzero().squeeze(1) + 1
    with torch.no_grad():
        batched = draft.greedy(draft_blocks(draft, row, anchors))  # [N, 3]
    greedy = head.greedy(head.normed(row["last"]))
    match = torch.zeros_like(eligible)
    for n, a in enumerate(anchors.tolist()):
        start = a - int(pos[a])  # the anchor's document starts here; context = positions 0..a-start-1
        alone = propose_dflash(
            draft, ids[start + 1 : a + 1][None], row["aux"][start:a][None], torch.tensor([a - start])
        )
        assert alone[0].tolist() == batched[n].tolist(), a
        for j in range(3):
            match[j, a - 1] = a + j < len(ids) and int(batched[n, j]) == int(greedy[a + j])
    assert len(set(batched.flatten().tolist())) >= 10, "proposals barely depend on the context"
    acc, reach = block_counts(draft, head, row, 3, anchors_per_pass=8)  # several passes, padded
    a2, r2 = chain_counts(match, eligible)
    assert acc.tolist() == a2.tolist() and reach.tolist() == r2.tolist() and reach[0] > 50
