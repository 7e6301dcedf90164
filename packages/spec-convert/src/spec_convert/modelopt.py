"""NVIDIA ModelOpt EAGLE-3 exports (github.com/NVIDIA/Model-Optimizer: examples/speculative_decoding/
scripts/export_hf_checkpoint.py -> `export_speculative_decoding`).

What the ModelOpt code does, read at commit a2fbac7:
- modelopt/torch/export/plugins/hf_spec_export.py `EagleExporter`: model.safetensors holds the
  `eagle_module.*` tensors with that prefix removed (layers.N.*, fc, norm, lm_head, d2t), written with
  safetensors.torch.save_file (no metadata); lm_head is the base model's when the draft has none.
  config.json is `llama_eagle_template_config` (hf_spec_configs.py): LlamaConfig keys, draft_vocab_size
  and `eagle_config` {eagle_aux_hidden_state_layer_ids, use_aux_hidden_state, use_last_layernorm,
  use_mtp_layernorm, parallel_draft_step, ...}; values it cannot find stay null.
- modelopt/torch/speculative/plugins/modeling_eagle.py `EagleModule`: transformers decoder layers (the
  residual is the raw hidden state: vLLM's norm_before_residual=False); layer 0's q/k/v take 2H, with
  `input_layernorm` for the embeddings and `hidden_norm`; `norm` when use_last_layernorm; `d2t` only when
  draft_vocab_size < vocab_size, never `t2d`; fc over len(layer ids) * H. hf_eagle.py feeds the pre-norm
  hidden state to the next step (vLLM's norm_output=False).
- Layer ids: plugins/hf_eagle.py registers forward hooks on the verifier's layers[x], i.e. it captures the
  OUTPUT of decoder layer x: vLLM id x + 1. Default sorted({1, L//2 - 1, L - 4}).
- d2t: offsets, but draft ids in FREQUENCY order (modelopt/torch/speculative/utils.py
  calibrate_frequent_vocab: mapping[i] = most_common[i] - i), so target ids are not sorted.
"""

from __future__ import annotations

from spec_convert.build import Draft, LayerIds, Options, Origin, finish
from spec_convert.layer_config import check_dims, layer_config
from spec_convert.source import Source
from spec_convert.strict import map_tensors
from spec_convert.target import Target

NAME = "modelopt"
WHAT = "NVIDIA ModelOpt EAGLE-3"  # spec convert --help
ORIGIN = Origin(NAME, "NVIDIA/Model-Optimizer (ModelOpt)", "a ModelOpt EAGLE-3 export")

EAGLE_KEYS = {"draft_vocab_size", "eagle_config", "num_hidden_layers", "model_type", "quantization_config"}
DROPS = [(r".*rotary_emb\.inv_freq", "RoPE frequencies, recomputed from the config")]


def default_layers(num_layers: int) -> list[int]:
    L = num_layers
    return [x + 1 for x in sorted({1, max(0, L // 2 - 1), max(0, L - 4)})]


LAYERS = LayerIds(
    default_layers,
    "ModelOpt's default sorted({1, L//2-1, L-4}) counts decoder-layer outputs "
    "(modelopt/torch/speculative/plugins/hf_eagle.py), which are vLLM capture ids x + 1",
    field="eagle_config.eagle_aux_hidden_state_layer_ids",
    convention="ModelOpt hooks the output of decoder layer x",
    shift=1,
)


def _eagle_config_problems(cfg: dict, ec: dict) -> list[str]:
    problems = []
    arch = (cfg.get("architectures") or ["LlamaForCausalLMEagle3"])[0]
    if arch != "LlamaForCausalLMEagle3":
        problems.append(
            f"config.json: architecture {arch} is not a Llama EAGLE-3 draft (MLA drafts are not supported)"
        )
    if "quantization_config" in cfg:
        problems.append(
            "config.json: the export is quantized; export the draft from ModelOpt without quantization"
        )
    if ec.get("use_aux_hidden_state") is False:
        problems.append(
            "config.json: eagle_config.use_aux_hidden_state is false: an EAGLE-1/2 draft, not EAGLE-3"
        )
    if ec.get("use_last_layernorm") is False:
        problems.append(
            "config.json: eagle_config.use_last_layernorm is false; vLLM's EAGLE-3 always applies the final norm"
        )
    if ec.get("use_mtp_layernorm"):
        problems.append(
            "config.json: eagle_config.use_mtp_layernorm is true (an MTP-style draft), not EAGLE-3"
        )
    if (ec.get("parallel_draft_step") or 1) > 1:
        problems.append(
            "config.json: eagle_config.parallel_draft_step > 1 (parallel draft heads) is not EAGLE-3"
        )
    return problems


def detect(src: Source) -> str | None:
    ec = src.config.get("eagle_config")
    if (
        isinstance(ec, dict)
        and "use_aux_hidden_state" in ec
        and any(n.startswith("layers.") for n in src.tensors)
    ):
        return "layers.* tensors with ModelOpt's eagle_config (use_aux_hidden_state, ...)"
    return None


def convert(src: Source, target: Target, options: Options):
    cfg = src.config
    ec = cfg.get("eagle_config") if isinstance(cfg.get("eagle_config"), dict) else {}
    problems = _eagle_config_problems(cfg, ec)
    num_layers = cfg.get("num_hidden_layers") or 1
    lc, notes = layer_config(cfg, skip=EAGLE_KEYS, num_layers=num_layers, target=target)
    problems += check_dims(lc, cfg, target)
    draft_vocab = cfg.get("draft_vocab_size") or lc["vocab_size"]
    draft = Draft(
        lc=lc,
        draft_vocab=int(draft_vocab),
        layers=LAYERS,
        recorded_layers=ec.get("eagle_aux_hidden_state_layer_ids"),
        flags_how="norm_before_residual, norm_before_fc, fc_norm, norm_output: all false (ModelOpt EagleModule)",
        notes=notes,
        problems=problems,
    )
    return finish(src, target, options, map_tensors(src.tensors, lambda name: name, DROPS), draft, ORIGIN)
