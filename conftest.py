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
# SPEC_MAX_LIVE_ENGINES=1 keeps one engine alive (3-4 GB each) where memory is shared with others.
MAX_LIVE_ENGINES = int(os.environ.get("SPEC_MAX_LIVE_ENGINES", "2"))


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


def write_random_eagle3(
    out, verifier_dir, *, num_layers=1, layer_type=None, draft_vocab=1024, k=3, seed=0, scale=0.02
):
    """An EAGLE-3 checkpoint with random weights for `verifier_dir`, written with spec-format alone."""
    import numpy as np

    from spec_format.algorithms import build_eagle3_config, layout_for
    from spec_format.checkpoint import write_checkpoint
    from spec_format.fingerprint import default_eagle3_layers, fingerprint_model_dir, read_model_config
    from spec_format.vocab import build_vocab_mapping

    vcfg = read_model_config(verifier_dir)
    cfg = build_eagle3_config(
        vcfg, fingerprint_model_dir(verifier_dir), default_eagle3_layers(vcfg["num_hidden_layers"])[:3],
        draft_vocab, speculative_tokens=k, num_layers=num_layers, layer_type=layer_type,
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    required = layout_for(cfg).required
    tensors = {
        n: (rng.standard_normal(s) * scale).astype(np.float32) for n, s in required.items() if n != "d2t"
    }
    for name in tensors:
        if name.endswith("norm.weight"):
            tensors[name] = np.ones_like(tensors[name])
    mapping = build_vocab_mapping(rng.integers(0, 10, vcfg["vocab_size"]), draft_vocab)
    tensors.update(d2t=mapping.d2t, t2d=mapping.t2d)
    return write_checkpoint(out, cfg, tensors)


@pytest.fixture(scope="session")
def random_eagle3():
    """random_eagle3(out_dir, verifier_dir, **options) -> path of a random-weight EAGLE-3 draft."""
    return write_random_eagle3


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
        live[key] = make_llm(model, in_process=True, **kwargs)  # starts in seconds; capture keeps its own
        return live[key]

    yield get
    for llm in live.values():
        shutdown_llm(llm)
