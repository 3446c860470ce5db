#!/usr/bin/env bash
# Run HERE (not on the GPU machine): put the wheels that scripts/gpu_check.sh needs and the GPU machine
# lacks into .whl/ (git-ignored), for the device tool's `carry`. The GPU machine has torch,
# transformers, timm, peft, accelerate and triton; DeepSpeed (built from the pip cache, pure Python,
# its ops JIT-compiled there) and Hydra (the config schema) travel. About 25 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PY=${PY:-.venv/bin/python}
ver() { grep -i "^$1==" requirements/lock.txt | cut -d= -f3; }
# pure Python (some only as source): built here into py3-none-any wheels
for pkg in deepspeed hydra-core omegaconf antlr4-python3-runtime hjson py-cpuinfo einops pydantic annotated-types \
           typing-inspection; do
    "$PY" -m pip wheel -q --no-deps -w .whl "$pkg==$(ver "$pkg")"
done
# compiled: the GPU machine's Python 3.12 builds
for pkg in ninja msgpack pydantic-core; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d .whl "$pkg==$(ver "$pkg")"
done
du -sh .whl
