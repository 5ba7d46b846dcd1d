#!/usr/bin/env bash
# Container smoke test: build the hermetic image, run it with podman (no network beyond the host's
# loopback), get a caption, check it runs as a non-root user, report size and times.
#   container/smoke.sh                  (tiny random model unless MODEL_DIR is given)
# Needs root, buildah, podman, runc, debootstrap (Debian packages) and this repo's venv.
set -euo pipefail
cd "$(dirname "$0")/.."
source container/smoke-env.sh
tag=localhost/blip-serve:smoke
podman=(podman --runtime runc --cgroup-manager cgroupfs)

start=$(seconds)
podman image exists "$base" || container/build-base-image.sh "$base"
base_done=$(seconds)
container/build-offline.sh "$tag"
build_done=$(seconds)

port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
name=blip-serve-smoke-$$
"${podman[@]}" run -d --rm --name "$name" --network host "$tag" serve --host 127.0.0.1 --port "$port" >/dev/null
trap '"${podman[@]}" stop -t 5 "$name" >/dev/null 2>&1 || true' EXIT
run_start=$(seconds)
for _ in $(seq 180); do
    curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && break
    sleep 1
done
ready=$(seconds)
python -c 'from tools.sample_images import scene, encode; open("build/smoke.jpg","wb").write(encode(scene(1)))'
answer=$(curl -fsS -F file=@build/smoke.jpg "http://127.0.0.1:$port/caption")
echo "caption: $answer"
echo "$answer" | grep -q '"caption"'
user=$("${podman[@]}" exec "$name" id -un)
uid=$("${podman[@]}" exec "$name" id -u)
[ "$uid" != 0 ] || { echo "the container runs as root" >&2; exit 1; }
# No network at all: the weights are in the image, so it must still become ready.
offline=blip-serve-offline-$$
"${podman[@]}" run -d --rm --name "$offline" --network none "$tag" >/dev/null
trap '"${podman[@]}" stop -t 5 "$name" "$offline" >/dev/null 2>&1 || true' EXIT
probe='import urllib.request; urllib.request.urlopen("http://127.0.0.1:3000/readyz", timeout=2)'
for _ in $(seq 180); do
    "${podman[@]}" exec "$offline" python -c "$probe" 2>/dev/null && break
    sleep 1
done
"${podman[@]}" exec "$offline" python -c "$probe"
echo "ready with --network none: yes"
size=$("${podman[@]}" image inspect --format '{{.Size}}' "$tag")
echo "container user: $user (uid $uid)"
echo "image size: $((size / 1024 / 1024)) MB"
echo "base image build: $((base_done - start)) s; bento + image build: $((build_done - base_done)) s; start to ready: $((ready - run_start)) s"
echo "container smoke: OK"
