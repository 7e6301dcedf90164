"""Which process a vLLM engine runs in: the user's VLLM_ENABLE_V1_MULTIPROCESSING stands, ours does not
leak into child `spec` commands, and a capture engine always gets its own process (it hangs in-process)."""

from __future__ import annotations

import os
import subprocess
import sys

# Prints the value chosen for (in_process, capture) = (0, 0), (1, 0), (1, 1), in one process.
CHOOSE = """
import os
from spec_datagen.runtime import _choose_engine_process
for in_process, capture in ((False, False), (True, False), (True, True)):
    _choose_engine_process(in_process, capture)
    print(os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"], end="")
"""
OURS = ("VLLM_ENABLE_V1_MULTIPROCESSING", "SPEC_SET_VLLM_MULTIPROCESSING")


def _chosen(**env) -> str:
    base = {k: v for k, v in os.environ.items() if k not in OURS}
    out = subprocess.run([sys.executable, "-c", CHOOSE], env={**base, **env}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()[-3:]


def test_engine_process_choice():
    assert _chosen() == "101"  # own process by default, in-process on request, capture always its own
    assert _chosen(VLLM_ENABLE_V1_MULTIPROCESSING="0") == "001"  # the user's choice stands, but for capture
    # A value this module set in a parent process (the test suite's in-process engines) is not the user's.
    assert _chosen(VLLM_ENABLE_V1_MULTIPROCESSING="0", SPEC_SET_VLLM_MULTIPROCESSING="1") == "101"
