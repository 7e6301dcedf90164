#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has Python 3.12, torch and transformers, and no network), downloaded
# here into .gpu_wheels/ so that the device `run` carries them (carry [".gpu_wheels"], well under 64 MiB):
#   - msgspec, zstandard: spec-format's imports (numpy comes with torch);
#   - speculators 0.9.0 + hs-connectors (pure Python), pydantic with its pinned core, typing-extensions,
#     loguru, psutil: what `speculators.models.eagle3` and its verifier-weight loader import. Its data-pipeline imports (datasets, openai) are stubbed by
#     tools/gpu_check.py when absent, and the check records that.
# Usage: bash tools/gpu_wheels.sh   (then see docs/gpu.md for the run command)
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu_wheels
mkdir -p .gpu_wheels
# Versions pinned as in uv.lock where the workspace has them; pydantic-core must match pydantic.
python3 -m pip download -q -d .gpu_wheels --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    msgspec==0.22.0 zstandard==0.25.0 psutil==7.2.2 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions==4.16.0 loguru==0.7.3 speculators==0.9.0 hs-connectors==0.9.0
ls -la .gpu_wheels
du -sh .gpu_wheels
