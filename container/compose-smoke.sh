#!/usr/bin/env bash
# Compose smoke test: docker-compose.yml run for real with podman-compose. Two bento replicas behind
# nginx on a free port, health checks healthy, a caption through nginx, then one replica's server
# killed as a crash would: requests keep being answered by the other, and the restart policy
# brings the killed one back. Reports image sizes and times.
#   container/compose-smoke.sh        (tiny random model unless MODEL_DIR is given)
# Needs root, buildah, podman, podman-compose, runc, debootstrap, the CNI dnsname plugin (Debian
# packages) and this repo's venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PREREQUISITES=compose source container/smoke-env.sh
nginx_image=localhost/blip-serve-nginx:bookworm
export BLIP_IMAGE=localhost/blip-serve:compose
start=$(seconds)
podman image exists "$base" || container/build-base-image.sh "$base"
podman image exists "$nginx_image" || buildah bud --isolation chroot -f container/nginx.Containerfile -t "$nginx_image" container
images_done=$(seconds)
# REUSE_IMAGE=1 keeps an image built by an earlier run (when only the compose files changed).
[ "${REUSE_IMAGE:-0}" = 1 ] && podman image exists "$BLIP_IMAGE" || container/build-offline.sh "$BLIP_IMAGE"
build_done=$(seconds)

export BLIP_HTTP_PORT
BLIP_HTTP_PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
project=blipsmoke$$
compose=(podman-compose -p "$project" -f docker-compose.yml -f container/compose.local.yml)
trap '"${compose[@]}" down -t 5 >/dev/null 2>&1 || true; podman network rm -f "${project}_default" >/dev/null 2>&1 || true' EXIT
up_start=$(seconds)
"${compose[@]}" up -d >/dev/null
bentos=("${project}_bento_1" "${project}_bento_2")

# podman runs health checks from systemd timers; with no systemd, run each check here, as the
# engine's timer would, until it reports healthy.
healthy() {
    for _ in $(seq 180); do
        podman healthcheck run "$1" >/dev/null 2>&1 && break
        sleep 1
    done
    podman inspect --format '{{.State.Health.Status}}' "$1"
}
for c in "${bentos[@]}" "${project}_nginx_1"; do
    status=$(healthy "$c")
    echo "$c: $status"
    [ "$status" = healthy ]
done
ready=$(seconds)

python -c 'from tools.sample_images import scene, encode; open("build/smoke.jpg","wb").write(encode(scene(1)))'
url="http://127.0.0.1:$BLIP_HTTP_PORT/caption"
answer=$(curl -fsS -F file=@build/smoke.jpg "$url")
echo "caption through nginx: $answer"
echo "$answer" | grep -q '"caption"'
for _ in $(seq 10); do curl -fsS -o /dev/null -F file=@build/smoke.jpg "$url"; done
upstreams=$(podman logs "${project}_nginx_1" 2>&1 | grep -o 'upstream=[0-9.]*:3000' | sort -u | wc -l)
echo "bento replicas that answered through nginx: $upstreams"
[ "$upstreams" = 2 ]
first_start=$(podman inspect --format '{{.State.StartedAt}}' "${bentos[0]}")

# A crash, not a stop: kill the replica's server process from the host (a `podman stop` or
# `podman kill` counts as the user's and is not restarted under "unless-stopped").
kill -9 "$(podman inspect --format '{{.State.Pid}}' "${bentos[0]}")"
killed=$(seconds)
ok=0
for i in $(seq 20); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -F file=@build/smoke.jpg "$url")
    [ "$code" = 200 ] && ok=$((ok + 1))
done
echo "requests through nginx after the kill: $ok/20 answered 200"
[ "$ok" = 20 ]
for _ in $(seq 120); do
    now_start=$(podman inspect --format '{{.State.StartedAt}}' "${bentos[0]}")
    [ "$now_start" != "$first_start" ] && [ "$(podman inspect --format '{{.State.Running}}' "${bentos[0]}")" = true ] && break
    sleep 1
done
[ "$now_start" != "$first_start" ] || { echo "the killed replica was not restarted" >&2; exit 1; }
status=$(healthy "${bentos[0]}")
echo "killed replica restarted by its restart policy, now $status ($(($(seconds) - killed)) s after the kill)"
[ "$status" = healthy ]
podman_logs=$(podman logs "${project}_nginx_1" 2>&1 | grep -c ' 200 ' || true)
echo "nginx logged $podman_logs answers with status 200"
size=$(podman image inspect --format '{{.Size}}' "$BLIP_IMAGE")
nginx_size=$(podman image inspect --format '{{.Size}}' "$nginx_image")
echo "images: bento $((size / 1024 / 1024)) MB, nginx $((nginx_size / 1024 / 1024)) MB"
echo "base + nginx images: $((images_done - start)) s (built once); bento + image build: $((build_done - images_done)) s; compose up to healthy: $((ready - up_start)) s"
echo "compose smoke: OK"
