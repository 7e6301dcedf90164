"""Fixtures shared by every test in the repository.

Only the standard library is imported at module level: spec-format's tests also run in an environment
with neither torch nor vLLM. Heavy fixtures import what they need when first used.

vLLM engines are expensive (35-50 s to start on two CPU cores), so tests share them: `vllm_engine(key,
**kwargs)` returns one engine per configuration for the whole session (of each xdist worker), keeps at
most two alive, and every engine start (also in subprocesses run by tests) is counted in the summary line.
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


# The suite runs in two pytest-xdist workers (addopts: -n auto --dist loadfile), each pinned to its own half
# of the cores: on two cores one worker's imports, engine start-ups and subprocess launches (single-threaded,
# most of the suite's wall time: one process used 132% of 200% CPU) overlap the other's compute. Unpinned,
# two engines or trainings with OpenMP threads bound to the same cores slowed each other 15x
# (docs/testing.md).
MAX_WORKERS = 2

# Files that take minutes go to the workers first (their files in this order, then the rest as collected),
# so that neither worker is left with a long file at the end while the other idles. Seconds on a quiet
# 2-core AMX CPU, single process (docs/testing.md).
LONGEST_FIRST = (
    "packages/spec-train/tests/test_quickstart.py",  # 536 s
    "packages/spec-train/tests/test_online.py",  # 185 s
    "packages/spec-datagen/tests/test_cli.py",  # 101 s
    "packages/spec-train/tests/test_doctor.py",  # 98 s
    "packages/spec-datagen/tests/test_regenerate.py",  # 87 s
)


def pytest_xdist_auto_num_workers(config):
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


def _pin_worker() -> None:
    """In xdist worker gwN of M: keep this process (and every process it starts, which inherit it) on the
    N-th of M equal slices of the cores, with OpenMP sized to match (vLLM binds its threads to the cores it
    is given: spec_datagen.runtime.cpu_environment)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not worker or not count or int(count) < 2:
        return
    cores, n, i = sorted(os.sched_getaffinity(0)), int(count), int(worker.removeprefix("gw"))
    mine = cores[i * len(cores) // n : (i + 1) * len(cores) // n] or cores
    os.sched_setaffinity(0, mine)
    os.environ["OMP_NUM_THREADS"] = str(len(mine))


def pytest_configure(config):
    _pin_worker()
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        # Subprocesses and xdist workers inherit this; spec_format.diagnostics.record_engine_start appends.
        os.environ["SPEC_ENGINE_LOG"] = str(_ENGINE_LOG)
        _ENGINE_LOG.write_text("")
    # 1 GiB of KV cache per CPU engine (23k SmolLM2 tokens; spec's default is 2): the tests' sequences
    # are short, and the suite's peak (two shared engines in this process beside spec eval's three) came
    # to 19.8 of 23 GiB with 2; CI's one OOM kill (exit 137) was in that stretch.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def pytest_collection_modifyitems(session, config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    root = Path(__file__).parent
    items.sort(key=lambda item: rank.get(Path(item.path).relative_to(root).as_posix(), len(rank)))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
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
def in_process_env() -> dict[str, str]:
    """Environment for a `spec` command whose vLLM engines start in its own process (8 s a start, not
    35-50 s): the variable that asks for it as a user would, without the marker spec_datagen.runtime leaves
    when it set the variable itself, and OpenMP on this process's cores."""
    env = {k: v for k, v in os.environ.items() if k != "SPEC_SET_VLLM_MULTIPROCESSING"}
    return env | {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": str(len(os.sched_getaffinity(0)))}


@pytest.fixture(scope="session")
def tool_module():
    """tool_module("exp_scaling") -> tools/exp_scaling.py imported as a module (tools/ is no package)."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The real SmolLM2-135M-Instruct target as an HF directory (built once, cached)."""
    from spec_datagen.demo_model import demo_model_dir

    return demo_model_dir()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model("llama" | "qwen3" | "qwen3_moe") -> a tiny random target directory, built once."""
    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = tiny_model_dir(arch, root / arch)
        return built[arch]

    return get


# ---------------------------------------------------------------------------------------------
# Tiny random targets (8 layers, hidden 64, the demo tokenizer) for fast tests.

TINY_ARCHS = ("llama", "qwen3", "qwen3_moe")


def _tiny_config(arch: str, vocab_size: int, bos: int, eos: int) -> dict:
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        # vLLM's CPU attention kernels take head sizes of 32 and up (16 fails at the first forward).
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    if arch == "llama":
        return {**common, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    if arch == "qwen3":
        return {**common, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}
    if arch == "qwen3_moe":
        return {
            **common,
            "model_type": "qwen3_moe",
            "architectures": ["Qwen3MoeForCausalLM"],
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "decoder_sparse_step": 1,
            "norm_topk_prob": True,
            "mlp_only_layers": [],
        }
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {TINY_ARCHS}")


def tiny_model_dir(
    arch: str, out: str | os.PathLike, seed: int = 0, cache_dir: str | os.PathLike | None = None
) -> Path:
    """A tiny random `arch` target (8 layers, hidden 64) with the demo model's tokenizer, in fp32."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from spec_datagen.demo_model import demo_model_dir

    out = Path(out)
    if (out / ".complete").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(demo_model_dir(cache_dir))
    cfg_dict = _tiny_config(arch, len(tok), tok.bos_token_id, tok.eos_token_id)
    model_type = cfg_dict.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **cfg_dict)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / ".complete").write_text("{}\n")
    return out


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
