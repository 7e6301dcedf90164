"""SafeAILab EAGLE-3 checkpoints (github.com/SafeAILab/EAGLE; yuhuili/EAGLE3-* on the Hub).

What the EAGLE code does, read at commit cb7e084 (the layout this module converts):
- eagle/traineagle3/cnets.py `Model`: `midlayer` (one decoder layer whose attention takes
  [input_layernorm(embed), hidden_norm(h)], 2H wide), `fc` (3H -> H, no bias), `norm`, `lm_head`
  [draft_vocab, H], frozen `embed_tokens`, buffers `d2t` (offsets: used_tokens[i] - i, ids sorted) and
  `t2d` (bool over the target vocabulary). The residual is taken before hidden_norm and the hidden state
  fed to the next step is the pre-norm one: vLLM's norm_before_residual=False, norm_output=False.
- eagle/traineagle3/main.py saves with DeepSpeed `save_16bit_model(exclude_frozen_parameters=True)`:
  `pytorch_model.bin` in fp16, without the frozen embeddings and target model parameters, but with every
  persistent buffer (d2t, t2d, and the target model's RoPE `inv_freq` where its class keeps it).
- eagle/model/modeling_llama_kv.py (and _qwen2/_qwen3) captures the hidden states entering decoder
  layers 2, L//2 and L-3 of the verifier, in layer order: vLLM capture ids 2, L//2, L-3. No config field
  records them.
- eagle/model/cnets.py (inference): RoPE base = config.rope_theta when present, else 10000; head_dim =
  hidden_size // num_attention_heads; fc takes 3 * target_hidden_size when the config names it.
  eagle/model/ea_model.py deletes d2t/t2d when draft_vocab_size == vocab_size.
"""

from __future__ import annotations

from spec_convert.build import Draft, LayerIds, Options, Origin, finish
from spec_convert.layer_config import midlayer_config
from spec_convert.source import Source, is_torch_source
from spec_convert.strict import map_tensors
from spec_convert.target import Target

NAME = "eagle3"
WHAT = "SafeAILab EAGLE-3"  # spec convert --help

# Keys of config.json this module interprets rather than copying into the decoder-layer config.
EAGLE_KEYS = {"draft_vocab_size", "target_hidden_size", "num_hidden_layers", "model_type", "bias"}
# Fields only other EAGLE-3 code bases read: their presence means the draft did not come from this one.
FOREIGN_KEYS = ("eagle_config", "fc_norm", "norm_output", "norm_before_residual", "norm_before_fc")
SPECFORGE_KEYS = ("eagle_config", "fc_norm", "norm_output")

DROPS = [
    (
        r"target_model\..*",
        "the verifier's own tensor, saved with the draft by DeepSpeed (vLLM loads the verifier)",
    ),
    (r".*rotary_emb\.inv_freq", "RoPE frequencies, recomputed from the config"),
]


def rename(name: str) -> str:
    return "layers.0." + name.removeprefix("midlayer.") if name.startswith("midlayer.") else name


def source_name(name: str) -> str:
    return "midlayer." + name.removeprefix("layers.0.") if name.startswith("layers.0.") else name


ORIGIN = Origin(NAME, "SafeAILab/EAGLE (EAGLE-3)", "a SafeAILab EAGLE-3 draft", source_name)


def default_layers(num_layers: int) -> list[int]:
    L = num_layers
    return sorted({2, L // 2, L - 3})


LAYERS = LayerIds(
    default_layers,
    "the EAGLE-3 code captures the hidden states entering decoder layers 2, L//2, L-3 "
    "(eagle/model/modeling_llama_kv.py), which are vLLM capture ids 2, L//2, L-3",
)


def detect(src: Source) -> str | None:
    if is_torch_source(src) and any(n.startswith("midlayer.") for n in src.tensors):
        return "midlayer.* tensors in a torch .bin (what SafeAILab's DeepSpeed training saves)"
    return None


def convert(src: Source, target: Target, options: Options):
    cfg = src.config
    problems = [
        f"config.json: field '{key}' is not read by the SafeAILab EAGLE code; "
        + (
            "SpecForge writes it: convert with --from specforge"
            if key in SPECFORGE_KEYS
            else "another code base wrote it"
        )
        for key in FOREIGN_KEYS
        if key in cfg
    ]
    if not isinstance(cfg.get("draft_vocab_size"), int):
        problems.append("config.json: field 'draft_vocab_size' is missing; the EAGLE-3 code requires it")
    lc, notes, dim_problems = midlayer_config(cfg, EAGLE_KEYS, target)
    own_head_dim = lc["hidden_size"] // lc["num_attention_heads"]
    if lc["head_dim"] != own_head_dim:
        notes.append(
            f"config.json: head_dim {lc['head_dim']} ignored; the EAGLE code uses hidden/heads = {own_head_dim}"
        )
        lc["head_dim"] = own_head_dim
    draft = Draft(
        lc=lc,
        draft_vocab=int(cfg.get("draft_vocab_size") or 0),
        layers=LAYERS,
        recorded_layers=None,  # no config field records them
        flags_how="norm_before_residual, norm_before_fc, fc_norm, norm_output: all false (the EAGLE-3 midlayer)",
        renamed={"midlayer.*": "layers.0.*"},
        notes=notes,
        problems=problems + dim_problems,
        full_vocab_reason="the EAGLE code deletes d2t/t2d when draft_vocab_size == vocab_size (eagle/model/ea_model.py)",
    )
    return finish(src, target, options, map_tensors(src.tensors, rename, DROPS), draft, ORIGIN)
