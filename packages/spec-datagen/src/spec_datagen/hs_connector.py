"""vLLM's hidden-states KV connector, made safe for CPU-only engines.

vLLM's `extract_hidden_states` speculative method stores the aux-layer hidden states of every scheduled
token in a cache-only KV layer; `ExampleHiddenStatesConnector` copies a finished request's slots out of
that cache into `<storage>/<request id>.safetensors` (`hidden_states` [T, n_layers, H], `token_ids` [T]).
The stock connector does that copy on a CUDA stream into pinned memory, which raises on a CPU engine
("pin_memory=True requires a CUDA or other accelerator backend"). On CPU this subclass slices the cache
synchronously instead; on GPUs it defers to the stock code. vLLM imports it by name in the engine process
(`kv_connector_module_path`), so it lives in its own small module.
"""

from __future__ import annotations

import fcntl
import os
from functools import partial

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
    PendingSave,
    extract_from_kv_cache,
)

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
