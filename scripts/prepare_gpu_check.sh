#!/usr/bin/env bash
# Prepare, on a machine that renders the simulator and reaches the package registry, what scripts/gpu_benchmark.sh
# needs on a GPU machine that has neither:
#   .gpu/frames.npz   the closed-loop simulator frames every method sees (the harness replays them with --frames);
#   .whl/             this project's transformers pin as a wheel, for a GPU image that ships another version.
# Both folders are git-ignored; carry them to the GPU machine with the checkout, then run there:
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   PYTHON=python3 bash scripts/gpu_benchmark.sh
#
#   scripts/prepare_gpu_check.sh                   # PYTHON=... to choose the interpreter (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MUJOCO_GL="${MUJOCO_GL:-egl}"

mkdir -p .gpu .whl
"$PY" benchmarks/deployment_latency.py --steps 30 --warmup 3 --stride 1 --save-frames .gpu/frames.npz

pin="$(grep -E '^transformers==' requirements.txt)"
rm -f .whl/transformers-*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl "$pin"
ls -l .gpu/frames.npz .whl/*.whl
