"""vLLM's own speculators-config parser accepts what spec-format writes (no engine start needed)."""

import json

import numpy as np
import pytest

from spec_format.algorithms import build_eagle3_config, layout_for
from spec_format.checkpoint import write_checkpoint
from spec_format.fingerprint import default_eagle3_layers, fingerprint_model_dir, read_model_config
from spec_format.vocab import build_vocab_mapping


def _tiny_eagle3(out, verifier_dir, layer_type=None, num_layers=1, draft_vocab=1024, k=3):
    vcfg = read_model_config(verifier_dir)
    cfg = build_eagle3_config(
        vcfg, fingerprint_model_dir(verifier_dir), default_eagle3_layers(vcfg["num_hidden_layers"])[:3],
        draft_vocab, speculative_tokens=k, num_layers=num_layers, layer_type=layer_type,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    tensors = {
        n: rng.standard_normal(s).astype(np.float32) * 0.02
        for n, s in layout_for(cfg).required.items()
        if n != "d2t"
    }
    m = build_vocab_mapping(rng.integers(0, 10, vcfg["vocab_size"]), draft_vocab)
    tensors.update(d2t=m.d2t, t2d=m.t2d)
    return write_checkpoint(out, cfg, tensors)


@pytest.mark.parametrize("arch,num_layers", [("llama", 1), ("qwen3", 2)])
def test_vllm_speculators_parser_accepts_our_checkpoint(tmp_path, tiny_model, arch, num_layers):
    from vllm.transformers_utils.config import maybe_override_with_speculators
    from vllm.transformers_utils.configs.speculators import SpeculatorsConfig

    verifier = tiny_model(arch)
    draft = _tiny_eagle3(tmp_path / "draft", verifier, num_layers=num_layers, k=4)
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
