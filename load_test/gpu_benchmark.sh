#!/usr/bin/env bash
# GPU benchmark: one prepared command for a machine with an NVIDIA GPU (a few minutes).
#
#   bash load_test/gpu_benchmark.sh [OUT_DIR]
#
# Needs requirements-bench.txt installed (torch's PyPI wheel for Linux is the CUDA build). Makes a
# full-size random BLIP (the base architecture: same compute as the real one), then, through HTTP
# on this machine: the in-process ceiling (fp16, batch 64), blip-serve at several concurrencies
# (fp16, batches up to 64, 8 API workers to decode and preprocess), and the per-request baseline
# (FastAPI + gunicorn, fp32 as such servers run, one generate per request). Prints the table and
# ratios; writes results.json/.csv/.png to OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-results/gpu}}
model=${BLIP_BENCH_MODEL:-/tmp/blip-base-random}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
[ -f "$model/config.json" ] || python -m blip_serve.tiny_model "$model" --full

python -m load_test compare --model "$model" --tokens 20 --ceiling \
    --concurrency 8 32 64 128 --requests 512 --warmup 128 --baseline-workers 4 \
    --bento-env BLIP_MAX_BATCH_SIZE=64 BLIP_MAX_LATENCY_MS=20000 BLIP_API_WORKERS=8 \
    --out "$out"
