"""The component images, built and run: `make images` works, each image is within its size
budget, carries what its component runs and not what it does not, and starts.

Why a tier of its own: the Containerfile was once written and checked only by reading it
(tests/unit/test_containerfile.py); an image that does not build, or builds but cannot start
with a read-only root as its manifest's user, fails only on a cluster. Here every image is built
(podman's layer cache makes an unchanged rebuild take seconds) and smoke-run with
``--network none``: the containers have only their own loopback, so nothing touches the
machine's network (containers/containers.conf keeps podman from making a bridge or rules).

Never skipped: CI runs as root with podman and debootstrap installed by hack/setup.sh; a missing
tool is a failure naming it.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import ambit

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = ("ztunnel", "agent", "controller", "waypoint")
PREFIX = "localhost/ambit-"
TAG = ambit.__version__
# Megabytes (10^6 bytes, as podman reports them), uncompressed. The ztunnel and controller
# budgets are the issue's; the waypoint is Envoy (about 100 MB) plus the controller-sized
# Python; the agent's floor is bcc's LLVM and libclang (docs/install.md, "Images").
BUDGET_MB = {"ztunnel": 150, "controller": 150, "waypoint": 250, "agent": 460}
# The cold build (debootstrap, apt, PyPI) takes several minutes; a cached one seconds.
BUILD_TIMEOUT = 1800
RUN_TIMEOUT = 120

pytestmark = pytest.mark.timeout(BUILD_TIMEOUT + 300)


def image(component: str) -> str:
    return f"{PREFIX}{component}:{TAG}"


def _env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(ROOT / "containers" / "containers.conf")}


def podman(*args: str, timeout: float = RUN_TIMEOUT,
           input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], env=_env(), capture_output=True, text=True,
                          timeout=timeout, input=input, check=False)


def run(component: str, *args: str, entrypoint: str | None = None, user: str | None = None,
        opts: tuple[str, ...] = (), input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the component's image once: no network, read-only root, no capabilities unless
    ``opts`` adds some. The open-files limit is the host's own hard limit (podman's default is
    above what this kind of host lets it raise to: containers/containers.conf)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    cmd = ["run", "--rm", "-i", "--network", "none", "--read-only", "--cap-drop", "all",
           "--security-opt", "no-new-privileges", "--ulimit", f"nofile={nofile}:{nofile}",
           "--ulimit", "nproc=4096:4096", *opts]
    if entrypoint is not None:
        cmd += ["--entrypoint", entrypoint]
    if user is not None:
        cmd += ["--user", user]
    return podman(*cmd, image(component), *args, input=input)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\nstdout: {done.stdout}\n" \
        f"stderr: {done.stderr}"
    return done.stdout


@pytest.fixture(scope="module", autouse=True)
def built() -> Iterator[dict[str, float]]:
    """Build every image (hack/images.sh, what `make images` runs), once per module."""
    for tool in ("podman", "debootstrap"):
        assert shutil.which(tool), f"{tool} is not installed: hack/setup.sh installs it"
    assert os.geteuid() == 0, "the image tier needs root (podman and debootstrap)"
    start = time.monotonic()
    done = subprocess.run([str(ROOT / "hack" / "images.sh")], cwd=ROOT, capture_output=True,
                          text=True, timeout=BUILD_TIMEOUT, check=False)
    assert done.returncode == 0, f"hack/images.sh failed:\n{done.stdout}\n{done.stderr}"
    yield {"seconds": time.monotonic() - start}


def test_no_network_or_bridge_was_created() -> None:
    # The builds use the host's network and the runs none: podman made no network of its own.
    nets = ok(podman("network", "ls", "--format", "{{.Name}}")).split()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                           check=True).stdout
    assert "cni-podman" not in links and "podman0" not in links, links
    assert set(nets) <= {"podman"}, nets  # the built-in default, never used and never set up


@pytest.mark.parametrize("component", COMPONENTS)
def test_size_is_within_budget(component: str) -> None:
    size = int(ok(podman("image", "inspect", "--format", "{{.Size}}", image(component))))
    assert size <= BUDGET_MB[component] * 10**6, \
        f"{image(component)} is {size / 1e6:.1f} MB, budget {BUDGET_MB[component]} MB"


@pytest.mark.parametrize("component", COMPONENTS)
def test_version_and_help(component: str) -> None:
    user = None if component in ("ztunnel", "agent") else "65532:65532"
    assert ok(run(component, "--version", user=user)).strip() == f"ambit {TAG}"
    assert f"ambit {component}" in ok(run(component, user=user))  # the image's CMD: --help


@pytest.mark.parametrize(("component", "user"), [("ztunnel", ""), ("agent", ""),
                                                 ("controller", "65532:65532"),
                                                 ("waypoint", "65532:65532")])
def test_user(component: str, user: str) -> None:
    assert ok(podman("image", "inspect", "--format", "{{.Config.User}}",
                     image(component))).strip() == user


@pytest.mark.parametrize("component", COMPONENTS)
def test_every_library_resolves(component: str) -> None:
    # containers/check-libs: the trim removed no library that a program or module still needs.
    out = ok(run(component, "/check-libs", entrypoint="/bin/sh",
                 opts=("-v", f"{ROOT / 'containers' / 'check-libs'}:/check-libs:ro")))
    assert "every program and library resolves" in out


# What each image must not carry (paths, globs inside the image) and what it must.
_PROBE = """
import glob, json, sys
print(json.dumps({p: bool(glob.glob(p)) for p in sys.argv[1:]}))
"""
ABSENT = {
    "ztunnel": ["/usr/bin/gcc*", "/usr/bin/cc", "/usr/lib/gcc", "/usr/lib/llvm-*",
                "/usr/lib/python3/dist-packages/bcc", "/opt/ambit/venv/bin/envoy",
                "/opt/ambit/venv/lib/python3.11/site-packages/envoy",
                "/opt/ambit/venv/lib/python3.11/site-packages/kubernetes_asyncio"],
    "controller": ["/usr/bin/gcc*", "/usr/lib/gcc", "/usr/lib/llvm-*",
                   "/usr/lib/python3/dist-packages/bcc", "/opt/ambit/venv/bin/envoy",
                   "/opt/ambit/venv/lib/python3.11/site-packages/envoy/_bin"],
    "waypoint": ["/usr/bin/gcc*", "/usr/lib/gcc", "/usr/lib/llvm-*",
                 "/usr/lib/python3/dist-packages/bcc",
                 "/opt/ambit/venv/lib/python3.11/site-packages/kubernetes_asyncio"],
    # bcc compiles with libclang: no gcc, no kbuild, no binutils.
    "agent": ["/usr/bin/gcc*", "/usr/lib/gcc/x86_64-linux-gnu/*/cc1", "/usr/bin/ld",
              "/usr/lib/linux-kbuild-*", "/opt/ambit/venv/bin/envoy",
              "/opt/ambit/venv/lib/python3.11/site-packages/kubernetes_asyncio"],
}
# Never in any image: build helpers, pip and its caches, the host's apt settings.
ABSENT_EVERYWHERE = ["/usr/local/lib/ambit-build", "/root/.cache/pip", "/etc/apt",
                     "/opt/ambit/venv/bin/pip", "/opt/ambit/venv/lib/python3.11/site-packages/pip",
                     "/opt/ambit/venv/lib/python3.11/site-packages/setuptools",
                     "/run/ambit-host/*"]
PRESENT = {
    "ztunnel": [],
    "controller": ["/opt/ambit/deploy/daemonset/kustomization.yaml"],
    "waypoint": ["/opt/ambit/venv/bin/envoy"],
    "agent": ["/opt/ambit/cni/ambit-cni", "/usr/src/linux-headers-*-amd64/include",
              "/usr/src/linux-headers-*-common/include",
              "/opt/ambit/venv/lib/python3.11/site-packages/ebpf/*.c",
              "/opt/ambit/venv/lib/python3.11/site-packages/bcc", "/usr/sbin/iptables",
              "/usr/sbin/iptables-restore", "/usr/sbin/nft", "/usr/bin/ip",
              "/usr/bin/nsenter"],  # the inpod mode: iptables in each pod's namespace
}


@pytest.mark.parametrize("component", COMPONENTS)
def test_carries_what_it_runs_and_nothing_else(component: str) -> None:
    absent = ABSENT[component] + ABSENT_EVERYWHERE
    found = json.loads(ok(run(component, "-c", _PROBE, *absent, *PRESENT[component],
                              entrypoint="python3")))
    assert [p for p in absent if found[p]] == [], f"{component} carries what it must not"
    assert [p for p in PRESENT[component] if not found[p]] == [], f"{component} lacks"


def test_ztunnel_serves_ready_with_a_state_file(tmp_path: Path) -> None:
    (tmp_path / "state.yaml").write_text(
        "workloads:\n  - {name: echo, namespace: default, node: node-a, addresses: [10.0.0.5]}\n")
    tmp_path.chmod(0o755)
    # As its manifest runs it: root with only NET_ADMIN and NET_RAW, read-only root, /tmp a
    # scratch volume. Started, asked for readiness from inside its own network namespace, then
    # stopped with SIGTERM (a clean drain).
    script = """
ambit ztunnel --node node-a --state /state/state.yaml >/tmp/log 2>&1 & pid=$!
python3 - <<'EOF'
import time, urllib.request
for _ in range(100):
    try:
        r = urllib.request.urlopen("http://127.0.0.1:15021/healthz/ready", timeout=1)
        print("READY", r.status, r.read().decode().strip())
        break
    except OSError:
        time.sleep(0.1)
EOF
kill -TERM $pid; wait $pid; echo "EXIT $?"; cat /tmp/log
"""
    out = ok(run("ztunnel", "-c", script, entrypoint="/bin/sh",
                 opts=("--cap-add", "NET_ADMIN,NET_RAW", "--tmpfs", "/tmp",
                       "-v", f"{tmp_path}:/state:ro")))
    assert "READY 200 ready" in out, out
    assert "EXIT 0" in out, out


def test_controller_starts_on_an_empty_data_dir_as_its_user() -> None:
    # As deploy/daemonset/controller.yaml runs it: uid 65532, read-only root, no capabilities,
    # an empty scratch volume at /var/lib/ambit and at /tmp (embedded mode here: no API server).
    script = """
ambit controller --mode embedded --data-dir /var/lib/ambit --db /var/lib/ambit/registry.db \
    --listen-host 127.0.0.1 --monitoring-host 127.0.0.1 >/tmp/log 2>&1 & pid=$!
python3 - <<'EOF'
import time, urllib.request
for _ in range(300):
    try:
        r = urllib.request.urlopen("http://127.0.0.1:15014/ready", timeout=1)
        print("READY", r.status)
        break
    except OSError:
        time.sleep(0.1)
EOF
id -u; ls /var/lib/ambit
kill -TERM $pid; wait $pid; echo "EXIT $?"; cat /tmp/log
"""
    out = ok(run("controller", "-c", script, entrypoint="/bin/sh", user="65532:65532",
                 opts=("--tmpfs", "/var/lib/ambit:mode=1777", "--tmpfs", "/tmp:mode=1777")))
    assert "READY 200" in out, out
    assert re.search(r"^65532$", out, re.M), out
    assert "trust-bundle.pem" in out and "registry.db" in out, out
    assert "EXIT 0" in out, out


def test_waypoint_runs_envoy() -> None:
    out = ok(run("waypoint", "--version", entrypoint="envoy", user="65532:65532"))
    assert re.search(r"envoy\s+version: \S+/1\.\d+\.\d+/", out), out
    assert "ambit waypoint run" in ok(run("waypoint", "waypoint", "run", "--help",
                                          user="65532:65532"))


def test_the_static_cni_binary_answers_version() -> None:
    out = ok(run("agent", entrypoint="/opt/ambit/cni/ambit-cni",
                 opts=("-e", "CNI_COMMAND=VERSION"), input='{"cniVersion": "1.0.0"}'))
    answer = json.loads(out)
    assert answer["cniVersion"] == "1.0.0"
    assert {"0.3.1", "1.0.0"} <= set(answer["supportedVersions"])


def test_the_agent_has_bcc_and_its_tools() -> None:
    out = ok(run("agent", "-c", "import bcc, sys; print(bcc.__name__, sys.version_info[:2])",
                 entrypoint="python3"))
    assert out.strip() == "bcc (3, 11)"
    for tool in (["ip", "-V"], ["iptables", "--version"], ["nft", "--version"],
                 ["nsenter", "--version"]):
        ok(run("agent", *tool[1:], entrypoint=tool[0]))
    assert "ambit agent cni install" in ok(run("agent", "agent", "cni", "install", "--help"))


def test_a_rebuild_comes_from_the_cache(built: dict[str, float]) -> None:
    # A rebuild reuses every layer it can: with the same sources, all of them (the same image
    # IDs); with Ambit's code changed meanwhile (in a shared work tree others may edit it), at
    # least the base layer (Debian, Python, the agent's bcc: the slow part) is the same.
    def layers() -> dict[str, list[str]]:
        return {c: json.loads(ok(podman("image", "inspect", "--format",
                                        "{{json .RootFS.Layers}}", image(c))))
                for c in COMPONENTS}

    before = layers()
    start = time.monotonic()
    done = subprocess.run([str(ROOT / "hack" / "images.sh")], cwd=ROOT, capture_output=True,
                          text=True, timeout=BUILD_TIMEOUT, check=False)
    assert done.returncode == 0, done.stderr
    after = layers()
    for c in COMPONENTS:
        assert after[c][0] == before[c][0], f"{c}: the base layer was rebuilt"
    same = [c for c in COMPONENTS if after[c] == before[c]]
    print(f"first build {built['seconds']:.0f} s, rebuild {time.monotonic() - start:.0f} s, "
          f"identical: {same}")
