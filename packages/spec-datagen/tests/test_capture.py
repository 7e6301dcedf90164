"""Captured hidden states against transformers on the same token ids, through the shared capture engine.

The engine prefills with chunked prefill on and a 96-token budget, so samples longer than that are
captured across several chunks, and each capture() call batches samples of different lengths.
"""

import json

import numpy as np
import pytest

from spec_datagen.capture import capture, capture_layer_ids, validate_layer_ids
from spec_datagen.pipeline import Capturer, Stats
from spec_format.errors import SpecError
from spec_format.fingerprint import default_eagle3_layers, read_model_config


def test_layer_ids_are_validated_and_sorted():
    assert validate_layer_ids([27, 2, 30, 15], 30) == [2, 15, 27, 30]
    assert validate_layer_ids(default_eagle3_layers(30), 30) == [2, 15, 27, 30]
    with pytest.raises(SpecError, match=r"--layers: \[31\] out of range; the target has 30 decoder layers"):
        validate_layer_ids([2, 31], 30)
    with pytest.raises(SpecError, match="repeats a layer id"):
        validate_layer_ids([2, 2], 30)
    with pytest.raises(SpecError, match="at least one"):
        validate_layer_ids([], 30)


def hf_reference(model, token_ids, layer_ids):
    """[T, n, H] from a transformers forward: hidden_states[k] for k < L; for k = L the last decoder
    layer's output before the final norm (transformers' hidden_states[L] is after it)."""
    import torch

    last = {}
    hook = model.model.layers[-1].register_forward_hook(
        lambda mod, args, out: last.__setitem__("h", out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad():
            out = model(torch.tensor([token_ids]), output_hidden_states=True)
    finally:
        hook.remove()
    n = len(model.model.layers)
    states = [(out.hidden_states[k] if k < n else last["h"])[0].float().numpy() for k in layer_ids]
    return np.stack(states, axis=1), out.hidden_states[n][0].float().numpy()


def cosine(a, b):
    """Cosine over the last axis; 1 where both vectors are zero (the tiny models' padding embedding)."""
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    both_zero = (na == 0) & (nb == 0)
    return np.where(both_zero, 1.0, (a * b).sum(-1) / np.where(both_zero, 1.0, na * nb))


@pytest.fixture(scope="module")
def hf_smollm2(demo_model):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32).eval()


@pytest.mark.e2e
def test_captured_states_match_transformers_per_token_and_layer(
    capture_llm, demo_model, hf_smollm2, make_conversations
):
    import torch

    cap = Capturer(demo_model, max_len=512, llm=capture_llm)
    layers = cap.layer_ids
    assert layers == [0, 1, 2, 15, 27, 29, 30]
    rows = make_conversations(6)
    expected = list(cap.tokenized(rows))
    lengths = [len(s.token_ids) for s in expected]
    assert max(lengths) > 2 * 96 and min(lengths) < 96, lengths  # several prefill chunks, mixed lengths
    got = list(cap.samples(rows))
    assert [s.source_index for s in got] == list(range(6))
    for exp, sample in zip(expected, got, strict=True):
        assert np.array_equal(sample.token_ids, exp.token_ids) and np.array_equal(
            sample.loss_mask, exp.loss_mask
        )
        assert sample.hidden.dtype == np.float32 and sample.hidden.shape == (
            len(exp.token_ids),
            len(layers),
            576,
        )
        ref, post_norm = hf_reference(hf_smollm2, exp.token_ids.tolist(), layers)
        cos = cosine(sample.hidden, ref)  # [T, n_layers]
        assert cos.min() > 0.999, {k: float(cos[:, j].min()) for j, k in enumerate(layers)}
        # Embeddings (id 0) are exact; deeper layers carry fp32 rounding of a different kernel order.
        assert np.array_equal(sample.hidden[:, 0], ref[:, 0])
        np.testing.assert_allclose(sample.hidden, ref, rtol=0, atol=1e-5 * np.abs(ref).max() + 1e-4)
        # id L is before the final norm: norming it gives transformers' last hidden state.
        with torch.no_grad():
            normed = hf_smollm2.model.norm(torch.from_numpy(sample.hidden[:, -1])).numpy()
        np.testing.assert_allclose(normed, post_norm, rtol=0, atol=1e-3)
        assert cosine(sample.hidden[:, -1], post_norm).min() < 0.999  # so the two are not interchangeable


@pytest.mark.e2e
def test_capturer_streams_files_in_input_order_with_skips(
    capture_llm, demo_model, tmp_path, make_conversations
):
    rows = make_conversations(5, seed=1)
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, "{broken")
    lines.append(
        json.dumps(
            {"messages": [{"role": "user", "content": "w " * 600}, {"role": "assistant", "content": "a"}]}
        )
    )
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cap = Capturer(demo_model, max_len=512, llm=capture_llm)
    stats, reports = Stats(), []
    got = list(cap.samples(data, long="skip", stats=stats, report=reports.append, max_inflight_tokens=200))
    assert [s.source_index for s in got] == [0, 1, 3, 4, 5]
    assert reports == [
        f"{data}:3: not valid JSON (Expecting property name enclosed in double quotes at column 2)"
    ]
    assert stats.skipped == {"malformed": 1, "too_long": 1}
    assert stats.samples == 5 and stats.tokens == sum(len(s.token_ids) for s in got)
    assert stats.supervised_tokens == sum(int(s.loss_mask.sum()) for s in got)


@pytest.mark.e2e
def test_stopping_early_leaves_the_engine_clean(capture_llm, demo_model, make_conversations):
    cap = Capturer(demo_model, max_len=512, llm=capture_llm)
    storage = capture_llm.llm_engine.vllm_config.kv_transfer_config.kv_connector_extra_config[
        "shared_storage_path"
    ]
    gen = cap.samples(make_conversations(8, seed=2))
    first = next(gen)
    gen.close()  # aborts what is still queued
    assert not capture_llm.llm_engine.has_unfinished_requests()
    import pathlib

    assert not [p for p in pathlib.Path(storage).iterdir() if p.suffix == ".safetensors"]
    again = next(cap.samples(make_conversations(8, seed=2)))
    assert np.array_equal(again.token_ids, first.token_ids)
    np.testing.assert_allclose(again.hidden, first.hidden, rtol=0, atol=1e-3)


@pytest.mark.e2e
def test_capture_refuses_an_engine_without_capture(capture_llm):
    assert capture_layer_ids(capture_llm) == [0, 1, 2, 15, 27, 29, 30]

    class NotCapturing:
        class llm_engine:
            class vllm_config:
                speculative_config = None

    with pytest.raises(SpecError, match="does not capture hidden states"):
        next(capture(NotCapturing(), []))


@pytest.mark.e2e
def test_moe_target_through_the_same_path(vllm_engine, tiny_model, tmp_path_factory, make_conversations):
    """A tiny random Qwen3-MoE: same engine settings, same capture code, same agreement with transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    from spec_datagen.capture import capture_engine_kwargs

    model = tiny_model("qwen3_moe")
    n = read_model_config(model)["num_hidden_layers"]
    layers = [0, 1, *default_eagle3_layers(n)[1:]]  # embeddings, first layer, EAGLE-3's L/2, L-3 and L
    llm = vllm_engine(
        "datagen-capture-qwen3moe",
        model,
        **capture_engine_kwargs(layers, tmp_path_factory.mktemp("moe-capture"), max_model_len=257),
    )
    cap = Capturer(model, max_len=256, llm=llm)
    got = list(cap.samples(make_conversations(3, seed=3)))
    assert len(got) == 3
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    for sample in got:
        ref, _ = hf_reference(hf, sample.token_ids.tolist(), layers)
        cos = cosine(sample.hidden, ref)
        assert cos.min() > 0.999, cos.min(axis=0)
