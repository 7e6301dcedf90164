"""Diagnostics hooks: environment variables that make spec's commands report on themselves, for test suites
and fault campaigns. Every such hook lives in this module, so this docstring lists them all:

    SPEC_ENGINE_LOG=FILE   every vLLM engine start (offline engine or OpenAI server, in any process that
                           inherits the variable) appends "<pid> <kind>" to FILE; the test suite counts
                           engine starts with it (each costs 35-50 s on two CPU cores).
    SPEC_TRAIN_KILL_AT=WHERE:STEP
                           fault injection: `spec train` sends itself SIGKILL at that point of step STEP
                           (1-based): "step" after the step's backward pass, before the optimiser update;
                           "checkpoint" midway through writing that step's checkpoint (spec_train.state).
                           Resume tests use it to kill a run where an outside kill could only land by luck.
    SPEC_DATAGEN_KILL_AT=WHERE:K
                           fault injection: the dataset writer (spec_format.dataset.writer) sends its process
                           SIGKILL while committing the K-th shard of this run (1-based): "shard" with the
                           shard file written and fsynced but not yet renamed into place, "manifest" with it
                           renamed but not yet listed in the manifest. tools/fault_campaign.py uses both.
    SPEC_CAPTURE_KILL_AT=send:N
                           fault injection: the capture process of `spec train --online` (spec_train.online)
                           sends itself SIGKILL before it sends its N-th sample to the trainer (1-based;
                           negative counts from the end, -1 the last): the trainer must stop in one line
                           and --resume continue. Both the engine-death test and the campaign use it.

Unset, a hook does nothing.
"""

from __future__ import annotations

import os
import signal


def record_engine_start(kind: str) -> None:
    """Append "<pid> <kind>" to $SPEC_ENGINE_LOG when it is set (kind: "llm" or "server")."""
    log = os.environ.get("SPEC_ENGINE_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {kind}\n")


def kill_point(where: str, step: int, variable: str = "SPEC_TRAIN_KILL_AT") -> None:
    """SIGKILL this process when $variable is "<where>:<step>"."""
    if os.environ.get(variable) == f"{where}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
