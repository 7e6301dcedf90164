"""Process setup under torchrun (or alone), and the DDP / FSDP2 wrappers: PyTorch's own, nothing else.

    torchrun --nproc-per-node 8 -m spec_train DATASET --verifier TARGET --out RUN      # one node
    torchrun --nnodes 2 --node-rank R --master-addr HOST --nproc-per-node 8 -m spec_train ...   # several

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; without them this is one process. Backend:
NCCL on GPUs, gloo on CPUs. Each process takes its share of the CPU cores for its intra-op threads.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from spec_format.console import say


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def say(self, msg: str) -> None:
        """A line on stderr from the main rank only (every rank runs the same code)."""
        if self.main:
            say(msg, "spec train")


def setup() -> Dist:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )
    return Dist(rank, world, local_rank, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, d: Dist, fsdp: bool) -> nn.Module:
    """DDP (default) or FSDP2 (each draft decoder layer sharded, then the rest) around the objective.
    The verifier head's tensors are buffers: DDP does not broadcast them (broadcast_buffers=False),
    FSDP2 does not shard them."""
    if d.world == 1:
        return model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(d.device.type, (d.world,))
        for layer in model.draft.layers:
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [d.local_rank] if d.device.type == "cuda" else None
    return DDP(model, device_ids=ids, broadcast_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def sync_gradients(model: nn.Module, enabled: bool) -> None:
    """Gradient all-reduce on the last micro-batch only (gradient accumulation)."""
    if hasattr(model, "require_backward_grad_sync"):  # DDP
        model.require_backward_grad_sync = enabled
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_gather_objects(obj) -> list:
    """Every rank's `obj` (msgspec structs and builtins), on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def relaunch(nproc: int, argv: list[str]) -> int:
    """`spec train --nproc N ...`: run the same command under torchrun with N processes on this node."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "spec_train", *argv]  # fmt: skip
    return subprocess.call(cmd)
