#!/usr/bin/env bash
# A local Debian bookworm + Python 3.11 base image, for machines that cannot pull python:3.11-slim
# from Docker Hub. debootstrap fetches Debian's packages; buildah commits the tree as an image.
#   container/build-base-image.sh [IMAGE]      (default localhost/blip-serve-base:bookworm)
set -euo pipefail
image=${1:-localhost/blip-serve-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}

rootfs=$(mktemp -d /var/tmp/blip-rootfs.XXXXXX)
trap 'rm -rf "$rootfs" "$rootfs.tar"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror"
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
tar -C "$rootfs" -cf "$rootfs.tar" .

container=$(buildah from scratch)
buildah add "$container" "$rootfs.tar" /
buildah config --env LANG=C.UTF-8 --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd /bin/bash "$container"
buildah commit --rm "$container" "$image"
echo "built $image"
