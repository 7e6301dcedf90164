"""EAGLE-3 module: initialisation from the verifier, shapes, d2t mapping, save/load through spec-format."""

import json

import msgspec
import numpy as np
import pytest
import torch

from spec_format.checkpoint import read_config
from spec_format.errors import SpecError
from spec_format.tensors import load_tensors, read_header
from spec_format.validate import validate_checkpoint
from spec_format.vocab import build_vocab_mapping
from spec_models import Eagle3Draft, draft_class, init_eagle3_from_verifier, load, propose, save
from spec_models.eagle3 import eagle3_spec

VOCAB, HIDDEN = 256, 64  # the tiny verifier of conftest.py


def mapping(draft_vocab=100, seed=1):
    return build_vocab_mapping(np.random.default_rng(seed).integers(0, 20, VOCAB), draft_vocab)


def test_init_reads_embeddings_lm_head_rows_and_norm_from_verifier(verifier):
    vdir = verifier()
    m = mapping()
    model = init_eagle3_from_verifier(vdir, vocab_mapping=m, num_layers=2)
    ref = load_tensors(vdir / "model.safetensors")
    assert torch.equal(model.embed_tokens.weight, torch.tensor(ref["model.embed_tokens.weight"]))
    assert torch.equal(model.lm_head.weight, torch.tensor(ref["lm_head.weight"][m.target_ids]))
    assert torch.equal(model.norm.weight, torch.tensor(ref["model.norm.weight"]))
    assert torch.equal(model.d2t, torch.from_numpy(m.d2t))
    assert not model.embed_tokens.weight.requires_grad  # frozen
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "fc.weight" in trainable and "layers.1.mlp.down_proj.weight" in trainable
    cfg = model.config
    assert cfg.eagle_aux_hidden_state_layer_ids == [2, 4, 5]  # 8-layer verifier: 2, L//2, L-3
    assert cfg.draft_vocab_size == 100 and cfg.transformer_layer_config["num_hidden_layers"] == 2
    assert cfg.norm_before_residual is False  # original EAGLE-3, written explicitly


def test_init_tied_sharded_bf16_verifier(verifier):
    vdir = verifier(tied=True, sharded=True)
    model = init_eagle3_from_verifier(vdir)  # full vocabulary
    embed = model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, embed)  # tied: the head is the embedding matrix
    assert torch.equal(embed, embed.to(torch.bfloat16).float())  # read from bf16 shards exactly
    assert model.spec.draft_vocab == VOCAB and not model.d2t.any()


def test_layer_config_follows_verifier_and_overrides(verifier):
    model = init_eagle3_from_verifier(verifier(model_type="qwen3"), intermediate_size=96)
    s = model.spec
    assert (s.layer_type, s.hidden, s.heads, s.kv_heads, s.head_dim, s.intermediate) == (
        "qwen3",
        64,
        4,
        2,
        16,
        96,
    )
    assert model.layers[0].self_attn.q_norm.weight.shape == (16,)  # Qwen3: per-head q/k norm
    llama = init_eagle3_from_verifier(verifier(model_type="qwen3"), layer_type="llama")
    assert not hasattr(llama.layers[0].self_attn, "q_norm")
    with pytest.raises(SpecError, match="hidden size"):
        init_eagle3_from_verifier(verifier(), hidden_size=32)


def test_shapes_of_the_layers(verifier):
    model = init_eagle3_from_verifier(verifier(), vocab_mapping=mapping(), num_layers=3)
    assert model.layers[0].self_attn.q_proj.weight.shape == (64, 2 * HIDDEN)  # layer 0 reads [embeds, hidden]
    assert model.layers[1].self_attn.q_proj.weight.shape == (64, HIDDEN)
    assert hasattr(model.layers[0], "hidden_norm") and not hasattr(model.layers[1], "hidden_norm")
    aux = torch.randn(2, 5, 3 * HIDDEN)
    hidden = model.combine(aux)
    assert hidden.shape == (2, 5, HIDDEN)
    ids = torch.randint(0, VOCAB, (2, 5))
    pos = torch.arange(5).expand(2, 5)

    def full_causal(i, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    normed, nxt = model(ids, hidden, pos, full_causal)
    assert normed.shape == nxt.shape == (2, 5, HIDDEN)
    assert model.lm_head(normed).shape == (2, 5, 100)


def test_greedy_maps_draft_ids_to_target_ids(verifier):
    m = mapping(draft_vocab=50)
    model = init_eagle3_from_verifier(verifier(), vocab_mapping=m)
    normed = torch.randn(200, HIDDEN)
    draft_ids = model.lm_head(normed).argmax(-1)
    target = model.greedy(normed)
    assert torch.equal(target, torch.from_numpy(m.target_ids)[draft_ids])
    assert torch.equal(model.to_target(torch.arange(50)), torch.from_numpy(m.target_ids))
    # vLLM's way: scatter draft logits into target-vocabulary logits (-inf elsewhere), argmax.
    logits = torch.full((200, VOCAB), float("-inf"))
    logits[:, torch.from_numpy(m.target_ids)] = model.lm_head(normed)
    assert torch.equal(logits.argmax(-1), target)


def test_vllm_defaults_for_flags_absent_from_config(verifier):
    cfg = init_eagle3_from_verifier(verifier()).config
    bare = msgspec.structs.replace(
        cfg, norm_before_residual=None, norm_before_fc=None, fc_norm=None, norm_output=None
    )
    s = eagle3_spec(bare)
    # vLLM's speculators loader (update_eagle3): norm_before_residual defaults to True, the rest False.
    assert s.norm_before_residual and not (s.norm_before_fc or s.fc_norm or s.norm_output)


@pytest.mark.parametrize(
    "layer_type,num_layers,draft_vocab,flags",
    [
        ("llama", 1, 100, {}),
        ("llama", 3, None, {"norm_before_residual": True, "norm_output": True}),
        ("qwen3", 2, 64, {"norm_before_fc": True, "fc_norm": True}),
    ],
)
def test_save_validates_and_loads_back(
    tmp_path, verifier, perturb, layer_type, num_layers, draft_vocab, flags
):
    vdir = verifier()
    m = None if draft_vocab is None else mapping(draft_vocab)
    model = init_eagle3_from_verifier(
        vdir, vocab_mapping=m, num_layers=num_layers, layer_type=layer_type, **flags
    )
    perturb(model, 0.1)
    out = save(model, tmp_path / "draft")
    report = validate_checkpoint(out, verifier=vdir)
    assert report.ok and not report.warnings, report
    header = read_header(out / "model.safetensors")[0]
    assert "embed_tokens.weight" not in header  # shared with the target by default
    assert ("d2t" in header) == ("t2d" in header) == (draft_vocab is not None)
    assert {v["dtype"] for k, v in header.items() if k not in ("d2t", "t2d")} == {"BF16"}
    if m is not None:
        saved = load_tensors(out / "model.safetensors")
        assert np.array_equal(saved["d2t"], m.d2t) and np.array_equal(saved["t2d"], m.t2d)

    back = load(out, verifier=vdir)
    assert type(back) is Eagle3Draft and back.spec == model.spec
    for name, t in model.state_dict().items():
        expected = t if name in ("d2t", "embed_tokens.weight") else t.to(torch.bfloat16).float()
        assert torch.equal(back.state_dict()[name], expected), name
    # fp32 checkpoints round-trip exactly, and the loaded model drafts what the saved one drafted.
    exact = load(save(model, tmp_path / "fp32", float_dtype="float32"), verifier=vdir)
    ids, aux = torch.randint(0, VOCAB, (3, 6)), torch.randn(3, 6, 3 * HIDDEN)
    lengths = torch.tensor([6, 4, 2])
    assert torch.equal(propose(exact, ids, aux, lengths, 3), propose(model, ids, aux, lengths, 3))


def test_embeddings_in_checkpoint_when_asked_or_trained(tmp_path, verifier):
    vdir = verifier()
    model = init_eagle3_from_verifier(vdir, vocab_mapping=mapping())
    out = save(model, tmp_path / "with", include_embeddings=True)
    assert "embed_tokens.weight" in read_header(out / "model.safetensors")[0]
    model.embed_tokens.weight.requires_grad_(True)
    out = save(model, tmp_path / "trained")
    assert "embed_tokens.weight" in read_header(out / "model.safetensors")[0]
    # A checkpoint with its own embeddings loads without a verifier.
    cfg = json.loads((out / "config.json").read_text())
    cfg["speculators_config"]["verifier"]["name_or_path"] = "some/hub-model"
    (out / "config.json").write_text(json.dumps(cfg))
    back = load(out)
    assert torch.equal(back.embed_tokens.weight, model.embed_tokens.weight.to(torch.bfloat16).float())


def test_load_takes_embeddings_from_verifier_path_in_config(tmp_path, verifier):
    vdir = verifier()
    out = save(init_eagle3_from_verifier(vdir, vocab_mapping=mapping()), tmp_path / "draft")
    assert read_config(out)[0].verifier_name == str(vdir.resolve())
    back = load(out)  # the recorded verifier is a local directory
    ref = load_tensors(vdir / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(back.embed_tokens.weight, torch.tensor(ref))
    cfg = json.loads((out / "config.json").read_text())
    cfg["speculators_config"]["verifier"]["name_or_path"] = "some/hub-model"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpecError, match="no embed_tokens.*pass the verifier directory"):
        load(out)


def test_load_refuses_broken_checkpoints(tmp_path, verifier):
    vdir = verifier()
    out = save(init_eagle3_from_verifier(vdir, vocab_mapping=mapping()), tmp_path / "draft")
    cfg = json.loads((out / "config.json").read_text())
    cfg["speculators_model_type"] = "medusa9"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpecError, match="unknown algorithm 'medusa9'"):
        load(out, verifier=vdir)
    with pytest.raises(SpecError, match="spec-models has no draft 'medusa9'"):
        draft_class("medusa9")
    assert draft_class("eagle3") is Eagle3Draft


def test_bf16_cast_keeps_rotary_frequencies_fp32(verifier):
    model = init_eagle3_from_verifier(verifier())
    inv = model.inv_freq.clone()
    model.to(torch.bfloat16)
    assert model.fc.weight.dtype == torch.bfloat16
    assert model.inv_freq.dtype == torch.float32 and torch.equal(model.inv_freq, inv)


@pytest.mark.parametrize("arch,num_layers", [("llama", 1), ("llama", 2), ("qwen3", 1)])
def test_layers_from_verifier_start_as_the_verifiers_next_layers(tiny_model, arch, num_layers):
    """layers_from_verifier: fc passes the deepest aux state a through and the draft's layers are the
    verifier's layers a, a+1, ..: at step 0 the draft's hidden output is the verifier's state entering
    layer a + num_layers, whatever the input tokens (the embedding half of q/k/v starts at zero)."""
    from transformers import AutoModelForCausalLM

    from spec_models.ops import attend

    vdir = tiny_model(arch)
    draft = init_eagle3_from_verifier(vdir, num_layers=num_layers, layers_from_verifier=True).eval()
    hf = AutoModelForCausalLM.from_pretrained(vdir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    T = 40
    ids = torch.randint(0, 1000, (1, T), generator=g)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    with torch.no_grad():
        states = hf(ids, output_hidden_states=True).hidden_states  # [i]: the state entering layer i
        aux_ids = draft.config.eagle_aux_hidden_state_layer_ids
        aux = torch.cat([states[i] for i in aux_ids], dim=-1)
        step_ids = torch.randint(0, 1000, (1, T), generator=g)  # any tokens: their half starts at zero
        _, hidden = draft(
            step_ids, draft.combine(aux), torch.arange(T)[None], lambda i, q, k, v: attend(q, k, v, causal)
        )
    want = states[max(aux_ids) + num_layers]
    torch.testing.assert_close(hidden, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    # Without the option the same draft starts elsewhere: the check above can fail.
    plain = init_eagle3_from_verifier(vdir, num_layers=num_layers).eval()
    with torch.no_grad():
        _, other = plain(
            step_ids, plain.combine(aux), torch.arange(T)[None], lambda i, q, k, v: attend(q, k, v, causal)
        )
    assert not torch.allclose(other, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_layers_from_verifier_needs_verifier_layers_after_the_aux_layers(verifier):
    with pytest.raises(SpecError, match="leaves fewer than"):
        init_eagle3_from_verifier(
            verifier(), aux_layer_ids=[2, 4, 7], num_layers=2, layers_from_verifier=True
        )


def test_layers_from_verifier_of_an_moe_target_keeps_the_dense_mlp_random(tiny_model):
    """An MoE verifier layer has experts, not one dense MLP: attention and norms are copied, the draft's
    MLP keeps its N(0, 0.02) start."""
    vdir = tiny_model("qwen3_moe")
    draft = init_eagle3_from_verifier(vdir, layers_from_verifier=True)
    plain = init_eagle3_from_verifier(vdir)  # same seed: the same random weights
    a = max(draft.config.eagle_aux_hidden_state_layer_ids)
    ref = load_tensors(vdir / "model.safetensors")
    o_proj = torch.tensor(ref[f"model.layers.{a}.self_attn.o_proj.weight"])
    assert torch.equal(draft.layers[0].self_attn.o_proj.weight, o_proj)
    assert torch.equal(draft.layers[0].mlp.up_proj.weight, plain.layers[0].mlp.up_proj.weight)
