#!/usr/bin/env bash
# Refresh every lock from requirements/*.in, for CPython 3.11 on Linux x86_64 (glibc 2.28+):
#   bash requirements/lock.sh
# Needs uv (pip install uv). Each lock pins every package with the hashes of its files; pip
# installs it in hash-checking mode, so nothing else can enter an install.
#   requirements.txt        the server, CPU build of torch (quick start, CPU image, CI)
#   requirements-gpu.txt    the server, CUDA build of torch from PyPI (the GPU image)
#   requirements-bench.txt  the server and load_test/
#   requirements-bench-gpu.txt  the same with the CUDA build (load_test/gpu_benchmark.sh)
#   requirements-test.txt   the server, load_test/ and the test suite
#   requirements-client.txt what `pip install .` (blip_serve/client/) needs: httpx and tqdm
# The bench and test locks are resolved within the server's lock: the tests run the same versions
# the server installs.
# torch's CPU build is not on PyPI: pip and uv find it on PyTorch's own page, named in the CPU locks.
# TORCH_CPU_WHEELS=DIR resolves it from a folder holding that same wheel instead (a host that
# cannot reach PyTorch's page); the lock records the file's hash either way.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_cpu_page=https://download.pytorch.org/whl/cpu/torch/
compile() {  # OUT INPUT... [OPTION...]
    local out=$1
    shift
    uv pip compile --quiet --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
        --custom-compile-command "bash requirements/lock.sh" --no-emit-find-links --no-strip-extras "$@" -o "$out"
}
compile_cpu() {
    compile "$@" --find-links "${TORCH_CPU_WHEELS:-$torch_cpu_page}" requirements/cpu.in
}
# pip and uv read PyTorch's page from the CPU locks themselves: one line after uv's header.
name_torch_page() {
    sed -i "0,/^[a-z]/s|^\([a-z]\)|--find-links $torch_cpu_page\n\n\1|" "$@"
}
# A package that some dependency asks for with an extra (litserve: uvicorn[standard]) is locked
# with that extra, and again bare with the same hashes. pip checks each separately:
# with the extra stripped, it took the newest uvicorn for litserve's `uvicorn[standard]>=0.29`, which
# failed its hash check on the day a newer uvicorn came out; with the extra alone, bentoml's bare
# `uvicorn>=0.22` was unpinned.
pin_bare_too() {
    python3 - "$@" <<'PY'
import re, sys

for path in sys.argv[1:]:
    text = open(path).read()
    pin = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\[[^\]]*\](==\S+ \\\n(?:    --hash=\S+.*\n)+)", re.M)
    open(path, "w").write(pin.sub(lambda m: m[1] + m[2] + m[0], text))
PY
}
compile_cpu requirements.txt requirements/server.in
compile requirements-gpu.txt requirements/gpu.in
compile_cpu requirements-bench.txt requirements/bench.in --constraint requirements.txt
compile_cpu requirements-test.txt requirements/test.in --constraint requirements.txt
compile requirements-client.txt requirements/client.in --constraint requirements.txt
compile requirements-bench-gpu.txt requirements/bench.in requirements/gpu.in --constraint requirements-gpu.txt
name_torch_page requirements.txt requirements-bench.txt requirements-test.txt
pin_bare_too requirements*.txt
echo "locked: $(grep -c '^[a-z].*==' requirements.txt) packages in requirements.txt, $(grep -c '^[a-z].*==' requirements-gpu.txt) in requirements-gpu.txt"
