"""SpecForge EAGLE-3 drafts (github.com/sgl-project/SpecForge): `specforge export --to sglang|hf`, and the
epoch directories of older SpecForge releases, which were written the same way. SGLang serves this layout.

What the SpecForge code does, read at commit a6b6b023:
- specforge/export/to_sglang.py and to_hf.py: `model.save_pretrained(out, state_dict=...)`, i.e.
  config.json written by transformers (keys equal to LlamaConfig's defaults are omitted by 4.x) and
  model.safetensors in bf16 with metadata {"format": "pt"}. --to sglang drops every tensor with "embed"
  in its name; --to hf adds the verifier's embed_tokens.weight.
- specforge/modeling/draft/llama3_eagle.py `LlamaForCausalLMEagle3`: `midlayer` (residual taken before
  hidden_norm: vLLM's norm_before_residual=False), `fc` (3 * target_hidden_size -> H, no bias), optional
  `fc_norm` (three RMSNorms, one per captured state: vLLM's fc_norm), `norm`, `lm_head`, buffers
  `t2d` (bool, ones by default) and `d2t` (int64 offsets, zeros by default).
- `norm_output` (default true) applies `norm` before lm_head; the hidden state fed to the next step is
  always the pre-norm one (specforge/algorithms/eagle3/model.py): vLLM's norm_output=False. SpecForge's
  norm_output=false (logits without the final norm) has no vLLM counterpart.
- Layer ids: `eagle_config.eagle_aux_hidden_state_layer_ids` counts the OUTPUT of decoder layer x (the HF
  backend hooks layers[x], commit 592364a1; SGLang captures the input of layer x + 1): vLLM id x + 1.
  Without them, specforge/algorithms/model_providers.py uses [1, L//2 - 1, L - 4] = vLLM 2, L//2, L-3.
- d2t: offsets, target ids sorted (specforge/data/preprocessing.py: used_tokens[i] - i).
"""

from __future__ import annotations

from spec_convert.build import Draft, LayerIds, Options, Origin, finish
from spec_convert.eagle3 import rename, source_name
from spec_convert.layer_config import midlayer_config
from spec_convert.source import Source
from spec_convert.strict import map_tensors
from spec_convert.target import Target

NAME = "specforge"
WHAT = "SpecForge/SGLang EAGLE-3"  # spec convert --help
ORIGIN = Origin(
    NAME, "sgl-project/SpecForge (SGLang EAGLE-3 layout)", "a SpecForge EAGLE-3 draft", source_name
)

EAGLE_KEYS = {
    "draft_vocab_size",
    "target_hidden_size",
    "num_hidden_layers",
    "model_type",
    "eagle_config",
    "fc_norm",
    "norm_output",
}
FOREIGN_KEYS = ("norm_before_residual", "norm_before_fc")
DROPS = [(r".*rotary_emb\.inv_freq", "RoPE frequencies, recomputed from the config")]


def default_layers(num_layers: int) -> list[int]:
    L = num_layers
    return [x + 1 for x in sorted({1, L // 2 - 1, L - 4})]


LAYERS = LayerIds(
    default_layers,
    "SpecForge's default capture layers [1, L//2-1, L-4] count decoder-layer outputs "
    "(specforge/algorithms/model_providers.py), which are vLLM capture ids 2, L//2, L-3",
    field="eagle_config.eagle_aux_hidden_state_layer_ids",
    convention="SGLang/SpecForge count the output of decoder layer x",
    shift=1,
)


def detect(src: Source) -> str | None:
    if any(n.startswith("midlayer.") for n in src.tensors):  # in safetensors: eagle3.detect saw no .bin
        return (
            "midlayer.* tensors in safetensors (what SpecForge's save_pretrained writes; SafeAILab's trainer "
            "writes .bin; pass --from eagle3 for the EAGLE code's conventions)"
        )
    return None


def convert(src: Source, target: Target, options: Options):
    cfg = src.config
    problems = [
        f"config.json: field '{key}' is not read by SpecForge's LlamaForCausalLMEagle3; this draft comes from "
        "another code base"
        for key in FOREIGN_KEYS
        if key in cfg
    ]
    if not isinstance(cfg.get("draft_vocab_size"), int):
        problems.append(
            "config.json: field 'draft_vocab_size' is missing; SpecForge's EAGLE-3 draft requires it"
        )
    if cfg.get("norm_output", True) is not True:
        problems.append(
            "config.json: norm_output is false (SpecForge then computes logits without the final norm), "
            "which vLLM's EAGLE-3 cannot run"
        )
    lc, notes, dim_problems = midlayer_config(cfg, EAGLE_KEYS, target)
    eagle_config = cfg.get("eagle_config") if isinstance(cfg.get("eagle_config"), dict) else {}
    fc_norm = bool(cfg.get("fc_norm", False))
    draft = Draft(
        lc=lc,
        draft_vocab=int(cfg.get("draft_vocab_size") or 0),
        layers=LAYERS,
        recorded_layers=eagle_config.get("eagle_aux_hidden_state_layer_ids"),
        flags_how=(
            f"fc_norm={str(fc_norm).lower()} (config.json fc_norm); SpecForge's norm_output=true is "
            "vLLM's norm_output=false (pre-norm state fed back); norm_before_residual=false"
        ),
        flags={"fc_norm": fc_norm},
        renamed={"midlayer.*": "layers.0.*"},
        notes=notes,
        problems=problems + dim_problems,
    )
    return finish(src, target, options, map_tensors(src.tensors, rename, DROPS), draft, ORIGIN)
