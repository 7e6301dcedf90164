"""Fixtures shared by every test in the repository.

Only the standard library is imported at module level: spec-format's tests also run in an environment
with neither torch nor vLLM. Heavy fixtures import what they need when first used.

vLLM engines are expensive (35-50 s to start on two CPU cores), so tests share them: `vllm_engine(key,
**kwargs)` returns one engine per configuration for the whole session, keeps at most two alive, and
every engine start (also in subprocesses run by tests) is counted in the summary line.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import pytest

_ENGINE_LOG = Path(tempfile.gettempdir()) / f"spec-engine-starts-{os.getpid()}.log"
MAX_LIVE_ENGINES = 2


def pytest_configure(config):
    # Subprocesses inherit this; spec_datagen.runtime.record_engine_start appends to it.
    os.environ["SPEC_ENGINE_LOG"] = str(_ENGINE_LOG)
    _ENGINE_LOG.write_text("")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    starts = _ENGINE_LOG.read_text().splitlines() if _ENGINE_LOG.exists() else []
    kinds: dict[str, int] = {}
    for line in starts:
        kind = line.split(" ", 1)[-1]
        kinds[kind] = kinds.get(kind, 0) + 1
    detail = ", ".join(f"{k}: {n}" for k, n in sorted(kinds.items()))
    terminalreporter.write_line(f"vLLM engine starts: {len(starts)}" + (f" ({detail})" if detail else ""))
    _ENGINE_LOG.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def spec_cli() -> str:
    """The installed `spec` console script of this environment (tests run it as users do)."""
    path = Path(sys.executable).parent / "spec"
    assert path.is_file(), f"{path} is missing: is the workspace installed (uv sync)?"
    return str(path)


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The real SmolLM2-135M-Instruct target as an HF directory (built once, cached)."""
    from spec_datagen.demo_model import demo_model_dir

    return demo_model_dir()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model("llama" | "qwen3" | "qwen3_moe") -> a tiny random target directory, built once."""
    from spec_datagen.demo_model import tiny_model_dir

    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = tiny_model_dir(arch, root / arch)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def vllm_engine():
    """vllm_engine(key, model, **kwargs) -> a shared `vllm.LLM`, one per key for the session."""
    from spec_datagen.runtime import make_llm, shutdown_llm

    live: OrderedDict[str, object] = OrderedDict()

    def get(key: str, model, **kwargs):
        if key in live:
            live.move_to_end(key)
            return live[key]
        while len(live) >= MAX_LIVE_ENGINES:
            _, old = live.popitem(last=False)
            shutdown_llm(old)
        live[key] = make_llm(model, **kwargs)
        return live[key]

    yield get
    for llm in live.values():
        shutdown_llm(llm)
