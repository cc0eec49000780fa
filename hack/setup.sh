#!/usr/bin/env bash
# Bring a fresh Debian machine (CI) or a dev box up to what `make test|lint|demo|bench` need:
# the network tools the netns tests and benchmarks drive, and the project venv.
# Idempotent and quick when nothing is missing, so every make target can depend on it.
set -euo pipefail
cd "$(dirname "$0")/.."

# iproute2/iptables/nftables: namespaces, veths, TPROXY capture; iperf3/wrk: benchmarks;
# tshark: packet proofs; procps/psmisc: ps/pkill/fuser used when debugging stuck namespaces;
# python3-venv: `python3 -m venv` needs ensurepip, which Debian ships separately.
PACKAGES=(iproute2 iptables nftables iperf3 wrk tshark procps psmisc python3 python3-venv)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    sudo=()
    if [[ $EUID -ne 0 ]]; then sudo=(sudo); fi
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Reinstall the venv only when pyproject.toml changed: the stamp holds the hash it was built from
# (a hash, not an mtime, because git checkouts touch mtimes without changing content).
STAMP=.stamp-venv
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [[ ! -x .venv/bin/python || "$want" != "$have" ]]; then
    echo "setup: installing the project into .venv"
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    .venv/bin/python -m pip install -q -e '.[dev,bench]'
    echo "$want" >"$STAMP"
fi
