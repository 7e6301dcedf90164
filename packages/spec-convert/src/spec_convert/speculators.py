"""vllm-project/speculators EAGLE-3 and P-EAGLE directories, upgraded to the current schema.

vLLM reads a speculators directory as it is; what changes over the project's history is which fields a
directory has (src/speculators/models/eagle3.py and models/eagle3/config.py, read through git history):
- `eagle_aux_hidden_state_layer_ids` exists since 2025-10 (8af566f5); without it vLLM captures its
  default layers 2, L//2, L-3 of the verifier (vLLM capture ids, as the field itself).
- `norm_before_fc` (2026-03, ac6db624), `norm_output` (2026-06, aba50b04) and `fc_norm` (#670) are
  newer; vLLM reads a missing one as false, and a missing `norm_before_residual` as TRUE (speculators itself
  always wrote it, defaulting to false).
- `transformer_layer_config` is a transformers `to_diff_dict()`: keys equal to the config class defaults
  are missing (LlamaConfig; from 2026-06, #620, Qwen3Config when model_type is absent).
- `speculators_config.verifier.name_or_path` may be null.
- Tensors carry the format's names already (layers.N.*, fc, norm, lm_head, embed_tokens, d2t/t2d as
  int64 offsets and bool); newer trainers keep `verifier_lm_head`/`verifier_norm` out of the file with
  `_keys_to_ignore_on_save`, so they are dropped when present.
The upgrade keeps vLLM's reading of every field, writes it out explicitly, and adds the verifier
fingerprint and provenance.

P-EAGLE (`speculators_model_type: "peagle"`, src/speculators/models/peagle/): EAGLE-3's config and tensors
plus `mask_token_id` (required: vLLM's update_peagle reads it as the draft's pard_token) and the tensor
`mask_hidden`, saved [1, 1, n_aux*H] by speculators and read by vLLM as [1, n_aux*H] (a view); embeddings
are trained there (embed_requires_grad) and kept. vLLM's peagle updater defaults a missing
norm_before_residual to FALSE and copies neither fc_norm nor norm_output, so those two are refused.
"""

from __future__ import annotations

from spec_convert.build import Draft, LayerIds, Options, Origin, finish
from spec_convert.layer_config import check_dims, layer_config
from spec_convert.source import Source
from spec_convert.strict import ConversionError, map_tensors
from spec_convert.target import Target

NAME = "speculators"
WHAT = "older vllm-project/speculators EAGLE-3 and P-EAGLE directories"  # spec convert --help
ORIGIN = Origin(NAME, "vllm-project/speculators", "a speculators EAGLE-3 checkpoint")
ORIGIN_PEAGLE = Origin(NAME, "vllm-project/speculators", "a speculators P-EAGLE checkpoint")

DROPS = [
    (
        r"verifier_(lm_head|norm)\.weight",
        "speculators' frozen training copy of the verifier's lm_head/norm (vLLM uses the verifier's own)",
    )
]
# vLLM's reading of a missing flag (vllm/transformers_utils/configs/speculators/algos.py update_eagle3).
VLLM_FLAG_DEFAULTS = {
    "norm_before_residual": True,
    "norm_before_fc": False,
    "fc_norm": False,
    "norm_output": False,
}
PEAGLE_FLAG_DEFAULTS = {**VLLM_FLAG_DEFAULTS, "norm_before_residual": False}  # update_peagle


def default_layers(num_layers: int) -> list[int]:
    L = num_layers
    return sorted({2, L // 2, L - 3})


LAYERS = LayerIds(
    default_layers,
    "vLLM then captures its default layers 2, L//2, L-3 (get_eagle3_default_aux_hidden_state_layers)",
    field="eagle_aux_hidden_state_layer_ids",
    convention="vLLM capture ids",
)


def detect(src: Source) -> str | None:
    cfg = src.config
    if "speculators_config" in cfg or "speculators_model_type" in cfg:
        return "config.json has speculators_config"
    return None


def convert(src: Source, target: Target, options: Options):
    cfg = src.config
    kind = cfg.get("speculators_model_type")
    if kind not in ("eagle3", "peagle"):
        raise ConversionError(
            [
                f"config.json: speculators_model_type is {kind!r}; spec convert upgrades EAGLE-3 ('eagle3') and P-EAGLE ('peagle') checkpoints"
            ]
        )
    section = cfg.get("speculators_config") if isinstance(cfg.get("speculators_config"), dict) else {}
    lc_src = cfg.get("transformer_layer_config")
    if not isinstance(lc_src, dict):
        raise ConversionError(["config.json: field 'transformer_layer_config' is missing or not an object"])
    problems, notes = [], []
    layer_type = lc_src.get("model_type")
    if layer_type is None:
        # speculators read a missing model_type as llama before #620 and as qwen3 after; the weights decide
        layer_type = "qwen3" if any(".self_attn.q_norm." in n for n in src.tensors) else "llama"
        notes.append(f"transformer_layer_config has no model_type; the weights are {layer_type} layers")
    if layer_type not in ("llama", "qwen3"):
        raise ConversionError(
            [f"config.json: transformer_layer_config.model_type {layer_type!r} is not llama or qwen3"]
        )
    # a missing num_hidden_layers means the config class default (32), as vLLM would read it
    num_layers = lc_src.get("num_hidden_layers", 32)
    lc, lc_notes = layer_config(
        lc_src, skip={"model_type"}, num_layers=num_layers, target=target, layer_type=layer_type
    )
    notes += [n.replace("config.json", "transformer_layer_config") for n in lc_notes]
    problems += check_dims(lc, cfg, target)

    flags, filled = {}, []
    mask_token_id = None
    if kind == "peagle":
        mask_token_id = cfg.get("mask_token_id")
        if not isinstance(mask_token_id, int) or not 0 <= mask_token_id < target.info.vocab_size:
            problems.append(
                f"config.json: field 'mask_token_id' must be a token id of the verifier, found {mask_token_id!r}"
            )
            mask_token_id = 0
        for key in ("fc_norm", "norm_output"):
            if cfg.get(key):
                problems.append(
                    f"config.json: field '{key}' is true; vLLM serves P-EAGLE drafts without {key}"
                )
    for key, vllm_default in (PEAGLE_FLAG_DEFAULTS if kind == "peagle" else VLLM_FLAG_DEFAULTS).items():
        flags[key] = bool(cfg[key]) if cfg.get(key) is not None else vllm_default
        if kind == "peagle" and key in ("fc_norm", "norm_output"):
            flags[key] = False
        if cfg.get(key) is None:
            filled.append(f"{key}={str(vllm_default).lower()}")
    if filled:
        notes.append(f"config.json lacks {', '.join(filled)}: written as vLLM reads a missing field")

    verifier = section.get("verifier") if isinstance(section.get("verifier"), dict) else {}
    archs = verifier.get("architectures") or []
    if archs and archs != [""] and target.info.architecture not in archs:
        problems.append(
            f"config.json: the draft was made for a {', '.join(archs)} verifier, {target.dir} is {target.info.architecture}"
        )
    old_name = verifier.get("name_or_path")
    if old_name and old_name != target.info.name_or_path:
        notes.append(
            f"the source names its verifier {old_name!r}; pass --verifier-name {old_name} to keep that name"
        )

    methods = section.get("proposal_methods") or [{}]
    draft = Draft(
        lc=lc,
        draft_vocab=int(cfg.get("draft_vocab_size") or lc["vocab_size"]),
        layers=LAYERS,
        recorded_layers=cfg.get("eagle_aux_hidden_state_layer_ids"),
        flags_how=", ".join(f"{key}={str(value).lower()}" for key, value in flags.items()),
        flags=flags,
        k=methods[0].get("speculative_tokens"),
        source={
            "verifier": old_name,
            **{key: cfg[key] for key in ("speculators_version", "spec") if key in cfg},
        },
        notes=notes,
        problems=problems,
        mask_token_id=mask_token_id,
    )
    m = map_tensors(src.tensors, lambda name: name, DROPS)
    if kind == "peagle" and "mask_hidden" in m.tensors:
        m.tensors["mask_hidden"] = m.tensors["mask_hidden"].reshape(1, -1)  # [1, 1, n_aux*H] as saved
    return finish(src, target, options, m, draft, ORIGIN_PEAGLE if kind == "peagle" else ORIGIN)
