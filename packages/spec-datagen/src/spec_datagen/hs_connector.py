"""vLLM's hidden-states KV connector, made safe for CPU-only engines: the one place that reaches into
vLLM's private connector code, written against vLLM 0.32.0.

vLLM's `extract_hidden_states` speculative method stores the aux-layer hidden states of every scheduled
token in a cache-only KV layer; `ExampleHiddenStatesConnector` copies a finished request's slots out of
that cache into `<storage>/<request id>.safetensors` (`hidden_states` [T, n_layers, H], `token_ids` [T]).
The stock connector does that copy on a CUDA stream into pinned memory, which raises on a CPU engine
("pin_memory=True requires a CUDA or other accelerator backend"). On CPU this subclass slices the cache
synchronously instead; on GPUs it defers to the stock code. vLLM imports it by name in the engine process
(`kv_connector_module_path`), so it lives in its own small module.

The override reads the stock connector's private state (COUPLING below). A vLLM that renames or drops any
of it would misalign or lose states, so importing this module checks that all of it is there, from the
class and its source alone (no engine): `spec datagen` then fails before the engine starts, with one line
naming what is missing and the version this was written against; test_hs_connector.py runs the check.
"""

from __future__ import annotations

import ast
import dataclasses
import fcntl
import inspect
import os
import textwrap
from functools import partial

import torch

from spec_format.errors import SpecError

VLLM_VERSION = "0.32.0"  # vllm/distributed/kv_transfer/kv_connector/v1/example_hidden_states_connector.py
_STOCK = "vLLM's ExampleHiddenStatesConnector"


def _outdated(what: str) -> SpecError:
    import vllm

    return SpecError(
        f"spec_datagen/hs_connector.py was written against vLLM {VLLM_VERSION} and needs {what}, which the "
        f"installed vLLM {vllm.__version__} lacks: install vLLM {VLLM_VERSION} or port that file"
    )


try:
    from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
        ExampleHiddenStatesConnector,
        PendingSave,
        extract_from_kv_cache,
    )
except ImportError as e:
    raise _outdated(f"{_STOCK} ({e})") from None

# What the override relies on: self.<attribute> set by the stock __init__, methods with these parameters,
# the fields of a PendingSave, and extract_from_kv_cache's parameters.
COUPLING = {
    "attributes": ("_kv_cache", "_is_tp_rank_zero", "_block_size", "_lock_fds", "use_lock", "_executor",
                   "_req_copy_events", "_req_futures"),
    "methods": {"_submit_async_write": ("pending",), "_on_write_done": ("req_id", "future"),
                "_write_tensors": ("tensors", "event", "filename", "lock_fd")},
    "pending_save": ("req_id", "filename", "token_ids", "block_ids"),
    "extract_from_kv_cache": ("kv_cache", "slot_mapping", "num_tokens"),
}  # fmt: skip


def _params(fn) -> tuple[str, ...]:
    return tuple(p for p in inspect.signature(fn).parameters if p != "self")


def coupling_problems(stock: type = ExampleHiddenStatesConnector, pending: type = PendingSave) -> list[str]:
    """What of COUPLING `stock` (vLLM's connector class) lacks; empty when everything is there."""
    problems = []
    init = ast.parse(textwrap.dedent(inspect.getsource(stock.__init__)))
    assigned = {
        n.attr
        for n in ast.walk(init)
        if isinstance(n, ast.Attribute)
        and isinstance(n.ctx, ast.Store)
        and getattr(n.value, "id", "") == "self"
    }
    problems += [f"{_STOCK}.__init__ setting self.{a}" for a in COUPLING["attributes"] if a not in assigned]
    for name, params in COUPLING["methods"].items():
        fn = getattr(stock, name, None)
        if fn is None or _params(fn) != params:
            problems.append(f"{_STOCK}.{name}({', '.join(params)})")
    # The override only runs if the stock get_finished still hands each finished request to it.
    if "self._submit_async_write(" not in inspect.getsource(stock.get_finished):
        problems.append(f"{_STOCK}.get_finished calling self._submit_async_write")
    fields = {f.name for f in dataclasses.fields(pending)}
    problems += [f"PendingSave.{f}" for f in COUPLING["pending_save"] if f not in fields]
    if _params(extract_from_kv_cache) != COUPLING["extract_from_kv_cache"]:
        problems.append(f"extract_from_kv_cache({', '.join(COUPLING['extract_from_kv_cache'])})")
    return problems


if _problems := coupling_problems():  # in the caller before the engine starts, and in the engine process
    raise _outdated("; ".join(_problems))

CONNECTOR_NAME = "SpecHiddenStatesConnector"
CONNECTOR_MODULE = __name__


class _Done:
    """Stands in for the CUDA event of a finished device-to-host copy (the CPU copy is synchronous)."""

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class SpecHiddenStatesConnector(ExampleHiddenStatesConnector):
    def _submit_async_write(self, pending: PendingSave) -> None:
        if self._kv_cache is None or self._kv_cache.is_cuda:
            return super()._submit_async_write(pending)
        if not self._is_tp_rank_zero:
            return
        blocks = torch.tensor(pending.block_ids, dtype=torch.long)
        slots = (torch.arange(self._block_size).view(1, -1) + blocks.view(-1, 1) * self._block_size).flatten()
        num_tokens = pending.token_ids.shape[0]
        # [T, n_layers, H]: copied now, because the blocks are freed once get_finished reports the request.
        tensors = {
            "hidden_states": extract_from_kv_cache(self._kv_cache, slots, num_tokens).clone(),
            "token_ids": pending.token_ids.clone(),
        }
        os.makedirs(os.path.dirname(pending.filename), exist_ok=True)
        lock_fd = self._lock_fds.pop(pending.req_id, None)
        if lock_fd is None and self.use_lock:
            lock_fd = os.open(pending.filename + ".lock", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        done = _Done()
        future = self._executor.submit(self._write_tensors, tensors, done, pending.filename, lock_fd)
        self._req_copy_events[pending.req_id] = done
        self._req_futures[pending.req_id] = future
        future.add_done_callback(partial(self._on_write_done, pending.req_id))
