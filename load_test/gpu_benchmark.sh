#!/usr/bin/env bash
# GPU benchmark: one prepared command for a machine with an NVIDIA GPU, within BLIP_BENCH_SECONDS
# (default 540: a part that would not fit in what is left is skipped and says so).
#
#   bash load_test/gpu_benchmark.sh [OUT_DIR]
#
# Needs requirements-bench-gpu.txt installed (the bench lock with torch's CUDA build and
# torchvision, for BLIP_GPU_DECODE). Makes a full-size random BLIP (the base architecture: same
# compute as the real one); 20 tokens per caption, fp16, batches up to 64, 640x480 JPEGs unless
# said. In order of what matters most, each part with its own time limit:
#   compile-gpudecode   served, BLIP_COMPILE=1 BLIP_GPU_DECODE=1, concurrency 128 and 256
#   ceiling-compiled    in-process, the same configuration (JPEGs decoded on the GPU), batch 64
#   eager               served, plain fp16, with the in-process eager ceiling (batch 1 and 64)
#   eager-gpudecode     served, BLIP_GPU_DECODE=1
#   baseline            the per-request design (FastAPI + gunicorn, fp32, 4 workers), concurrency 128
#   compile             served, BLIP_COMPILE=1, decoded by the API
#   phone-gpudecode     12 MP (4032x3024) JPEGs, BLIP_COMPILE=1 BLIP_GPU_DECODE=1, concurrency 128
# Each part writes OUT_DIR/<part>.json as soon as it ends; everything printed goes to OUT_DIR/log.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-results/gpu}}
work=${BLIP_BENCH_WORK:-/tmp/blip-gpu-benchmark}
model=${BLIP_BENCH_MODEL:-/tmp/blip-base-random}
python=${PYTHON:-python3}
api_workers=${BLIP_BENCH_API_WORKERS:-$(($(nproc) - 2))}
deadline=$(($(date +%s) + ${BLIP_BENCH_SECONDS:-540}))
mkdir -p "$out" "$work"
exec > >(tee -a "$out/log.txt") 2>&1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "cores: $(nproc), API workers: $api_workers, python: $($python -c 'import sys, torch; print(sys.version.split()[0], torch.__version__)')"
$python -c "import torchvision" 2>/dev/null && gpu_decode=1 || { gpu_decode=0; echo "no torchvision: the BLIP_GPU_DECODE parts are skipped"; }
[ -f "$model/config.json" ] || $python -m tools.tiny_model "$model" --full

gpu="BLIP_PRECISION=fp16 BLIP_MAX_BATCH_SIZE=64 BLIP_MAX_QUEUED_IMAGES=2048 BLIP_API_WORKERS=$api_workers"
fits() {  # fits NAME SECONDS: is there time left for this part?
    if [ $(($(date +%s) + $2)) -gt "$deadline" ]; then
        echo "== $1 skipped: needs ${2} s, $((deadline - $(date +%s))) s left"
        return 1
    fi
}
part() {  # part NAME SECONDS ARGS...: one `python -m load_test compare`, cut off after SECONDS
    local name=$1 limit=$2
    shift 2
    fits "$name" "$limit" || return 0
    echo "== $name ($(date +%T))"
    timeout --kill-after=10 "$limit" $python -m load_test compare --model "$model" --tokens 20 --out "$work/$name" "$@" \
        || echo "== $name ended with status $?"
    cp "$work/$name/results.json" "$out/$name.json" 2>/dev/null || echo "== $name: no results"
    for log in "$work/$name"/*.log; do
        grep -q "Traceback" "$log" 2>/dev/null && { echo "== $log (end)"; tail -n 30 "$log"; }
    done
}
served="--servers blip-serve --concurrency 128 256 --requests 2048 --warmup 256"

[ $gpu_decode = 1 ] && part compile-gpudecode 130 $served --bento-env $gpu BLIP_COMPILE=1 BLIP_GPU_DECODE=1
if [ $gpu_decode = 1 ] && fits ceiling-compiled 100; then
    echo "== ceiling-compiled ($(date +%T))"
    env $gpu BLIP_COMPILE=1 BLIP_GPU_DECODE=1 timeout --kill-after=10 100 $python -m load_test.ceiling \
        --model "$model" --tokens 20 --batch-size 64 --repeats 4 --json "$out/ceiling-compiled.jsonl" \
        || echo "== ceiling-compiled ended with status $?"
fi
# BLIP_COMPILE=auto compiles in fp16: the eager parts say off.
part eager 100 --ceiling $served --bento-env $gpu BLIP_COMPILE=off
[ $gpu_decode = 1 ] && part eager-gpudecode 60 $served --bento-env $gpu BLIP_COMPILE=off BLIP_GPU_DECODE=1
part baseline 50 --servers baseline --baseline-workers 4 --concurrency 128 --requests 384 --warmup 64
part compile 110 $served --bento-env $gpu BLIP_COMPILE=1
[ $gpu_decode = 1 ] && part phone-gpudecode 90 --servers blip-serve --image-size 4032x3024 --concurrency 128 \
    --requests 512 --warmup 64 --bento-env $gpu BLIP_COMPILE=1 BLIP_GPU_DECODE=1
echo "== done ($(date +%T))"
