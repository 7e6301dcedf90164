#!/usr/bin/env bash
# Optional extra: vLLM's suffix decoding (`method: "suffix"`) as a `spec eval` baseline, on this CPU stack.
#
# vLLM imports `arctic_inference.suffix_decoding.SuffixDecodingCache`. PyPI has only arctic-inference
# 0.1.1's source, whose full build wants torch 2.7 and CUDA; its suffix-tree module alone is plain C++
# (nanobind). This builds that module with cmake + nanobind and copies `arctic_inference/__init__.py` and
# `arctic_inference/suffix_decoding/` (no dist-info, so none of its vLLM plugin entry points) into the
# environment's site-packages. Needs cmake, ninja or make, and a C++20 compiler.
#
#     tools/install_suffix_decoding.sh [PYTHON]     # default: .venv/bin/python
#
# Undo: rm -r "$(PYTHON -c 'import arctic_inference, os; print(os.path.dirname(arctic_inference.__file__))')"
set -euo pipefail
PYTHON=${1:-.venv/bin/python}
SITE=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# The sdist's metadata step imports torch: give pip the environment's packages to find it.
PYTHONPATH="$SITE" python3 -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
    arctic-inference==0.1.1 -d "$WORK"
tar xzf "$WORK"/arctic_inference-0.1.1.tar.gz -C "$WORK"
python3 -m pip install -q --target "$WORK/nb" nanobind==2.9.2
SRC="$WORK/arctic_inference-0.1.1"
PYTHONPATH="$WORK/nb" cmake -S "$SRC/csrc/suffix_decoding" -B "$WORK/build" \
    -DPython_EXECUTABLE="$(command -v "$PYTHON")" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$WORK/build" -j 2 >/dev/null

DEST="$SITE/arctic_inference"
mkdir -p "$DEST/suffix_decoding"
cp "$SRC/arctic_inference/__init__.py" "$DEST/"
cp "$SRC/arctic_inference/suffix_decoding/__init__.py" "$SRC/arctic_inference/suffix_decoding/cache.py" \
    "$WORK"/build/_C*.so "$DEST/suffix_decoding/"
"$PYTHON" -c 'from arctic_inference.suffix_decoding import SuffixDecodingCache; SuffixDecodingCache(24, 10)'
echo "installed arctic_inference.suffix_decoding into $DEST"
