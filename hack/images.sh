#!/usr/bin/env bash
# Build Ambit's images (make images): one per component, from the Containerfile's stages.
#
#   hack/images.sh [COMPONENT...]     (default: ztunnel agent controller waypoint)
#
#   IMAGE_PREFIX   name prefix (default localhost/ambit-): localhost/ambit-ztunnel:0.1.0, ...
#   TAG            tag (default the version in pyproject.toml)
#   DEBIAN_IMAGE   the base (default: docker.io/library/debian:bookworm-slim when it is present
#                  or can be pulled, else one bootstrapped here by hack/debian-base.sh)
#
# How it keeps the machine as it was:
# - podman runs with containers/containers.conf (CONTAINERS_CONF): containers get no network
#   unless asked for, and the build asks for the host's (--network host), so podman never
#   creates a network, a bridge or a firewall rule.
# - the host's package-index settings (apt sources, apt.conf.d, trusted keys) and CA bundle are
#   copied to a temporary directory and mounted read-only at /run/ambit-host in the build's RUN
#   steps (podman build --volume): apt and pip reach what the host reaches, and none of it is in
#   a layer (tests/images checks).
# - layers are cached (podman's --layers), so an unchanged rebuild takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

ALL=(ztunnel agent controller waypoint)
components=("$@")
((${#components[@]})) || components=("${ALL[@]}")
for c in "${components[@]}"; do
    [[ " ${ALL[*]} " == *" $c "* ]] || { echo "images: unknown component $c (${ALL[*]})" >&2; exit 2; }
done
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n1)"
prefix="${IMAGE_PREFIX:-localhost/ambit-}"
tag="${TAG:-$version}"
export CONTAINERS_CONF="$PWD/containers/containers.conf"

command -v podman >/dev/null || { echo "images: podman is missing: run hack/setup.sh" >&2; exit 1; }

# Every pinned Debian version must still be offered by the host's mirrors (Debian replaces
# versions with security updates): say which is gone and what is there now, before building.
stale=()
while IFS='=' read -r name pinned; do
    [[ -z "$name" || "$name" == \#* ]] && continue
    offered="$(apt-cache madison "$name" 2>/dev/null | awk -F' *\\| *' '{print $2}')"
    if ! grep -qxF -- "$pinned" <<<"$offered"; then
        stale+=("$name=$pinned (offered: $(echo "$offered" | tr '\n' ' ' | sed 's/ *$//'))")
    fi
done <containers/debian-packages.txt
if ((${#stale[@]})); then
    printf 'images: pinned Debian version no longer in the archive: %s\n' "${stale[@]}" >&2
    echo "images: update containers/debian-packages.txt (apt-get update; apt-cache policy NAME)," \
         "then rebuild and run tests/images" >&2
    exit 1
fi

# The base: the official image when we have it or can pull it, else our own bootstrap.
base="${DEBIAN_IMAGE:-}"
if [[ -z "$base" ]]; then
    official=docker.io/library/debian:bookworm-slim
    if podman image exists "$official"; then
        base="$official"
    elif ! podman image exists localhost/ambit-debian:bookworm-slim \
            && timeout 60 podman pull -q "$official" >/dev/null 2>&1; then
        base="$official"
    else
        hack/debian-base.sh localhost/ambit-debian:bookworm-slim
        base=localhost/ambit-debian:bookworm-slim
    fi
fi

host="$(mktemp -d /tmp/ambit-host.XXXXXX)"
trap 'rm -rf "$host"' EXIT
mkdir -p "$host/apt/sources.list.d" "$host/apt/apt.conf.d" "$host/apt/trusted.gpg.d"
if [[ -f /etc/apt/sources.list ]]; then cp /etc/apt/sources.list "$host/apt/"; else : >"$host/apt/sources.list"; fi
for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -f "$f" ]] && cp "$f" "$host/apt/sources.list.d/"
done
for f in /etc/apt/apt.conf.d/* /etc/apt/trusted.gpg.d/*; do
    [[ -f "$f" ]] && cp "$f" "$host/apt/${f#/etc/apt/}"
done
cp -L /etc/ssl/certs/ca-certificates.crt "$host/ca-certificates.crt"
chmod -R a+rX "$host"

for c in "${components[@]}"; do
    image="$prefix$c:$tag"
    echo "images: building $image (from $base)"
    start=$SECONDS
    podman build --runtime runc --network host --layers \
        --ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" \
        --volume "$host:/run/ambit-host:ro" \
        --build-arg DEBIAN_IMAGE="$base" \
        --target "$c" -t "$image" -f Containerfile . >"$host/build-$c.log" 2>&1 || {
        tail -n 40 "$host/build-$c.log" >&2
        echo "images: building $image failed (the last lines of its log are above)" >&2
        exit 1
    }
    # Every program and library still finds its libraries after the trim (containers/check-libs).
    podman run --rm --network none --read-only --ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" \
        --ulimit nproc=4096:4096 -v "$PWD/containers/check-libs:/check-libs:ro" \
        --entrypoint /bin/sh "$image" /check-libs >/dev/null || {
        echo "images: $image has programs or libraries missing a library (above)" >&2; exit 1; }
    size="$(podman image inspect --format '{{.Size}}' "$image")"
    echo "images: $image $((size / 1000000)) MB in $((SECONDS - start)) s"
done
