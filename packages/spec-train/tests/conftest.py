"""Fixtures of spec-train's tests: datasets captured with transformers from real and tiny targets.

Capture ids follow vLLM's convention (spec_format.fingerprint.LAYER_CONVENTION): id k < L is
transformers' hidden_states[k]; id L is the last decoder layer's output before the final norm, taken
with a forward hook (transformers' hidden_states[L] is after the norm).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[3]


def capture_hidden(model, ids: np.ndarray, layer_ids: list[int]) -> np.ndarray:
    """float32 [T, len(layer_ids), H] for one sequence (simulate.target_states: vLLM's capture ids)."""
    from spec_train.simulate import target_states

    return target_states(model, [int(t) for t in ids])[layer_ids].transpose(0, 1).float().numpy()


def write_dataset(
    model_dir, rows, out, layer_ids=None, dtype="fp32", samples_per_shard=256, compression=None
):
    """Capture `rows` [(token_ids, loss_mask), ...] from the target in model_dir into a dataset at `out`."""
    import torch
    from transformers import AutoModelForCausalLM

    from spec_format.dataset import DatasetWriter
    from spec_format.fingerprint import default_eagle3_layers, fingerprint_model_dir

    info = fingerprint_model_dir(model_dir)
    layer_ids = layer_ids or default_eagle3_layers(info.num_hidden_layers)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with DatasetWriter(out, target=info, layer_ids=layer_ids, hidden_size=info.hidden_size, dtype=dtype,
                       compression=compression, samples_per_shard=samples_per_shard) as w:  # fmt: skip
        for i, (ids, mask) in enumerate(rows):
            w.add(source_index=i, token_ids=np.asarray(ids, np.int32), loss_mask=np.asarray(mask, bool),
                  hidden=capture_hidden(model, ids, layer_ids))  # fmt: skip
    return Path(out)


def random_rows(n: int, seed: int = 0, lo: int = 24, hi: int = 96, vocab: int = 300) -> list:
    """n token sequences with learnable structure (short repeated phrases over a small vocabulary) and a
    loss mask that leaves a prompt of 20-40% unsupervised."""
    rng = np.random.default_rng(seed)
    phrases = [rng.integers(10, vocab, rng.integers(3, 7)) for _ in range(12)]
    rows = []
    for _ in range(n):
        T = int(rng.integers(lo, hi))
        ids = np.concatenate([phrases[i] for i in rng.integers(0, len(phrases), T)])[:T]
        mask = np.arange(T) >= int(T * rng.uniform(0.2, 0.4))
        rows.append((ids.astype(np.int32), mask))
    return rows


@pytest.fixture(scope="session")
def tiny_dataset(tiny_model, tmp_path_factory):
    """tiny_dataset(arch="llama", n=32, **kw) -> a dataset captured from tiny_model(arch) (built once per args)."""
    built: dict = {}

    def get(arch: str = "llama", n: int = 32, seed: int = 0, **kw) -> Path:
        key = (arch, n, seed, tuple(sorted(kw.items())))
        if key not in built:
            out = tmp_path_factory.mktemp(f"ds-{arch}") / "ds"
            built[key] = write_dataset(tiny_model(arch), random_rows(n, seed), out, **kw)
        return built[key]

    return get


@pytest.fixture(scope="session")
def ds(tiny_dataset) -> Path:
    """24 samples captured from the tiny Llama: the trainer tests' dataset."""
    return tiny_dataset("llama", n=24)


@pytest.fixture(scope="session")
def verifier(tiny_model) -> Path:
    """The tiny Llama those samples were captured from."""
    return tiny_model("llama")


def _run_train(args: list[str], env: dict | None = None, timeout: int = 600, check: bool = True):
    """`python -m spec_train ARGS` in a subprocess (as torchrun would start it)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "spec_train", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"spec_train failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


# The shared trained draft's prompts (not the evaluation prompts of spec_train/resources/chat_eval.jsonl).
TOPICS = ["the water cycle", "honey bees", "volcanoes", "the moon", "bread", "rainbows", "bicycles",
          "the ocean", "owls", "libraries", "trains", "snow"]  # fmt: skip
TRAIN_PROMPTS = [f"Explain {t} in simple terms." for t in TOPICS]
TRAIN_PROMPTS += [f"Give me three facts about {t}." for t in TOPICS]


class Trained(msgspec.Struct):
    run: str
    dataset: str


@pytest.fixture(scope="session")
def trained(demo_model, vllm_engine, tmp_path_factory) -> Trained:
    """An EAGLE-3 draft for SmolLM2 trained on its own greedy replies (48 steps, 4096-token vocabulary): the
    real thing, shared by test_e2e.py and test_doctor.py. Needs the shared plain target engine."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    tok = AutoTokenizer.from_pretrained(demo_model)
    chats = [[{"role": "user", "content": p}] for p in TRAIN_PROMPTS]
    outs = vllm_engine("plain", demo_model).chat(
        chats, SamplingParams(temperature=0, max_tokens=160), use_tqdm=False
    )
    rows = []
    for chat, o in zip(chats, outs):
        prompt = list(
            tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
        )
        reply = list(o.outputs[0].token_ids)
        rows.append((np.array(prompt + reply), np.arange(len(prompt) + len(reply)) >= len(prompt)))
    tmp = tmp_path_factory.mktemp("e2e")
    ds = write_dataset(demo_model, rows, tmp / "ds", dtype="bf16")
    run = tmp / "run"
    _run_train([str(ds), "--verifier", str(demo_model), "--out", str(run), "--max-steps", "48", "--save-every", "16",
                "--batch-tokens", "1024", "--val-fraction", "0.15", "--draft-vocab-size", "4096",
                "--save-dtype", "float32", "--no-progress"], timeout=1500)  # fmt: skip
    return Trained(str(run), str(ds))


@pytest.fixture(scope="session")
def run_train():
    """run_train(args, env=None, check=True) -> CompletedProcess of `python -m spec_train ARGS`."""
    return _run_train


@pytest.fixture(scope="session")
def capture_dataset():
    """capture_dataset(model_dir, rows, out, layer_ids=None, dtype="fp32", ...) -> dataset path."""
    return write_dataset


@pytest.fixture(scope="session")
def make_rows():
    """make_rows(n, seed=0, ...) -> [(token_ids, loss_mask), ...] with learnable structure."""
    return random_rows


def plotted_series(png) -> list[int]:
    """Which of matplotlib's default colours (C0, C1, ...) a chart draws with: the indices whose hue (within
    6 degrees; lines drawn with alpha keep their hue) covers at least 150 saturated pixels, which a curve or
    a bar does and a legend entry alone does not."""
    import colorsys

    import matplotlib.colors
    import matplotlib.image
    import matplotlib.pyplot as plt

    rgb = matplotlib.image.imread(str(png))[..., :3].reshape(-1, 3)
    colours, counts = np.unique(rgb, axis=0, return_counts=True)
    hsv = np.array([colorsys.rgb_to_hsv(*c) for c in colours])
    out = []
    for i, c in enumerate(plt.rcParams["axes.prop_cycle"].by_key()["color"][:6]):
        hue = colorsys.rgb_to_hsv(*matplotlib.colors.to_rgb(c))[0]
        d = abs(hsv[:, 0] - hue)
        near = (np.minimum(d, 1 - d) < 6 / 360) & (hsv[:, 1] > 0.25)
        if counts[near].sum() >= 150:
            out.append(i)
    return out


@pytest.fixture(scope="session")
def series():
    """series(png) -> indices of the default colours a chart draws with (conftest.plotted_series)."""
    return plotted_series
