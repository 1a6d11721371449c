#!/usr/bin/env bash
# Run HERE (the CPU machine), once per checkout, before bench/gpu_session.sh goes to a device.
# The H200 image (Python 3.12, torch, triton, transformers, safetensors, rich, pyyaml) lacks
# pydantic; this downloads it and its needs as Python 3.12 wheels into .whl/ (git-ignored via
# .git/info/exclude) for the device run to carry. nvidia-cutlass-dsl is left out on purpose: its
# libs wheel (~92 MB) is larger than the 64 MiB a device call may carry, so the session runs the
# Triton kernels and skips the CUTLASS path (bench/kernels.py --no-cutlass).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
py=${PYTHON:-python3}
ver() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "pydantic==$(ver pydantic)" "pydantic-core==$(ver pydantic-core)" \
    "annotated-types==$(ver annotated-types)" "typing-inspection==$(ver typing-inspection)"
ls -l .whl
