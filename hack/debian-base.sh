#!/usr/bin/env bash
# Bootstrap a Debian bookworm base image locally, for machines that cannot pull
# docker.io/library/debian:bookworm-slim (no image registry is reachable from CI).
#
#   hack/debian-base.sh [IMAGE]        (default localhost/ambit-debian:bookworm-slim)
#
# debootstrap --variant=minbase from the host's own Debian mirror (the first URI of its
# bookworm sources), then slimmed the way debuerreotype slims debian:bookworm-slim: no
# documentation, man pages or translations (and a dpkg filter so later installs add none),
# apt configured to keep no caches or package lists, no logs. The result is imported with
# `podman import`; it is rebuilt only when this script changed (a label holds its hash) or
# with FORCE=1. Nothing of the host's configuration is left in it: its sources list names
# deb.debian.org, as the official image's does.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${1:-localhost/ambit-debian:bookworm-slim}"
SUITE=bookworm
script_hash="$(sha256sum hack/debian-base.sh | cut -c1-16)"

if [[ "${FORCE:-0}" != 1 ]] && podman image exists "$IMAGE"; then
    have="$(podman image inspect --format '{{index .Labels "dev.ambit.base.script"}}' "$IMAGE")"
    if [[ "$have" == "$script_hash" ]]; then
        echo "debian-base: $IMAGE is up to date"
        exit 0
    fi
fi
for tool in debootstrap podman; do
    command -v "$tool" >/dev/null || { echo "debian-base: $tool is missing: run hack/setup.sh" >&2; exit 1; }
done
[[ $EUID -eq 0 ]] || { echo "debian-base: debootstrap needs root" >&2; exit 1; }

# The host's mirror: it is the one this machine can reach (a proxy or a local mirror).
mirror="$(grep -hs -E '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list \
          | grep -v -- -security | head -n1 | awk '{print $2}' || true)"
if [[ "$mirror" == \[* ]]; then mirror=""; fi   # "deb [options] URI": fall back
mirror="${MIRROR:-${mirror:-http://deb.debian.org/debian}}"

root="$(mktemp -d /var/tmp/ambit-debian.XXXXXX)"
cleanup() { rm -rf --one-file-system "$root"; }
trap cleanup EXIT

echo "debian-base: debootstrap --variant=minbase $SUITE from $mirror"
debootstrap --variant=minbase --merged-usr "$SUITE" "$root" "$mirror" >"$root.log" 2>&1 || {
    tail -n 30 "$root.log" >&2; echo "debian-base: debootstrap failed (log: $root.log)" >&2; exit 1; }
rm -f "$root.log"

# As debian:bookworm-slim: dpkg never installs documentation or translations (copyright files
# stay: the licences must ship with the binaries).
cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$root"/usr/share/{man,groff,info,lintian,linda,locale}/*

# apt as in the official image: no package cache, no lists kept, no translations, no
# Suggests/Recommends kept installed by autoremove.
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
echo 'Acquire::Languages "none";' >"$root/etc/apt/apt.conf.d/docker-no-languages"
echo 'Acquire::GzipIndexes "true";' >"$root/etc/apt/apt.conf.d/docker-gzip-indexes"
printf 'Apt::AutoRemove::SuggestsImportant "false";\n' \
    >"$root/etc/apt/apt.conf.d/docker-autoremove-suggests"
# Services never start inside an image build.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"

# The image's own sources: the public mirror, whatever mirror built it.
rm -f "$root/etc/apt/sources.list"
cat >"$root/etc/apt/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF

# What a build leaves behind and an image never needs.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
       "$root"/var/lib/dpkg/*-old "$root"/tmp/* "$root"/var/tmp/* "$root"/root/.bash_history
find "$root/var/log" -type f -delete
: >"$root/etc/machine-id"
rm -f "$root/etc/hostname" "$root/etc/resolv.conf"

tar --numeric-owner --xattrs -C "$root" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    --change "LABEL dev.ambit.base.script=$script_hash" \
    - "$IMAGE" >/dev/null
echo "debian-base: imported $IMAGE ($(podman image inspect --format '{{.Size}}' "$IMAGE") bytes)"
