"""The package layering of docs/architecture.md, enforced.

format <- datagen, format <- models, {format, models, datagen} <- train, format <- convert.
spec-format never imports torch, vLLM or transformers (serving images install it alone).
"""

import ast
import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["spec_format", "spec_datagen", "spec_models", "spec_train", "spec_convert"]
# Which of our packages each package may import.
ALLOWED = {
    "spec_format": set(),
    "spec_datagen": {"spec_format"},
    "spec_models": {"spec_format"},
    "spec_train": {"spec_format", "spec_models", "spec_datagen"},
    "spec_convert": {"spec_format"},
}
# Third-party imports each package must never make, anywhere in its source.
FORBIDDEN = {
    "spec_format": {"torch", "vllm", "transformers"},
    "spec_convert": {"vllm", "transformers"},
    "spec_models": {"vllm"},
}


def _source_dir(pkg: str) -> Path:
    return ROOT / "packages" / pkg.replace("_", "-") / "src" / pkg


def _imported_top_levels(pkg: str) -> dict[str, set[str]]:
    """{top-level module: {file:line, ...}} for every import statement in the package's source."""
    found: dict[str, set[str]] = {}
    for path in _source_dir(pkg).rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


@pytest.mark.parametrize("pkg", PACKAGES)
def test_imports_point_only_downward(pkg):
    imported = _imported_top_levels(pkg)
    ours = {m for m in imported if m in PACKAGES and m != pkg}
    upward = ours - ALLOWED[pkg]
    assert not upward, {m: sorted(imported[m]) for m in upward}
    bad = FORBIDDEN.get(pkg, set()) & set(imported)
    assert not bad, {m: sorted(imported[m]) for m in bad}


# Declared dependencies a package's source does not import, with the reason it still needs them.
NOT_IMPORTED = {
    "spec_datagen": {
        "gguf": "transformers reads the demo model's GGUF file with it",
        "accelerate": "transformers refuses to load a GGUF file without it (the demo model's conversion)",
    }
}


@pytest.mark.parametrize("pkg", PACKAGES)
def test_every_declared_dependency_is_imported(pkg):
    """A dependency nobody imports is dead weight in every install (optional extras are not checked)."""
    meta = tomllib.loads((_source_dir(pkg).parents[1] / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].replace("-", "_") for d in meta["dependencies"]}
    unused = declared - set(_imported_top_levels(pkg)) - set(NOT_IMPORTED.get(pkg, {}))
    assert not unused, f"{pkg} declares {sorted(unused)} in pyproject.toml but never imports them"


def _modules_after_import(pkg: str) -> set[str]:
    """Import the package and every submodule in a fresh interpreter; return what got loaded."""
    code = (
        "import importlib, json, pkgutil, sys\n"
        f"pkg = importlib.import_module({pkg!r})\n"
        "for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_spec_format_loads_without_torch_or_vllm():
    loaded = _modules_after_import("spec_format")
    assert not loaded & {"torch", "vllm", "transformers"}, sorted(loaded & {"torch", "vllm", "transformers"})


@pytest.mark.parametrize("pkg", PACKAGES)
def test_runtime_imports_stay_in_layer(pkg):
    """Importing a package (all submodules) loads none of the packages above it."""
    loaded = _modules_after_import(pkg)
    above = {p for p in PACKAGES if p != pkg and p not in ALLOWED[pkg]}
    assert not loaded & above, sorted(loaded & above)


def test_every_package_has_metadata_and_readme():
    for pkg in PACKAGES:
        d = ROOT / "packages" / pkg.replace("_", "-")
        assert (d / "pyproject.toml").is_file() and (d / "README.md").is_file(), d
        assert importlib.util.find_spec(pkg) is not None, pkg
