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
            "pytest-xdist",  # the workspace's addopts ask for it (-n)
        ],
        check=True,
        env=env,
    )
    return venv


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_format_tests_pass_without_torch(format_only_venv):
    out = subprocess.run(
        [
            str(format_only_venv / "bin" / "python"),
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-n",
            "0",
            str(ROOT / "packages" / "spec-format" / "tests"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout


PACKAGES = ["spec-format", "spec-datagen", "spec-models", "spec-train", "spec-convert"]


@pytest.mark.parametrize("package", PACKAGES)
def test_wheel_holds_every_package_file_and_command(package, tmp_path):
    """A built wheel ships every file of the package's source tree (data files such as spec-train's
    resources/ too) and registers the package's `spec` subcommands."""
    import tomllib
    import zipfile

    proc = subprocess.run([str(UV), "build", "-q", "--wheel", "--package", package, "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    src = ROOT / "packages" / package / "src"
    expected = {
        str(p.relative_to(src))
        for p in src.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc")
    }
    assert expected <= set(names), sorted(expected - set(names))
    commands = tomllib.loads((src.parent / "pyproject.toml").read_text())["project"]
    commands = commands.get("entry-points", {}).get("spec.commands", {})
    entry_points = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points[0]).decode() if entry_points else ""
    for name, target in commands.items():
        assert f"{name} = {target}" in text, (name, text)
