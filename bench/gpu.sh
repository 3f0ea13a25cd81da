#!/usr/bin/env bash
# Issue 10 on a GPU: the batched GPT step at 1, 4, 16 and 32 sequences, then 1, 4, 16 and 32 concurrent
# streaming clients through the real server, each without and with CUDA graphs (TTS_CUDA_GRAPHS).
# UNTESTED: written on a machine without a GPU. Usage: bench/gpu.sh [MODEL_DIR] (default: the benchmark's
# full-size random model, built if missing). Prints the tables; about 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
MODEL=${1:-.cache/bench-models/full}
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible')"
[ -f "$MODEL/model.pth" ] || $PY -c "from bench.common import ensure_model; ensure_model()"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
for graphs in "" --cuda-graphs; do
  echo "== batched GPT step, ${graphs:-no CUDA graphs}"
  $PY -m bench.batching_bench "$MODEL" --device cuda --threads 4 --batches 1,4,16,32 --steps 60 $graphs
done
for graphs in false true; do
  echo "== HTTP streaming clients, TTS_CUDA_GRAPHS=$graphs"
  $PY -m bench.memory --clients 1,4,16,32 --requests 0 --env TTS_DEVICE=cuda --env TTS_CUDA_GRAPHS=$graphs \
    --env TTS_MAX_BATCH=32 --env TTS_MAX_QUEUE=64 --env TTS_TORCH_THREADS=4
done
