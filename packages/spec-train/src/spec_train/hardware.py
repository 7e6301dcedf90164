"""The machine in a few words, for the model card: the GPUs torch sees, else the CPU model and its cores."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_amx() -> bool:
    """The CPU multiplies bf16 natively (AMX): where training picks bf16 and vLLM-CPU runs bf16 fast."""
    flags = re.search(r"^flags\s*:\s*(.+)$", _cpuinfo(), re.M)
    return bool(flags) and "amx_bf16" in flags.group(1).split()


def _cpu() -> str:
    info = _cpuinfo()
    if not info:
        return f"CPU ({os.cpu_count()} cores)"
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    amx = ", AMX" if cpu_has_amx() else ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model.group(1).strip() if model else 'CPU'} ({cores} cores{amx})"


def describe() -> str:
    """'2 x NVIDIA H100 80GB HBM3', or 'Intel(R) Xeon(R) ... (2 cores, AMX)' without a GPU."""
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"{n} x {torch.cuda.get_device_name(0)}"
    return _cpu()
