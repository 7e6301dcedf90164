"""Which process a vLLM engine runs in: the user's VLLM_ENABLE_V1_MULTIPROCESSING stands, ours does not
leak into child `spec` commands, and a capture engine always gets its own process (it hangs in-process).
The engines themselves run in both ways across the suite (in-process: the shared `vllm_engine` fixture;
their own process: every `spec` command)."""

from __future__ import annotations

from spec_datagen.runtime import engine_process_value, user_multiprocessing


def _chosen(**env) -> str:
    """The values chosen for (in_process, capture) = (0, 0), (1, 0), (1, 1) in a process started with `env`."""
    user = user_multiprocessing(env)
    return "".join(engine_process_value(i, c, user) for i, c in ((False, False), (True, False), (True, True)))


def test_engine_process_choice():
    assert _chosen() == "101"  # own process by default, in-process on request, capture always its own
    assert _chosen(VLLM_ENABLE_V1_MULTIPROCESSING="0") == "001"  # the user's choice stands, but for capture
    assert _chosen(VLLM_ENABLE_V1_MULTIPROCESSING="1") == "111"
    # A value this module set in a parent process (the test suite's in-process engines) is not the user's.
    assert _chosen(VLLM_ENABLE_V1_MULTIPROCESSING="0", SPEC_SET_VLLM_MULTIPROCESSING="1") == "101"
