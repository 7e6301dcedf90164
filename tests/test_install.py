"""spec-format installs alone (no torch, no vLLM) and its tests pass there; `spec --help` works there."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UV = Path(sys.executable).parent / "uv"


@pytest.fixture(scope="module")
def format_only_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("format-only") / "venv"
    env = {**os.environ, "VIRTUAL_ENV": str(venv)}
    env.pop("UV_PROJECT_ENVIRONMENT", None)
    subprocess.run([str(UV), "venv", "-q", "--python", sys.executable, str(venv)], check=True, env=env)
    subprocess.run(
        [
            str(UV),
            "pip",
            "install",
            "-q",
            "--python",
            str(venv / "bin" / "python"),
            str(ROOT / "packages" / "spec-format"),
            "pytest",
            "pytest-timeout",
        ],
        check=True,
        env=env,
    )
    return venv


def test_format_installs_without_torch(format_only_venv):
    py = str(format_only_venv / "bin" / "python")
    out = subprocess.run(
        [py, "-c", "import importlib.util as u; print(u.find_spec('torch'), u.find_spec('vllm'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "None None"
    help_out = subprocess.run(
        [str(format_only_venv / "bin" / "spec"), "--help"], capture_output=True, text=True
    )
    assert help_out.returncode == 0, help_out.stderr
    assert "validate" in help_out.stdout and "inspect" in help_out.stdout
    assert "datagen" not in help_out.stdout and "demo-model" not in help_out.stdout


def test_format_tests_pass_without_torch(format_only_venv):
    out = subprocess.run(
        [
            str(format_only_venv / "bin" / "python"),
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(ROOT / "packages" / "spec-format" / "tests"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout
