"""spec-convert without torch or vLLM: safetensors sources convert; a .bin asks for the torch extra."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
UV = Path(sys.executable).parent / "uv"


@pytest.mark.e2e  # a fresh virtual environment
def test_converts_safetensors_without_torch(tmp_path, verifier, source_writers):
    venv = tmp_path / "venv"
    env = {**os.environ, "VIRTUAL_ENV": str(venv)}
    env.pop("UV_PROJECT_ENVIRONMENT", None)
    subprocess.run([str(UV), "venv", "-q", "--python", sys.executable, str(venv)], check=True, env=env)
    packages = [str(ROOT / "packages" / p) for p in ("spec-format", "spec-convert")]
    py = str(venv / "bin" / "python")
    subprocess.run([str(UV), "pip", "install", "-q", "--python", py, *packages], check=True, env=env)
    out = subprocess.run(
        [py, "-c", "import importlib.util as u; print(u.find_spec('torch'), u.find_spec('vllm'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "None None"

    spec = str(venv / "bin" / "spec")
    src = source_writers["specforge"](tmp_path / "sf", verifier)
    res = subprocess.run(
        [spec, "convert", src, "--verifier", verifier, "--out", tmp_path / "out"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()

    src = source_writers["eagle3"](tmp_path / "ea", verifier)
    res = subprocess.run(
        [spec, "convert", src, "--verifier", verifier, "--out", tmp_path / "out2"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1 and "pip install 'spec-convert[torch]'" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out2").exists()
