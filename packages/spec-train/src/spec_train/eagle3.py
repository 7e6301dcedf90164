"""EAGLE-3 training: test-time-training (TTT) steps, each depth fed the previous depth's own hidden state
(spec_models.ttt); a new draft starts from the verifier (spec_models.init_eagle3_from_verifier).
Registered as the `eagle3` algorithm (spec_train.algorithms)."""

from __future__ import annotations

import torch

from spec_format.dataset import Dataset
from spec_format.errors import SpecError
from spec_models import forward_ttt, propose, ttt_input_ids
from spec_train import distributed
from spec_train.algorithms import Algorithm, register_algorithm
from spec_train.config import TrainConfig
from spec_train.data import layer_indices, supervised_slots
from spec_train.drafts import draft_vocabulary, load_init_draft
from spec_train.offline import incremental_counts, ttt_counts


def new_eagle3_draft(cfg: TrainConfig, ds: Dataset, d: distributed.Dist):
    """(a new EAGLE-3 draft from the verifier, aux_idx, last_idx)."""
    from spec_models import init_eagle3_from_verifier

    aux_idx, last_idx = layer_indices(ds, None, cfg.verifier)
    draft = init_eagle3_from_verifier(
        cfg.verifier, aux_layer_ids=[ds.manifest.layer_ids[i] for i in aux_idx],
        vocab_mapping=draft_vocabulary(cfg, ds, d), num_layers=cfg.num_layers,
        layer_type=cfg.layer_type, speculative_tokens=cfg.ttt_steps,
        norm_before_residual=cfg.norm_before_residual, norm_before_fc=cfg.norm_before_fc, fc_norm=cfg.fc_norm,
        norm_output=cfg.norm_output, name_or_path=cfg.verifier_name, seed=cfg.seed,
        layers_from_verifier=cfg.layer_init == "verifier",
    )  # fmt: skip
    return draft, aux_idx, last_idx


def build_draft(cfg: TrainConfig, ds: Dataset, d: distributed.Dist):
    if cfg.init_from:
        draft, aux_idx, last_idx = load_init_draft(cfg, ds)
        if draft.config.algorithm != "eagle3":
            raise SpecError(
                f"--init-from {cfg.init_from}: a '{draft.config.algorithm}' draft; --algorithm eagle3 fine-tunes eagle3 drafts"
            )
        return draft, aux_idx, last_idx
    return new_eagle3_draft(cfg, ds, d)


def forward(draft, batch: dict[str, torch.Tensor], steps: int, attn: str, cfg: TrainConfig | None = None):
    """TTT, teacher-forced: depth j reads x_{t+1+j} and depth j-1's hidden state."""
    ids, pos = batch["input_ids"][None], batch["position_ids"][None]  # [1, T]
    normed = forward_ttt(draft, ttt_input_ids(ids, steps), batch["aux"][None], pos, attn)[:, 0]
    return normed, supervised_slots(batch["loss_mask"], batch["position_ids"], steps)


def slot_counts(
    loss_mask: torch.Tensor, position_ids: torch.Tensor, steps: int, cfg: TrainConfig | None = None
) -> torch.Tensor:
    return supervised_slots(loss_mask, position_ids, steps).sum(-1).float()


register_algorithm(
    "eagle3", Algorithm(build_draft, forward, slot_counts, ttt_counts, incremental_counts, propose)
)
