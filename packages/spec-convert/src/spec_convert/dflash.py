"""DFlash drafts: z-lab's `DFlashDraftModel` directories and speculators' `dflash` directories.

z-lab (github.com/z-lab/dflash, the Hugging Face z-lab/*-DFlash* cards): config.json is a Qwen3 config
(`model_type: "qwen3"`, `num_hidden_layers` = draft layers, `vocab_size` = the target's) with
`architectures: ["DFlashDraftModel"]`, `block_size` (anchor + masked slots), `num_target_layers` and
`dflash_config: {mask_token_id, target_layer_ids}`. `target_layer_ids` count the decoder layers whose
OUTPUT is read (z-lab's build_target_layer_ids: 1 .. L-3), i.e. vLLM capture id - 1; vLLM adds 1
(eagle3_utils.get_eagle3_aux_layers_from_config), and so do we. Tensors: fc, hidden_norm, layers.N.*
(Qwen3), norm; no embeddings or lm_head (the target's are shared). vLLM ignores `block_size` and serves
the k it is given; we write k = block_size - 1 (--k overrides).

speculators (`speculators_model_type: "dflash"`): our own schema (spec_format.dflash), ids already vLLM
capture ids; verifier_* training copies are dropped. Either way every tensor is mapped or refused by
name, and the result is checked against the dflash layout before anything is written.
"""

from __future__ import annotations

from pathlib import Path

from spec_convert.build import Converted, Options, float_dtype, speculative_tokens
from spec_convert.d2t import vocab_mapping
from spec_convert.layer_config import check_dims, layer_config
from spec_convert.layer_ids import resolve_layer_ids
from spec_convert.output import Export, staged_dir
from spec_convert.source import Source
from spec_convert.strict import ConversionError, check_layout, map_tensors
from spec_convert.target import Target
from spec_format.algorithms import layout_for
from spec_format.checkpoint import SpeculatorConfig
from spec_format.dflash import default_dflash_layers, dflash_config
from spec_format.errors import SpecError

NAME = "dflash"
WHAT = "z-lab DFlashDraftModel or speculators dflash"  # spec convert --help
DROPS = [
    (r"verifier_(lm_head|norm)\.weight", "speculators' frozen training copy of the verifier's lm_head/norm")
]
# z-lab keys that describe the DFlash wrapper, not the Qwen3 layers.
ZLAB_KEYS = {"dflash_config", "block_size", "num_target_layers", "speculators_model_type"}
SPECULATORS_KEYS = {
    "speculators_model_type", "speculators_config", "transformer_layer_config", "draft_vocab_size",
    "target_hidden_size", "aux_hidden_state_layer_ids", "mask_token_id", "block_size", "sample_from_anchor",
    "sliding_window_non_causal", "spec", "speculators_version",
}  # fmt: skip


def detect(src: Source) -> str | None:
    cfg = src.config
    if cfg.get("speculators_model_type") == "dflash":
        return "config.json has speculators_model_type dflash"
    if isinstance(cfg.get("dflash_config"), dict) or "DFlashDraftModel" in (cfg.get("architectures") or []):
        return "config.json has z-lab's dflash_config / DFlashDraftModel"
    return None


def _strip_model_prefix(name: str) -> str:
    return name[len("model.") :] if name.startswith("model.") else name


def convert(src: Source, target: Target, options: Options) -> Converted:
    cfg = src.config
    zlab = cfg.get("speculators_model_type") != "dflash"
    problems, notes = [], []
    if zlab:
        dc = cfg.get("dflash_config") if isinstance(cfg.get("dflash_config"), dict) else {}
        lc_src, mask, recorded, shift = cfg, dc.get("mask_token_id"), dc.get("target_layer_ids"), 1
        field, convention = "dflash_config.target_layer_ids", "z-lab: decoder layers whose output is read"
        block = cfg.get("block_size")
        recorded_k = block - 1 if isinstance(block, int) and block >= 2 else None
        if cfg.get("model_type", "qwen3") != "qwen3":
            problems.append(
                f"config.json: model_type is {cfg.get('model_type')!r}; vLLM's DFlash drafts are qwen3 layers"
            )
        n_target = cfg.get("num_target_layers")
        if isinstance(n_target, int) and n_target != target.num_layers:
            problems.append(
                f"config.json: num_target_layers is {n_target}, the verifier has {target.num_layers} layers: this draft was made for another target"
            )
        skip = ZLAB_KEYS | {"model_type"}
    else:
        lc_src = cfg.get("transformer_layer_config")
        if not isinstance(lc_src, dict):
            raise ConversionError(
                ["config.json: field 'transformer_layer_config' is missing or not an object"]
            )
        mask, recorded, shift = cfg.get("mask_token_id"), cfg.get("aux_hidden_state_layer_ids"), 0
        field, convention = "aux_hidden_state_layer_ids", "vLLM capture ids"
        methods = (cfg.get("speculators_config") or {}).get("proposal_methods") or [{}]
        recorded_k = methods[0].get("speculative_tokens")
        if cfg.get("sample_from_anchor"):
            problems.append(
                "config.json: field 'sample_from_anchor' is true; spec serves DFlash drafts that sample from the masked slots only"
            )
        skip = {"model_type"}
    if not isinstance(mask, int) or not 0 <= mask < target.info.vocab_size:
        problems.append(f"config.json: the mask token id must be a token of the verifier, found {mask!r}")
        mask = 0
    lc, lc_notes = layer_config(
        lc_src, skip=skip, num_layers=lc_src.get("num_hidden_layers", 1), target=target, layer_type="qwen3"
    )
    for key in SPECULATORS_KEYS if zlab else ():
        lc.pop(key, None)
    notes += lc_notes
    problems += check_dims(lc, cfg, target)
    k, k_how = speculative_tokens(options, recorded_k)
    m = map_tensors(src.tensors, _strip_model_prefix, DROPS)
    fc = m.tensors.get("fc.weight")
    n_inputs = fc.shape[1] // target.info.hidden_size if fc is not None and fc.ndim == 2 else 0
    ids, layer_how, layer_problems = resolve_layer_ids(
        override=options.layers, recorded=list(recorded) if recorded else None, shift=shift,
        default=default_dflash_layers(target.num_layers)[:-1], field=field, convention=convention,
        default_rule="z-lab's default spread of layers (spec_format.dflash.default_dflash_layers)",
        target=target, n_inputs=n_inputs,
    )  # fmt: skip
    problems += layer_problems
    draft_vocab = int(cfg.get("draft_vocab_size") or lc["vocab_size"])
    vocab_how = vocab_mapping(m, draft_vocab, target.info.vocab_size)
    names = [
        m.origin[n] for n, a in m.tensors.items() if a.dtype.kind == "f" and m.origin.get(n) in src.dtypes
    ]
    dtype, dtype_how = float_dtype(src.dtypes, names)
    old_verifier = ((cfg.get("speculators_config") or {}).get("verifier") or {}).get("name_or_path")
    provenance = {
        "source": {"format": "z-lab dflash" if zlab else "speculators dflash", "path": str(src.path),
                   "files": src.files, "verifier": old_verifier},
        "layer_ids": layer_how, "renamed": {}, "speculative_tokens": k_how, "vocab": vocab_how,
        "dropped": dict(sorted(m.dropped.items())), "dtype": dtype_how, "notes": notes,
    }  # fmt: skip
    config = dflash_config(lc, target.info, ids, draft_vocab, mask, k, provenance)
    what = "a z-lab DFlash checkpoint" if zlab else "a speculators DFlash checkpoint"
    problems += check_layout(m, layout_for(config), what, lambda name: name)
    if problems:
        raise ConversionError(problems)
    return Converted(config=config, tensors=m.tensors, float_dtype=dtype, notes=notes)


def zlab_layout(cfg: SpeculatorConfig, tensors: dict, num_target_layers: int) -> tuple[dict, dict]:
    """Our DFlash checkpoint in z-lab's layout: (config.json dict, tensors). z-lab's loader has no place
    for a pruned vocabulary (no d2t; vLLM then reads draft_vocab_size = vocab_size), so such a draft is
    refused."""
    lc = cfg.transformer_layer_config
    if (cfg.draft_vocab_size or lc["vocab_size"]) != lc["vocab_size"]:
        raise ConversionError([
            f"draft_vocab_size {cfg.draft_vocab_size}: z-lab's DFlash layout has no d2t and serves the full "
            f"vocabulary ({lc['vocab_size']}); export a full-vocabulary draft"
        ])  # fmt: skip
    config = {k: v for k, v in lc.items() if k != "architectures"}
    config.update(
        architectures=["DFlashDraftModel"],
        model_type="qwen3",
        block_size=cfg.speculative_tokens + 1,
        num_target_layers=num_target_layers,
        dflash_config={
            "mask_token_id": cfg.mask_token_id,
            "target_layer_ids": [i - 1 for i in cfg.aux_layer_ids],
        },
    )
    return config, {n: a for n, a in tensors.items() if n not in ("t2d", "d2t")}


def export_zlab(
    src_dir: Path, cfg: SpeculatorConfig, tensors: dict, num_target_layers: int, out: Path, force: bool
) -> list[str]:
    """`spec convert --to zlab`: a spec-format DFlash checkpoint in z-lab's layout (zlab_layout)."""
    from spec_convert.to_eagle3 import write_eagle3

    if cfg.algorithm != NAME:
        raise SpecError(f"{src_dir}: a '{cfg.algorithm}' checkpoint; --to zlab exports DFlash drafts")
    config, out_tensors = zlab_layout(cfg, tensors, num_target_layers)
    with staged_dir(out, force) as tmp:
        write_eagle3(tmp, config, out_tensors, "bfloat16")
    return []


EXPORTS = {"zlab": Export(export_zlab, "z-lab DFlashDraftModel layout")}
