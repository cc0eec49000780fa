#!/usr/bin/env bash
# Bring a fresh Debian machine (CI) or a dev box up to what `make test|lint|demo|bench` need:
# the network tools the netns tests and benchmarks drive, and the project venv.
# Idempotent and quick when nothing is missing, so every make target can depend on it.
set -euo pipefail
cd "$(dirname "$0")/.."

# iproute2/iptables/nftables: namespaces, veths, TPROXY capture; iperf3/wrk: benchmarks;
# tshark: packet proofs; procps/psmisc: ps/pkill/fuser used when debugging stuck namespaces;
# python3-venv: `python3 -m venv` needs ensurepip, which Debian ships separately.
# python3-bpfcc + linux-headers-amd64: the node agent compiles its eBPF programs with bcc at
# run time; bpftool: inspecting pinned maps and programs when debugging capture.
# containernetworking-plugins: the real ptp/host-local CNI plugins the dev cluster's pods use.
# gcc/libc6-dev/make: the static CNI host binary (agent/cni/shim); ruby/shellcheck: checking the
# Vagrant cluster's Vagrantfile and provisioning scripts (they cannot run here: no hypervisor).
# clang/libclang-rt-dev: the C shim's fuzz target (fuzz/cni_shim.c: libFuzzer and the
# sanitizer runtimes ship in libclang-rt-dev, which clang only recommends).
# chromium: the headless browser tests/browser drives against `ambit dashboard`.
# podman/runc/debootstrap: make images and tests/images (runc: crun refuses hosts with cgroup v1
# beside a cgroup2 holding a controller; debootstrap: the Debian base when none can be pulled).
PACKAGES=(iproute2 iptables nftables iperf3 wrk tshark procps psmisc python3 python3-venv
          python3-bpfcc linux-headers-amd64 bpftool containernetworking-plugins
          gcc libc6-dev make ruby shellcheck clang libclang-rt-dev chromium
          podman runc debootstrap)
# nodejs/npm: the dashboard's graph library and the browser tests' driver come from npm
# (pinned lock files, `npm ci` below). Only when no npm is on the PATH: a machine may have
# Node.js from elsewhere (NodeSource ships npm inside its nodejs, which Debian's npm conflicts
# with).
if ! command -v npm >/dev/null 2>&1; then PACKAGES+=(nodejs npm); fi

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

# bcc needs the running kernel's headers at /lib/modules/$(uname -r)/{build,source}. Debian's
# headers are for Debian kernels; when the running kernel is another build (a cloud or
# micro-VM kernel), point those links at the newest installed Debian headers: the programs use
# only stable UAPI headers and the kernel's BTF, so a 6.x header set is enough.
ensure_kernel_headers() {
    local mod="/lib/modules/$(uname -r)"
    [[ -e "$mod/build/include" ]] && return 0
    local build common
    build="$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1 || true)"
    common="${build%-amd64}-common"
    if [[ -z "$build" || ! -d "$common" ]]; then
        echo "setup: warning: no Debian kernel headers under /usr/src; eBPF capture will fall" \
             "back to iptables" >&2
        return 0
    fi
    echo "setup: linking $mod/{build,source} to $build (running kernel $(uname -r))"
    mkdir -p "$mod"
    ln -sfn "$build" "$mod/build"
    ln -sfn "$common" "$mod/source"
}
if [[ $EUID -eq 0 ]]; then ensure_kernel_headers; fi

# Reinstall the venv only when pyproject.toml or the lock changed: the stamp holds the hash it
# was built from (a hash, not an mtime, because git checkouts touch mtimes without changing
# content). Every package comes from requirements/lock.txt, pinned with its hashes (pip refuses
# any other file), so two machines or two weeks install the same code; the project itself is
# then installed editable without resolving anything (--no-deps), with the locked build backend
# (--no-build-isolation). A lock that disagrees with pyproject.toml stops here, saying how to
# regenerate it (hack/lock.py; make lint checks the same).
STAMP=.stamp-venv
want="$(cat pyproject.toml requirements/lock.txt | sha256sum | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [[ ! -x .venv/bin/python || "$want" != "$have" ]]; then
    echo "setup: installing requirements/lock.txt and the project into .venv"
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    .venv/bin/python -m pip install -q --require-hashes -r requirements/lock.txt
    .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
    .venv/bin/python hack/lock.py check
    echo "$want" >"$STAMP"
fi

# bcc's Python module comes from Debian (python3-bpfcc): expose just that package to the venv,
# not the whole of dist-packages.
site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [[ -d /usr/lib/python3/dist-packages/bcc && ! -e "$site/bcc" ]]; then
    ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
fi

# npm packages, exactly as locked: cytoscape (served by `ambit dashboard`: the page loads
# nothing from a CDN) and playwright-core (tests/browser drives Debian's chromium with it).
# Reinstalled only when a lock file changed, like the venv.
for dir in ambit/dashboard/web tests/browser; do
    stamp=".stamp-npm-${dir//\//-}"
    want="$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)"
    if [[ ! -d "$dir/node_modules" || "$want" != "$(cat "$stamp" 2>/dev/null || true)" ]]; then
        echo "setup: npm ci in $dir"
        (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
        echo "$want" >"$stamp"
    fi
done
