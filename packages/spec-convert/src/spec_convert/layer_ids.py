"""The auxiliary verifier layers that feed fc, in vLLM's convention.

Layer ids in the output are vLLM capture ids (spec_format.fingerprint.LAYER_CONVENTION): id k is the
residual stream entering decoder layer k (= after layer k-1). Sources that count "the output of decoder
layer x" (SGLang, SpecForge, ModelOpt) store x = k - 1.
"""

from __future__ import annotations

import numpy as np

from spec_convert.target import Target


def resolve_layer_ids(
    *,
    override: list[int] | None,
    recorded: list[int] | None,
    shift: int,
    default: list[int],
    default_rule: str,
    target: Target,
    n_inputs: int,
    field: str = "",
    convention: str = "",
) -> tuple[list[int], dict, list[str]]:
    """(ids in vLLM's convention, provenance, problems).

    recorded: the source's own ids (in its `convention`), converted with `+ shift`; default: the source
    project's ids in vLLM's convention when it records none (`default_rule` says where they come from);
    override: --layers, already in vLLM's convention. n_inputs: how many hidden states fc takes."""
    if override is not None:
        ids = list(override)
        how = {"value": ids, "from": "--layers (vLLM capture ids)"}
        if recorded is not None:
            how["source"] = {"field": field, "value": recorded, "convention": convention}
    elif recorded is not None:
        ids = [x + shift for x in recorded]
        how = {
            "value": ids,
            "from": f"source field '{field}' = {recorded} ({convention})"
            + (f"; vLLM id = x + {shift}" if shift else ""),
        }
    else:
        ids = list(default)
        how = {
            "value": ids,
            "from": f"the source records no layer ids; {default_rule}; override with --layers",
        }
    L = target.num_layers
    problems = []
    if sorted(set(ids)) != ids:
        problems.append(
            f"auxiliary layer ids {ids} must be distinct and increasing (vLLM concatenates the hidden states "
            f"in layer order); for a {L}-layer verifier pass --layers explicitly"
        )
    bad = [i for i in ids if not 0 <= i <= L]
    if bad:
        problems.append(f"auxiliary layer ids {bad} lie outside [0, {L}] for the {L}-layer verifier")
    if len(ids) != n_inputs:
        problems.append(
            f"{len(ids)} auxiliary layer ids {ids} but fc.weight takes {n_inputs} hidden states of the verifier; "
            "pass that many ids with --layers"
        )
    return ids, how, problems


def fc_inputs(fc: np.ndarray | None, target: Target) -> int:
    """How many verifier hidden states fc concatenates (its in-features / the verifier's hidden size)."""
    if fc is None or fc.ndim != 2 or fc.shape[1] % target.info.hidden_size:
        return 3  # the shape check reports the actual problem
    return fc.shape[1] // target.info.hidden_size
