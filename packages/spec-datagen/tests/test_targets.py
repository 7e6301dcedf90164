"""Targets vLLM cannot pair are found from config.json and vLLM's registry, before any engine starts
(spec_datagen.targets); the commands' refusals are run by the fault campaign (test_fault_campaign.py)."""

import json

import pytest

from spec_datagen.targets import check_target, pairing_problem
from spec_format.errors import SpecError

CONFIGS = {
    "gpt2": {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 2, "n_embd": 64},
    "mla": {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "num_hidden_layers": 2,
            "hidden_size": 64, "kv_lora_rank": 16, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16},
    "unknown": {"architectures": ["FooBarForCausalLM"], "model_type": "foobar", "num_hidden_layers": 2},
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 2},
    "no_arch": {"model_type": "llama", "num_hidden_layers": 2},
}  # fmt: skip


@pytest.fixture
def target(tmp_path):
    def make(name):
        d = tmp_path / name
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text(json.dumps(CONFIGS[name]))
        return d

    return make


def test_what_vllm_cannot_pair_is_named_before_an_engine(target):
    capture = "extract_hidden_states"
    assert "GPT2LMHeadModel" in pairing_problem(target("gpt2"), method=capture)
    assert "lacks the aux-hidden-state interface (SupportsEagle3)" in pairing_problem(
        target("gpt2"), method="dflash"
    )
    mla = target("mla")
    assert "uses MLA attention" in pairing_problem(mla, method=capture)
    assert (
        pairing_problem(mla, method="eagle3") is None
    )  # serving EAGLE-3 on an MLA target is vLLM's business
    assert "FooBarForCausalLM is unknown to vLLM" in pairing_problem(target("unknown"), method="eagle3")
    assert pairing_problem(target("llama"), method=capture) is None
    assert pairing_problem("some-org/hub-model", method=capture) is None  # vLLM fetches and checks it
    with pytest.raises(SpecError, match="field 'architectures' is missing"):
        check_target(target("no_arch"), method=capture)
