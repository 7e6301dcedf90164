"""The verifier's output head, read from its safetensors alone (final norm + lm_head, or the tied
embeddings): the training targets come from it, applied to the captured last hidden state.

Capture id L (the dataset's last layer) is the last decoder layer's output before the final norm, so the
verifier's next-token logits at position p are lm_head(norm(last[p])). For the loss only the draft
vocabulary's rows are used (W[target_ids] @ norm(h): no full-vocabulary matmul); the full vocabulary is
used only for the verifier's greedy token (acceptance needs the target's own argmax).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from spec_format.errors import SpecError
from spec_format.fingerprint import read_model_config
from spec_models.verifier import EMBED_NAMES, LM_HEAD_NAMES, NORM_NAMES, read_verifier_tensors

# Output heads with something besides norm + matmul; their logits would differ from what we compute.
_UNSUPPORTED_HEAD_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


class VerifierHead(nn.Module):
    """Buffers (not parameters: never trained, never synchronised or sharded by DDP/FSDP):
    norm_weight [H], draft_weight [draft_vocab, H] (rows of the draft vocabulary), full_weight [V, H]."""

    def __init__(self, verifier_dir: str | Path, target_ids: np.ndarray):
        super().__init__()
        cfg = read_model_config(verifier_dir)
        for key in _UNSUPPORTED_HEAD_KEYS:
            if cfg.get(key) not in (None, 1, 1.0):
                raise SpecError(
                    f"{Path(verifier_dir) / 'config.json'}: field '{key}' is set; the trainer computes plain "
                    "lm_head(norm(h)) logits and does not support this head yet"
                )
        if cfg.get("model_type", "").startswith("gemma"):
            raise SpecError(
                f"{verifier_dir}: Gemma's (1 + w) RMSNorm head is not supported by the trainer yet"
            )
        found = read_verifier_tensors(
            verifier_dir, {"embed": EMBED_NAMES, "lm_head": LM_HEAD_NAMES, "norm": NORM_NAMES}
        )
        head = found.get("lm_head", found.get("embed"))
        if head is None or "norm" not in found:
            missing = "lm_head/embed_tokens" if head is None else "the final norm"
            raise SpecError(f"{verifier_dir}: no {missing} tensor in the verifier's safetensors")
        self.eps = float(cfg.get("rms_norm_eps", 1e-6))
        full = torch.from_numpy(np.array(head, dtype=np.float32))  # a copy: the file is memory-mapped
        self.register_buffer("full_weight", full, persistent=False)
        self.register_buffer(
            "draft_weight", full[torch.from_numpy(target_ids)].contiguous(), persistent=False
        )
        self.register_buffer("norm_weight", torch.from_numpy(found["norm"].copy()), persistent=False)

    @property
    def vocab_size(self) -> int:
        return self.full_weight.shape[0]

    def normed(self, last: torch.Tensor) -> torch.Tensor:
        """The verifier's final RMSNorm in fp32: last [..., H] -> [..., H] (the lm_head input)."""
        x = last.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight.float()

    def draft_logits(self, normed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The verifier's logits over the draft vocabulary: normed [N, H] -> float32 [N, draft_vocab]."""
        return (normed.to(dtype) @ self.draft_weight.to(dtype).T).float()

    @torch.no_grad()
    def greedy(
        self, normed: torch.Tensor, chunk: int = 1024, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """The verifier's greedy token over its FULL vocabulary: normed [N, H] -> int64 [N], chunked so
        that [N, V] logits are never held whole."""
        w = self.full_weight.to(dtype)
        out = [(normed[i : i + chunk].to(dtype) @ w.T).argmax(-1) for i in range(0, normed.shape[0], chunk)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=normed.device)
