#!/usr/bin/env bash
# The main job on the embedded default: set up, then run `tasc-ray demo` (arguments are passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
tasc-ray demo "$@"
