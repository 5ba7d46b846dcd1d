#!/usr/bin/env bash
# GPU benchmark: one prepared command for a machine with an NVIDIA GPU (under 10 minutes).
#
#   bash load_test/gpu_benchmark.sh [OUT_DIR]
#
# Needs requirements-bench.txt installed (torch's PyPI wheel for Linux is the CUDA build). Makes a
# full-size random BLIP (the base architecture: same compute as the real one), then, all through
# HTTP on this machine, 20 tokens per caption:
#   main     640x480 JPEGs: the in-process ceiling (fp16, batch 1 and 64), blip-serve (fp16, batches
#            up to 64, API workers = cores - 2), BLIP on LitServe (batches of 64, fp32 as its docs
#            write it) and the per-request baseline (FastAPI + gunicorn, fp32, 4 workers);
#   phone    12 MP (4032x3024) JPEGs into blip-serve, exact decode and BLIP_JPEG_DRAFT=1;
#   compile  blip-serve with BLIP_COMPILE=1 (static KV cache, decode step as CUDA graphs).
# Each part has its own time limit, so a slow one cannot starve the others; each writes
# OUT_DIR/<part>.json (+ main.csv and main.png) as soon as it ends, and everything printed goes
# to OUT_DIR/log.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-results/gpu}}
work=${BLIP_BENCH_WORK:-/tmp/blip-gpu-benchmark}
model=${BLIP_BENCH_MODEL:-/tmp/blip-base-random}
python=${PYTHON:-python3}
api_workers=${BLIP_BENCH_API_WORKERS:-$(($(nproc) - 2))}
mkdir -p "$out" "$work"
exec > >(tee -a "$out/log.txt") 2>&1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "cores: $(nproc), API workers: $api_workers, python: $($python -c 'import sys, torch; print(sys.version.split()[0], torch.__version__)')"
[ -f "$model/config.json" ] || $python -m blip_serve.tiny_model "$model" --full

gpu="BLIP_PRECISION=fp16 BLIP_MAX_BATCH_SIZE=64 BLIP_MAX_QUEUED_IMAGES=1024 BLIP_API_WORKERS=$api_workers"
part() {  # part NAME SECONDS ARGS...: one `python -m load_test compare`, cut off after SECONDS
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T))"
    timeout --kill-after=10 "$limit" $python -m load_test compare --model "$model" --tokens 20 --out "$work/$name" "$@" \
        || echo "== $name ended with status $?"
    cp "$work/$name/results.json" "$out/$name.json" 2>/dev/null || echo "== $name: no results"
    for log in "$work/$name"/*.log; do
        grep -q "Traceback" "$log" 2>/dev/null && { echo "== $log (end)"; tail -n 30 "$log"; }
    done
}

part main 280 --ceiling --servers blip-serve litserve baseline --baseline-workers 4 \
    --concurrency 8 32 64 128 --requests 512 --warmup 128 --bento-env $gpu
cp "$work/main/results.csv" "$work/main/results.png" "$out/" 2>/dev/null && mv "$out/results.csv" "$out/main.csv" \
    && mv "$out/results.png" "$out/main.png"
part phone 60 --servers blip-serve --image-size 4032x3024 --concurrency 128 --requests 256 --warmup 32 --bento-env $gpu
part phone-draft 60 --servers blip-serve --image-size 4032x3024 --concurrency 128 --requests 256 --warmup 32 \
    --bento-env $gpu BLIP_JPEG_DRAFT=1
part compile 150 --servers blip-serve --concurrency 8 64 128 --requests 512 --warmup 128 --bento-env $gpu BLIP_COMPILE=1
echo "== done ($(date +%T))"
