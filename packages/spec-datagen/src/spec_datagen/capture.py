"""Hidden-state capture with vLLM: token ids in, per-token hidden states of the chosen layers out.

The path is vLLM's own: the `extract_hidden_states` speculative method stores the residual stream of the
requested layers for every prompt token in a cache-only KV layer, and a KV connector
(`hs_connector.SpecHiddenStatesConnector`) writes each finished request's states to a safetensors file
that `capture()` reads, checks and deletes. Each request is a prefill plus one sampled token
(max_tokens=1), so the cost is vLLM's prefill. Prefix caching is off: a cached prefix is never recomputed,
so its hidden states would never be written.

Layer ids use vLLM's capture-id convention (spec_format.fingerprint.LAYER_CONVENTION): id k is the
residual stream after decoder layer k-1 (0 = embeddings), which is transformers' `hidden_states[k]` for
k < L; id L is the last decoder layer's output *before* the final norm. vLLM returns the layers in
ascending order whatever order they were asked in, so ids are kept sorted and unique here.

`capture()` streams: it keeps a bounded number of prompt tokens in flight in the engine (which runs in
its own process and keeps computing while the caller writes), and yields samples in input order.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from spec_format.errors import SpecError
from spec_format.fingerprint import LAYER_CONVENTION, read_model_config

__all__ = [
    "LAYER_CONVENTION",
    "CapturedSample",
    "capture",
    "capture_engine_kwargs",
    "default_storage_dir",
    "make_capture_llm",
    "validate_layer_ids",
]


class CapturedSample(msgspec.Struct):
    """One captured sample. token_ids int32 [T], loss_mask bool [T], hidden float32 [T, n_layers, H]
    (layers in the order of the dataset's layer ids); source_index is the row in the full input."""

    source_index: int
    token_ids: np.ndarray
    loss_mask: np.ndarray
    hidden: np.ndarray


def validate_layer_ids(layer_ids: Iterable[int], num_hidden_layers: int) -> list[int]:
    """Sorted unique capture ids, each in 0..L (vLLM's capture-id convention), else a SpecError."""
    ids = list(layer_ids)
    if not ids:
        raise SpecError("--layers: give at least one layer id")
    bad = [k for k in ids if not isinstance(k, int) or k < 0 or k > num_hidden_layers]
    if bad:
        raise SpecError(
            f"--layers: {bad} out of range; the target has {num_hidden_layers} decoder layers, so capture ids "
            f"are 0..{num_hidden_layers} (id k = output of decoder layer k-1, 0 = embeddings, "
            f"{num_hidden_layers} = last layer before the final norm)"
        )
    if len(set(ids)) != len(ids):
        raise SpecError(f"--layers: {ids} repeats a layer id")
    return sorted(ids)


def default_storage_dir() -> Path:
    """A fresh directory for the connector's per-request files: in RAM (/dev/shm) when there is one,
    since each file is read once and deleted at once. Directories left by killed runs (their process is
    gone) are removed first."""
    base = Path("/dev/shm") if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    root = base or Path(tempfile.gettempdir())
    for old in root.glob("spec-capture-*-*"):
        pid = old.name.split("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"spec-capture-{os.getpid()}-", dir=root))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def capture_engine_kwargs(
    layer_ids: list[int],
    storage_dir: str | os.PathLike,
    *,
    max_model_len: int,
    tensor_parallel_size: int = 1,
    **overrides: Any,
) -> dict[str, Any]:
    """Keyword arguments (beyond the model) for `runtime.make_llm` that turn on hidden-state capture."""
    from spec_datagen.hs_connector import CONNECTOR_MODULE, CONNECTOR_NAME

    kwargs: dict[str, Any] = {
        "max_model_len": max_model_len,
        "enable_prefix_caching": False,
        "tensor_parallel_size": tensor_parallel_size,
        "speculative_config": {
            "method": "extract_hidden_states",
            "num_speculative_tokens": 1,
            "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": list(layer_ids)}},
        },
        "kv_transfer_config": {
            "kv_connector": CONNECTOR_NAME,
            "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": "kv_producer",
            "kv_connector_extra_config": {"shared_storage_path": str(storage_dir)},
        },
    }
    kwargs.update(overrides)
    return kwargs


def make_capture_llm(model: str | os.PathLike, layer_ids: list[int], storage_dir, **kwargs: Any):
    """A `vllm.LLM` that captures `layer_ids` (validated against the model's config)."""
    from spec_datagen.runtime import make_llm

    layer_ids = validate_layer_ids(layer_ids, read_model_config(model)["num_hidden_layers"])
    return make_llm(model, **capture_engine_kwargs(layer_ids, storage_dir, **kwargs))


def capture_layer_ids(llm) -> list[int]:
    """The layer ids an engine made by `make_capture_llm` captures (in stored order)."""
    spec = llm.llm_engine.vllm_config.speculative_config
    if spec is None or spec.method != "extract_hidden_states":
        raise SpecError("this vLLM engine does not capture hidden states; create it with make_capture_llm()")
    return sorted(spec.draft_model_config.hf_config.eagle_aux_hidden_state_layer_ids)


def _load(path: str, sent: np.ndarray, n_layers: int) -> np.ndarray:
    """Read one request's file (waiting on its lock until the writer thread is done), check it, delete it."""
    from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
        cleanup_hidden_states,
        load_hidden_states,
    )

    data = load_hidden_states(path)
    cleanup_hidden_states(path)
    got = data["token_ids"].numpy()
    if got.shape != sent.shape or not np.array_equal(got, sent):
        raise RuntimeError(
            f"{path}: captured token ids differ from the ids sent ({got.shape} vs {sent.shape})"
        )
    hidden = data["hidden_states"]
    if hidden.ndim != 3 or hidden.shape[0] != len(sent) or hidden.shape[1] != n_layers:
        raise RuntimeError(
            f"{path}: hidden states of shape {tuple(hidden.shape)}, expected [{len(sent)}, {n_layers}, H]"
        )
    return hidden.float().numpy()


def capture(llm, samples: Iterable, *, max_inflight_tokens: int = 65536) -> Iterator[CapturedSample]:
    """Yield a CapturedSample for every input sample, in input order.

    `samples` yields objects with `source_index`, `token_ids` (int [T]) and `loss_mask` (bool [T]), e.g.
    spec_datagen.template.TokenizedSample. At most `max_inflight_tokens` prompt tokens (at least one
    sample) are queued in the engine at a time, which bounds the memory of finished-but-unread states.
    """
    from vllm import SamplingParams

    engine = llm.llm_engine
    n_layers = len(capture_layer_ids(llm))
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    source = iter(samples)
    queue: deque[tuple[str, Any]] = deque()  # (request id, sample) in input order
    finished: dict[str, Any] = {}  # request id -> RequestOutput, possibly out of order
    inflight = 0
    counter = 0
    run = uuid.uuid4().hex[:8]  # request ids stay unique when several captures share an engine
    exhausted = False
    try:
        while True:
            while not exhausted and (not queue or inflight < max_inflight_tokens):
                sample = next(source, None)
                if sample is None:
                    exhausted = True
                    break
                ids = np.asarray(sample.token_ids, dtype=np.int64)
                request_id = f"capture-{run}-{counter}"
                counter += 1
                engine.add_request(request_id, {"prompt_token_ids": ids.tolist()}, params)
                queue.append((request_id, sample))
                inflight += len(ids)
            if not queue:
                return
            while queue and queue[0][0] in finished:
                request_id, sample = queue.popleft()
                out = finished.pop(request_id)
                inflight -= len(sample.token_ids)
                path = (out.kv_transfer_params or {}).get("hidden_states_path")
                if path is None:
                    raise RuntimeError(f"request {request_id} finished without hidden states")
                ids = np.asarray(sample.token_ids, dtype=np.int32)
                yield CapturedSample(
                    source_index=sample.source_index,
                    token_ids=ids,
                    loss_mask=np.asarray(sample.loss_mask, dtype=np.bool_),
                    hidden=_load(path, ids.astype(np.int64), n_layers),
                )
            if queue and queue[0][0] not in finished:
                for out in engine.step():
                    if out.finished:
                        finished[out.request_id] = out
    finally:
        leftover = [rid for rid, _ in queue]
        if leftover:
            engine.abort_request(leftover)
            # Drain so that the engine is clean for the next caller; files that were written anyway go below.
            while engine.has_unfinished_requests():
                finished.update((o.request_id, o) for o in engine.step() if o.finished)
        for out in finished.values():
            path = (out.kv_transfer_params or {}).get("hidden_states_path")
            if path:
                for p in (path, path + ".lock"):
                    Path(p).unlink(missing_ok=True)
