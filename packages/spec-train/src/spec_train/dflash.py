"""DFlash training (spec_models.dflash): blocks at sampled anchors of each packed row, all filled in one
non-causal forward. Registered as the `dflash` algorithm (spec_train.algorithms).

Alignment, for a packed row x_0..x_{T-1} (documents restart their positions at 0): an anchor a is a token
the verifier has just produced; the draft sees the verifier's aux states of a's document before a (the
context vLLM keeps in the draft's KV cache) and the block [x_a, mask * k] at positions pos[a] .. pos[a]+k
(k = --ttt-steps, the checkpoint's speculative_tokens; block_size = k + 1). Slot j+1 (depth j) predicts
x_{a+1+j}: written at the trainer's slot t = a - 1, where depth j predicts x_{t+2+j} and loss.py takes the
verifier's distribution after x_{a+j} as its target. It counts iff x_{a+1+j} is a supervised token of a's
document (data.supervised_slots at t).

Anchors: the slots t with a supervised x_{t+2} in their document; at most `max_anchors` per row, drawn
uniformly (top-k of random scores: static shapes, no host sync; data.slot_uniforms, by seed and global
row). slot_counts is the expectation, min(1, max_anchors / candidates) * supervised slots, so each
depth's loss is scaled to the full computation's. The verifier's logits are computed only at the
drafted slots (loss.py), never [tokens x vocab]. Depth weights: the trainer's 0.8**j is exp(-j / 4.48),
z-lab's exponential decay with gamma 4.5 (they use 4 for blocks of 8, 7 for 16); --step-weights changes it.
"""

from __future__ import annotations

import torch

from spec_format.dataset import Dataset
from spec_format.errors import SpecError
from spec_models.dflash import DFlashDraft, block_inputs, init_dflash_from_verifier, propose_dflash
from spec_train import distributed
from spec_train.algorithms import Algorithm, register_algorithm
from spec_train.config import TrainConfig, default
from spec_train.data import layer_indices, slot_uniforms, supervised_slots
from spec_train.drafts import draft_vocabulary, load_init_draft
from spec_train.metrics import chain_counts
from spec_train.offline import greedy_targets
from spec_train.targets import VerifierHead


def build_draft(cfg: TrainConfig, ds: Dataset, d: distributed.Dist):
    if cfg.init_from:
        draft, aux_idx, last_idx = load_init_draft(cfg, ds)
        if draft.config.algorithm != "dflash":
            raise SpecError(f"--init-from {cfg.init_from}: a '{draft.config.algorithm}' draft; --algorithm dflash fine-tunes dflash drafts")  # fmt: skip
        if draft.spec.k != cfg.ttt_steps:
            raise SpecError(f"--ttt-steps {cfg.ttt_steps}: the DFlash draft in {cfg.init_from} fills blocks of {draft.spec.k + 1}; pass --ttt-steps {draft.spec.k}")  # fmt: skip
        return draft, aux_idx, last_idx
    aux_idx, last_idx = layer_indices(ds, None, cfg.verifier)
    aux_ids = [ds.manifest.layer_ids[i] for i in aux_idx]
    if len(aux_ids) < 2:
        raise SpecError(
            f"{cfg.dataset}: holds aux layers {aux_ids} besides the last; DFlash reads at least two: capture "
            "more (spec datagen --algorithm dflash picks its default --layers)"
        )
    d.say(f"DFlash reads the dataset's layers {aux_ids} (capture ids), blocks of {cfg.ttt_steps + 1}")
    draft = init_dflash_from_verifier(
        cfg.verifier, aux_ids, vocab_mapping=draft_vocabulary(cfg, ds, d), num_layers=cfg.num_layers,
        speculative_tokens=cfg.ttt_steps, mask_token_id=cfg.mask_token_id, name_or_path=cfg.verifier_name,
        seed=cfg.seed, layers_from_verifier=cfg.layer_init == "verifier",
    )  # fmt: skip
    return draft, aux_idx, last_idx


def draft_blocks(draft: DFlashDraft, batch: dict, anchors: torch.Tensor) -> torch.Tensor:
    """normed [N, k, H]: the masked slots of the blocks at `anchors` [N] (row indices; -1 = padding, its
    output is garbage) in one packed row. Block n's queries see the context of their document before the
    anchor (index t in [a - pos[a], a)) and all keys of their own block."""
    ids, pos = batch["input_ids"], batch["position_ids"]
    T, N, width = pos.shape[0], anchors.shape[0], draft.spec.k + 1
    a = anchors.clamp(min=0)
    bids, bpos = block_inputs(draft, ids[a][None], pos[a][None])
    t = torch.arange(T, device=pos.device)
    ctx = (t[None] >= (a - pos[a])[:, None]) & (t[None] < a[:, None])  # [N, T]
    own = torch.eye(N, dtype=torch.bool, device=pos.device).repeat_interleave(width, 1)  # [N, N*width]
    mask = torch.cat([ctx, own], 1).repeat_interleave(width, 0)[None, None]  # [1, 1, N*width, T+N*width]
    normed = draft(bids, bpos, draft.combine(batch["aux"][None]), pos[None], mask)[0]
    return normed.view(N, width, -1)[:, 1:]


def _scatter(normed: torch.Tensor, anchors: torch.Tensor, T: int) -> torch.Tensor:
    """normed [N, k, H] of anchors [N] -> [k, T, H] at slots t = a - 1 (padding goes to a dropped column)."""
    N, k, H = normed.shape
    t = torch.where(anchors >= 1, anchors - 1, T)
    out = normed.new_zeros(k, T + 1, H)
    out[:, t] = normed.transpose(0, 1)
    return out[:, :T]


def forward(draft, batch: dict[str, torch.Tensor], steps: int, attn: str, cfg: TrainConfig | None = None):
    valid = supervised_slots(batch["loss_mask"], batch["position_ids"], steps)  # [S, T]
    T, dev = valid.shape[1], valid.device
    n = min(cfg.max_anchors if cfg is not None else default("max_anchors"), T)
    score = torch.where(valid[0], slot_uniforms(batch), -1.0)
    top = score.topk(n).indices  # slots t; anchors a = t + 1
    chosen = score[top] >= 0
    anchors = torch.where(chosen, top + 1, -1)
    keep = torch.zeros(T, dtype=torch.bool, device=dev)
    keep[top] = chosen
    return _scatter(draft_blocks(draft, batch, anchors), anchors, T), valid & keep


def slot_counts(
    loss_mask: torch.Tensor, position_ids: torch.Tensor, steps: int, cfg: TrainConfig | None = None
):
    valid = supervised_slots(loss_mask, position_ids, steps)
    n = cfg.max_anchors if cfg is not None else default("max_anchors")
    return valid.sum(-1).float() * min(1.0, n / max(1, int(valid[0].sum())))


@torch.no_grad()
def block_counts(
    draft: DFlashDraft, head: VerifierHead, batch: dict, k: int, anchors_per_pass: int = 64,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(accepted [k], reached [k]) over every anchor of one packed row (data.RowLoader.load): the chains
    vLLM's counters count, in passes of `anchors_per_pass` blocks. Exactly what propose_dflash drafts
    from each anchor's context alone (tests/test_dflash.py), so it serves training and `--offline`."""
    if k != draft.spec.k:
        raise SpecError(
            f"this DFlash draft fills blocks of {draft.spec.k + 1}: it drafts k = {draft.spec.k}, not {k}"
        )
    eligible = supervised_slots(batch["loss_mask"], batch["position_ids"], k)  # [k, T] at slots t = a - 1
    greedy = greedy_targets(head, batch["last"], dtype)  # [T]: the verifier's token after x_t
    slots = eligible[0].nonzero().squeeze(1)
    T, dev = eligible.shape[1], eligible.device
    tokens = torch.zeros(k, T, dtype=torch.long, device=dev)
    for i in range(0, len(slots), anchors_per_pass):
        anchors = torch.full((anchors_per_pass,), -1, dtype=torch.long, device=dev)
        chunk = slots[i : i + anchors_per_pass]
        anchors[: len(chunk)] = chunk + 1
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            drafted = draft.greedy(draft_blocks(draft, batch, anchors))  # [N, k]
        tokens[:, chunk] = drafted[: len(chunk)].T
    # depth j at slot t drafted x_{t+2+j}; the verifier's token there is greedy[t+1+j]
    match = torch.zeros(k, T, dtype=torch.bool, device=dev)
    for j in range(k):
        if T - 1 - j > 0:
            match[j, : T - 1 - j] = tokens[j, : T - 1 - j] == greedy[1 + j :]
    return chain_counts(match, eligible)


def accept_counts(draft, head, batch, k, attn="sdpa", dtype=torch.float32):
    return block_counts(draft, head, batch, k, dtype=dtype)


def offline_counts(draft, head, sample, k):
    return block_counts(draft, head, sample, k)


register_algorithm(
    "dflash",
    Algorithm(build_draft, forward, slot_counts, accept_counts, offline_counts, propose_dflash, "dpace"),
)
