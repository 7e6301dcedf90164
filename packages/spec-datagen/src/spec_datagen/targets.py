"""Which targets vLLM can pair with hidden-state capture and with our drafts, decided from the target's
config.json and vLLM's model registry, before any engine starts (an engine that cannot pair ends in a
multi-process traceback after 35-50 s).

vLLM 0.32 decides it so (vllm/v1/worker/gpu_model_runner.py): the capture method (`extract_hidden_states`),
DFlash and EAGLE-3 (P-EAGLE serves as EAGLE-3) turn on aux hidden-state outputs, and then the target's model
class must implement `SupportsEagle3` (`_setup_eagle3_aux_hidden_state_outputs` raises otherwise). The
architecture resolves to a class through `ModelRegistry` (in-process: importing the class needs no
engine), else through the Transformers backend, whose classes implement the interface. Capture also needs
the hidden-state cache in a KV-cache group of its own, which MLA attention (vLLM's `is_deepseek_mla`)
does not give (`ExampleHiddenStatesConnector`: "MLA verifiers are unsupported").
"""

from __future__ import annotations

import os
from pathlib import Path

from spec_format.errors import SpecError
from spec_format.fingerprint import read_model_config

AUX_METHODS = ("eagle3", "dflash", "extract_hidden_states")  # vLLM methods that need aux hidden states
WORKING = "e.g. LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM or Qwen3MoeForCausalLM"


def _is_mla(raw: dict) -> bool:
    """vLLM's own test (ModelArchConfigConvertorBase.is_deepseek_mla) on the target's text config."""
    from transformers import PretrainedConfig
    from vllm.transformers_utils.model_arch_config_convertor import ModelArchConfigConvertorBase

    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    hf, hf_text = PretrainedConfig(**raw), PretrainedConfig(**text)
    hf_text.model_type = text.get("model_type")  # a class attribute in transformers; set it per instance
    return bool(ModelArchConfigConvertorBase(hf, hf_text).is_deepseek_mla())


def _model_class(arch: str):
    """vLLM's class for `arch`, "transformers" when only its Transformers backend can run it, else None."""
    import transformers
    from vllm.model_executor.models.registry import ModelRegistry

    if arch in ModelRegistry.get_supported_archs():
        return ModelRegistry._try_load_model_cls(arch)  # imports the module; no engine
    return "transformers" if isinstance(getattr(transformers, arch, None), type) else None


def pairing_problem(model: str | os.PathLike, *, method: str) -> str | None:
    """Why vLLM cannot run `model` with speculative method `method` (vLLM's name: "extract_hidden_states"
    for capture, "eagle3", "dflash", ...), in one line; None when it can or when `model` is not a local
    directory (a hub name: vLLM fetches and checks it)."""
    if not (Path(model) / "config.json").is_file():
        return None
    import vllm
    from vllm.model_executor.models.interfaces import supports_eagle3

    raw = read_model_config(model)
    archs = raw.get("architectures") or []
    if not archs or not all(isinstance(a, str) for a in archs):
        return f"{model}/config.json: field 'architectures' is missing or not a list of names; vLLM picks the model class by it"
    arch = archs[0]
    cls = _model_class(arch)
    if cls is None:
        return (f"{model}: architecture {arch} is unknown to vLLM {vllm.__version__} (no vLLM model class and "
                f"no Transformers one); use a target vLLM runs, {WORKING}")  # fmt: skip
    what = "hidden-state capture" if method == "extract_hidden_states" else f"serving {method} drafts"
    if method in AUX_METHODS and cls != "transformers" and not supports_eagle3(cls):
        return (f"{model}: vLLM {vllm.__version__}'s class for {arch} ({cls.__name__}) lacks the aux-hidden-state "
                f"interface (SupportsEagle3) that {what} needs; use a target whose vLLM class has it, {WORKING}")  # fmt: skip
    if method == "extract_hidden_states" and _is_mla(raw):
        return (f"{model}: {arch} uses MLA attention (model_type {raw.get('model_type')}), whose KV cache vLLM's "
                f"hidden-state capture connector cannot share; capture from a target with standard attention, {WORKING}")  # fmt: skip
    return None


def check_target(model: str | os.PathLike, *, method: str) -> None:
    """SpecError with `pairing_problem`'s line when vLLM cannot pair `model` with `method`."""
    if problem := pairing_problem(model, method=method):
        raise SpecError(problem)
