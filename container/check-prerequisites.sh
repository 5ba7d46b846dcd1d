#!/usr/bin/env bash
# Before a container build or smoke test: is every tool there? Names what is missing and the Debian
# packages that provide it, then exits 1; prints nothing and exits 0 when all is there.
#   container/check-prerequisites.sh [compose]
# Sourced by container/smoke-env.sh (smoke.sh) and run with "compose" by compose-smoke.sh.
missing=()
need() {  # need COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 || missing+=("$1 (apt-get install $2)")
}
need buildah buildah
need podman podman
need runc runc   # podman's default runtime may be crun, which fails here: these scripts pin runc
need debootstrap debootstrap
need curl curl
if [ "${1:-}" = compose ]; then
    need podman-compose podman-compose
    # Compose services find each other by name through the CNI dnsname plugin, looked for where
    # Debian and podman put CNI plugins (CNI_PLUGIN_DIRS: other folders, space-separated).
    dnsname=0
    for dir in ${CNI_PLUGIN_DIRS:-/usr/lib/cni /usr/libexec/cni /opt/cni/bin}; do
        [ -x "$dir/dnsname" ] && dnsname=1
    done
    [ "$dnsname" = 1 ] || missing+=("the CNI dnsname plugin (apt-get install golang-github-containernetworking-plugin-dnsname)")
fi
if [ "$(id -u)" != 0 ]; then
    missing+=("root: buildah's chroot isolation and podman's runc need it here (run with sudo)")
fi
if [ "${#missing[@]}" -gt 0 ]; then
    echo "missing prerequisites:" >&2
    printf '  %s\n' "${missing[@]}" >&2
    exit 1
fi
