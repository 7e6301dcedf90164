"""P-EAGLE training (spec_models.peagle): every slot of a packed row anchors a chain of k drafted depths,
all run in one forward (no depth waits for another's output, unlike EAGLE-3's TTT).

COD sampling (the P-EAGLE paper's; speculators `cod_sampling.py` samples each depth independently):
depth d >= 1 runs a random max(cod_ratio**d, cod_min) of the slots that have a supervised target at
depth d or beyond. We draw one uniform u_t per slot (data.slot_uniforms: by seed and global row) and
keep t at depth d iff u_t < rate_d, so each depth's anchors are a subset of the previous depth's (a
depth-d query attends to its chain's depths 1..d-1, as in vLLM's cache). The loss of depth d is scaled
by weight_d / (rate_d * supervised slots): its expected value is the full computation's. Registered as
the `peagle` algorithm.
"""

from __future__ import annotations

import torch

from spec_format.dataset import Dataset
from spec_format.errors import SpecError
from spec_models import forward_parallel, peagle_from_eagle3, propose_parallel
from spec_models.peagle import default_mask_token
from spec_train import distributed
from spec_train.algorithms import Algorithm, register_algorithm
from spec_train.config import TrainConfig, default
from spec_train.data import slot_uniforms, supervised_slots
from spec_train.drafts import load_init_draft
from spec_train.eagle3 import new_eagle3_draft
from spec_train.metrics import chain_counts
from spec_train.offline import _draft_tokens, _match, greedy_targets
from spec_train.targets import VerifierHead

PAD_QUERIES = 64  # a row's query count is padded to a multiple (CPU bf16 compiles a kernel per shape)


def build_draft(cfg: TrainConfig, ds: Dataset, d: distributed.Dist):
    if cfg.init_from:
        draft, aux_idx, last_idx = load_init_draft(cfg, ds)
        if draft.config.algorithm == "peagle":
            if cfg.mask_token_id not in (None, draft.mask_token_id):
                raise SpecError(f"--mask-token-id {cfg.mask_token_id}: the draft in {cfg.init_from} uses {draft.mask_token_id}")  # fmt: skip
            return draft, aux_idx, last_idx
        if draft.config.algorithm != "eagle3":
            raise SpecError(f"--init-from {cfg.init_from}: a '{draft.config.algorithm}' draft; P-EAGLE starts from eagle3 or peagle drafts")  # fmt: skip
    else:
        draft, aux_idx, last_idx = new_eagle3_draft(cfg, ds, d)
    mask = cfg.mask_token_id if cfg.mask_token_id is not None else default_mask_token(cfg.verifier)
    return peagle_from_eagle3(draft, mask, cfg.seed), aux_idx, last_idx


def cod_rates(steps: int, cfg: TrainConfig | None) -> torch.Tensor:
    """[S] fraction of slots each depth runs: 1 at depth 0, max(ratio**d, min) after (non-increasing)."""
    ratio, floor = (default("cod_ratio"), default("cod_min")) if cfg is None else (cfg.cod_ratio, cfg.cod_min)
    return torch.tensor([1.0] + [min(1.0, max(ratio**d, floor)) for d in range(1, steps)])


def _run(draft, batch: dict[str, torch.Tensor], keep: torch.Tensor, attn: str = "auto") -> torch.Tensor:
    """normed [S, T, H] (zeros where keep [S, T] is False; depth 0 runs every slot)."""
    S, T = keep.shape
    dev = keep.device
    next_ids = torch.cat([batch["input_ids"][1:], batch["input_ids"][:1]])  # slot t reads x_{t+1}
    anchors = [keep[d].nonzero().squeeze(1) for d in range(1, S)]
    padding = -(T + sum(len(a) for a in anchors)) % PAD_QUERIES  # outputs dropped
    normed = forward_parallel(draft, next_ids, batch["aux"], batch["position_ids"], anchors, attn, padding)
    index = torch.cat([torch.arange(T, device=dev)] + [d * T + a for d, a in enumerate(anchors, start=1)])
    out = normed.new_zeros(S * T, normed.shape[-1])
    out[index] = normed[: len(index)]
    return out.view(S, T, -1)


def forward(draft, batch: dict[str, torch.Tensor], steps: int, attn: str, cfg: TrainConfig | None = None):
    valid = supervised_slots(batch["loss_mask"], batch["position_ids"], steps)  # [S, T]
    # slots with a target at depth d or deeper: nested over d, so are the kept subsets
    need = valid.flip(0).int().cummax(0).values.flip(0).bool()
    rates = cod_rates(steps, cfg).to(valid.device)
    keep = need & (slot_uniforms(batch)[None] < rates[:, None])
    return _run(draft, batch, keep, attn), valid & keep


def slot_counts(
    loss_mask: torch.Tensor, position_ids: torch.Tensor, steps: int, cfg: TrainConfig | None = None
):
    return supervised_slots(loss_mask, position_ids, steps).sum(-1).float() * cod_rates(steps, cfg)


@torch.no_grad()
def accept_counts(draft, head: VerifierHead, batch: dict[str, torch.Tensor], k: int, attn: str = "sdpa",
                  dtype: torch.dtype = torch.float32):  # fmt: skip
    """(accepted [k], reached [k]) over a packed row: every chain that could reach depth d runs depth d.
    The parallel slots read no draft token, so this is vLLM's greedy drafting exactly."""
    eligible = supervised_slots(batch["loss_mask"], batch["position_ids"], k)
    greedy = greedy_targets(head, batch["last"], dtype)
    with torch.autocast(eligible.device.type, dtype=dtype, enabled=dtype != torch.float32):
        normed = _run(draft, batch, eligible.int().cumprod(0).bool(), attn)
    return chain_counts(_match(_draft_tokens(draft, normed), greedy), eligible)


@torch.no_grad()
def offline_counts(
    draft, head: VerifierHead, sample: dict[str, torch.Tensor], k: int, slots_per_batch: int = 64
):
    """(accepted [k], reached [k]) for one sample, drafted as vLLM does (propose_parallel over the
    context up to each slot), for `spec eval --offline`."""
    ids, aux = sample["input_ids"], sample["aux"]
    n = ids.shape[0]
    eligible = supervised_slots(sample["loss_mask"], torch.arange(n, device=ids.device), k)
    greedy = greedy_targets(head, sample["last"])
    tokens = torch.zeros(k, n, dtype=torch.long, device=ids.device)
    slots = eligible[0].nonzero().squeeze(1)
    for start in range(0, len(slots), slots_per_batch):
        t = slots[start : start + slots_per_batch]  # each a request whose last context slot is t
        L = int(t.max()) + 1
        next_ids = ids[1:][None, :L].expand(len(t), L)
        tokens[:, t] = propose_parallel(draft, next_ids, aux[None, :L].expand(len(t), L, -1), t + 1, k).T
    return chain_counts(_match(tokens, greedy), eligible)


register_algorithm(
    "peagle", Algorithm(build_draft, forward, slot_counts, accept_counts, offline_counts, propose_parallel)
)
