"""vLLM's own speculators-config parser accepts what spec-format writes (no engine start needed)."""

import json

import pytest


@pytest.mark.parametrize("arch,num_layers", [("llama", 1), ("qwen3", 2)])
def test_vllm_speculators_parser_accepts_our_checkpoint(
    tmp_path, tiny_model, random_eagle3, arch, num_layers
):
    from vllm.transformers_utils.config import maybe_override_with_speculators
    from vllm.transformers_utils.configs.speculators import SpeculatorsConfig

    verifier = tiny_model(arch)
    draft = random_eagle3(tmp_path / "draft", verifier, num_layers=num_layers, k=4)
    model, tokenizer, spec = maybe_override_with_speculators(str(draft), None, trust_remote_code=False)
    # vLLM swaps in the verifier as the model and takes method and k from our config
    assert model == tokenizer == str(verifier.resolve())
    assert spec == {"method": "eagle3", "num_speculative_tokens": 4, "model": str(draft)}

    hf = SpeculatorsConfig.from_pretrained(str(draft))
    expected_arch = {"llama": "Eagle3LlamaForCausalLM", "qwen3": "Eagle3Qwen3ForCausalLM"}[arch]
    assert hf.architectures == [expected_arch]
    assert (
        hf.draft_vocab_size == 1024
        and hf.vocab_size == json.loads((verifier / "config.json").read_text())["vocab_size"]
    )
    assert hf.eagle_aux_hidden_state_layer_ids == [2, 4, 5]  # 8-layer tiny target: 2, L//2, L-3
    assert hf.num_hidden_layers == num_layers and hf.norm_before_residual is False
