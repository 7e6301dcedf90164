"""A vLLM worker extension that records what the EAGLE-3 drafter sees and proposes.

Loaded inside vLLM's worker with `LLM(worker_extension_cls="vllm_draft_probe.DraftProbe")` (this
directory on sys.path); `llm.collective_rpc("probe_start", args=(out_dir,))` wraps the model runner's
`drafter.propose`. Every call then writes `call-NNNNN.npz` with the inputs vLLM gave the draft (token
ids, positions, the target's concatenated aux hidden states before `fc`, the token just sampled per
request, which slot each request samples from, query boundaries, request ids) and the draft token ids
it returned. numpy files only: tests replay them through spec-models and compare token ids exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _np(t):
    return None if t is None else t.detach().cpu().clone().numpy()


class DraftProbe:
    def probe_start(self, out_dir: str) -> None:
        runner = self.model_runner
        drafter = runner.drafter
        original = drafter.propose
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        count = [0]

        def propose(*args, **kwargs):
            cad = kwargs["common_attn_metadata"]
            qsl = _np(cad.query_start_loc_cpu)  # [B + 1]; propose() overwrites it in later steps
            record = {
                "token_ids": _np(kwargs["target_token_ids"]),  # [N]
                "positions": _np(kwargs["target_positions"]),  # [N]
                "hidden": _np(kwargs["target_hidden_states"]).astype(np.float32),  # [N, num_aux * H]
                "next_token_ids": _np(kwargs["next_token_ids"]),  # [B]
                "query_start_loc": qsl,
            }
            tis = kwargs.get("token_indices_to_sample")
            record["sample_index"] = qsl[1:] - 1 if tis is None else _np(tis)  # [B]
            drafts = original(*args, **kwargs)
            batch = len(qsl) - 1
            record["drafts"] = _np(drafts)  # [B, k] target ids
            record["req_ids"] = np.array(list(runner.input_batch.req_ids)[:batch])
            np.savez(out / f"call-{count[0]:05d}.npz", **record)
            count[0] += 1
            return drafts

        drafter.propose = propose
