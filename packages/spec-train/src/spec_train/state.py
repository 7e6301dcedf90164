"""Checkpoints and the training state, without pickle: safetensors for tensors, msgspec JSON for the rest.

Run directory:

    RUN/train_config.json                 the resolved TrainConfig
    RUN/metrics.jsonl, loss.png, acceptance.png
    RUN/checkpoints/step-000020/          a speculator directory vLLM loads as it is (config.json,
        config.json, model.safetensors    model.safetensors) plus what resuming needs:
        training/weights.safetensors      fp32 master weights (trained parameters and buffers)
        training/optimizer.safetensors    AdamW state per parameter ("<name>:exp_avg", ...)
        training/state.json               step, data position, optimiser hyper-parameters, best so far
        training/rng.json                 RNG states of every rank (torch, CUDA, numpy, python)
    RUN/final/                            the latest checkpoint's speculator files (hard links)
    RUN/best/                             the speculator files of the best checkpoint by validation
                                          acceptance length

Integrity: state.json is sealed (its last key is the sha256 of its bytes, spec_format.files.seal_json) and
records the sha256 of weights.safetensors, optimizer.safetensors and rng.json; config.json is sealed and
records model.safetensors' (spec_format.checkpoint). --resume checks all of them, so a flipped, cut or
missing byte in any file of the checkpoint it resumes from is an error naming the file, never a silent
resume from damaged state.

A checkpoint is written into `checkpoints/.tmp-step-...`, every file fsynced, then renamed: a directory
named step-NNNNNN is complete, whatever moment a run was killed at. --resume takes the highest one;
leftover temporary directories are deleted. final/ and best/ are replaced by two renames; a run killed
between them is repaired at the next start (`publish` again from the latest checkpoint).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import msgspec
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from spec_format.checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_config, weights_problem
from spec_format.dataset.manifest import fsync_dir, write_atomic
from spec_format.diagnostics import kill_point
from spec_format.errors import SpecError
from spec_format.files import file_sha256, seal_json, seal_problem

CHECKPOINTS, FINAL, BEST, TRAINING = "checkpoints", "final", "best", "training"
_STEP_DIR = re.compile(r"step-(\d{6,})")
_HASHED = ("weights.safetensors", "optimizer.safetensors", "rng.json")  # recorded in state.json
SEAL = "state_sha256"


class TrainingState(msgspec.Struct, kw_only=True):
    step: int  # optimiser steps done
    epoch: int  # epoch of the next training row
    row_in_epoch: int  # its index within the epoch
    rows_consumed: int  # global training rows consumed (step * world_size * grad_accum)
    tokens: int  # training tokens consumed
    world_size: int
    lr: float
    elapsed_s: float  # training time so far, over all resumptions
    best_step: int | None = None
    best_acceptance_length: float | None = None
    param_groups: list[dict] = []  # the optimiser's hyper-parameters; "params" lists parameter names
    sha256: dict[str, str] = {}  # training/ file name -> hex sha256 (every file but state.json itself)


class RngState(msgspec.Struct):
    torch_cpu: list[int]
    torch_cuda: list[list[int]]
    numpy: tuple[str, list[int], int, int, float]
    python: tuple[int, list[int], float | None]


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def write_bytes_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, data, f".{path.name}.tmp-{os.getpid()}")


# ---------------------------------------------------------------------------------------------
# RNG states.


def rng_state() -> RngState:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    cuda = [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return RngState(
        torch_cpu=torch.get_rng_state().tolist(),
        torch_cuda=cuda,
        numpy=(kind, keys.tolist(), pos, has_gauss, gauss),
        python=(version, list(mt), gauss_next),
    )


def set_rng_state(s: RngState) -> None:
    torch.set_rng_state(torch.tensor(s.torch_cpu, dtype=torch.uint8))
    if s.torch_cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(c, dtype=torch.uint8) for c in s.torch_cuda])
    kind, keys, pos, has_gauss, gauss = s.numpy
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, mt, gauss_next = s.python
    random.setstate((version, tuple(mt), gauss_next))


# ---------------------------------------------------------------------------------------------
# Writing.


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(Path(dirpath) / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def save_checkpoint(
    run_dir: Path,
    draft: torch.nn.Module,
    weights: dict[str, torch.Tensor],
    optimizer: dict,
    state: TrainingState,
    rng: list[RngState],
    save_dtype: str,
) -> Path:
    """Write checkpoints/step-NNNNNN (rank 0 only). `draft` holds the full weights (the speculator files
    are written from it); `weights` are the fp32 tensors to resume from; `optimizer` is a full optimiser
    state dict keyed by parameter names; `rng` has one entry per rank."""
    root = run_dir / CHECKPOINTS
    final = root / step_dir_name(state.step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        _write_checkpoint(tmp, draft, weights, optimizer, state, rng, save_dtype)
        os.rename(tmp, final)
        fsync_dir(root)
    except (OSError, SafetensorError) as e:  # a full disk, above all: what was committed before stays
        shutil.rmtree(tmp, ignore_errors=True)
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).rsplit(": ", 1)[-1]
        raise SpecError(f"{root}: writing the checkpoint of step {state.step} failed ({why}); "
                        "the checkpoints before it are intact: free space and run again with --resume") from None  # fmt: skip
    return final


def _write_checkpoint(tmp: Path, draft, weights, optimizer, state: TrainingState, rng, save_dtype) -> None:
    from spec_models import save

    save(draft, tmp, float_dtype=save_dtype)
    (tmp / TRAINING).mkdir()
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / TRAINING / "weights.safetensors"
    )
    kill_point(
        "checkpoint", state.step
    )  # fault injection (spec_format.diagnostics): half a checkpoint on disk
    flat = {f"{name}:{key}": t.detach().cpu().contiguous()
            for name, per in optimizer["state"].items() for key, t in per.items()}  # fmt: skip
    save_file(flat, tmp / TRAINING / "optimizer.safetensors")
    (tmp / TRAINING / "rng.json").write_bytes(msgspec.json.encode(rng))
    sha = {name: file_sha256(tmp / TRAINING / name) for name in _HASHED}
    groups = [_jsonable(g) for g in optimizer["param_groups"]]
    state = msgspec.structs.replace(state, param_groups=groups, sha256=sha)
    state_json = msgspec.json.format(msgspec.json.encode(state), indent=1)
    (tmp / TRAINING / "state.json").write_bytes(seal_json(state_json, SEAL))
    _fsync_tree(tmp)


def _jsonable(group: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}


def publish(ckpt: Path, dest: Path) -> None:
    """Make `dest` (RUN/final or RUN/best) hold ckpt's speculator files (hard links when possible)."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            os.link(ckpt / name, tmp / name)
        except OSError:
            shutil.copy2(ckpt / name, tmp / name)
    fsync_dir(tmp)
    if dest.exists():
        os.rename(dest, old)
    os.rename(tmp, dest)
    fsync_dir(dest.parent)
    shutil.rmtree(old, ignore_errors=True)


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (final/ and best/ hold their own links)."""
    for path in checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------
# Reading.


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = run_dir / CHECKPOINTS
    found = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def clean_partial(run_dir: Path) -> list[Path]:
    """Remove what a killed run left half-written; returns the removed paths."""
    removed = []
    for parent, pattern in (
        (run_dir / CHECKPOINTS, ".tmp-step-"),
        (run_dir, f".{FINAL}."),
        (run_dir, f".{BEST}."),
    ):
        if parent.is_dir():
            for p in parent.iterdir():
                if p.name.startswith(pattern):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                    removed.append(p)
    return removed


def load_checkpoint(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict, TrainingState, list[RngState]]:
    """(fp32 weights, optimiser state dict keyed by parameter names, training state, RNG per rank)."""
    t = ckpt / TRAINING
    remove = "remove this checkpoint to resume from the one before"
    try:
        # The speculator files that final/ is published from, then the training state.
        if problem := weights_problem(ckpt, read_config(ckpt)[0]):
            raise SpecError(problem)
        data = (t / "state.json").read_bytes()
        if problem := seal_problem(data, SEAL):
            raise SpecError(f"{t / 'state.json'}: {problem}")
        state = msgspec.json.decode(data, type=TrainingState)
        for name in _HASHED:
            if name not in state.sha256:
                raise SpecError(f"{t / 'state.json'}: no sha256 recorded for {name}")
            if file_sha256(t / name) != state.sha256[name]:
                raise SpecError(
                    f"{t / name}: its sha256 differs from the one state.json records: it is corrupted"
                )
        rng = msgspec.json.decode((t / "rng.json").read_bytes(), type=list[RngState])
        weights = load_file(t / "weights.safetensors")
        flat = load_file(t / "optimizer.safetensors")
    except SpecError as e:
        raise SpecError(f"{ckpt}: cannot resume from it: {e}; {remove}") from None
    except (OSError, msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
        raise SpecError(f"{ckpt}: the training state cannot be read ({e}); {remove}") from None
    per: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        name, _, field = key.rpartition(":")
        per.setdefault(name, {})[field] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in state.param_groups]
    return weights, {"state": per, "param_groups": groups}, state, rng
