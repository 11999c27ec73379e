#!/usr/bin/env bash
# Runs the test suite (unit tests with tiny models, integration tests with the real SmolLM2) and ruff.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
ruff format --check .
mypy  # the engine core (tasc_ray/engine, the CLI flags built from its configs); see [tool.mypy]
python -m pytest -q "$@"
