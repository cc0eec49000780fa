"""Network-namespace primitives for the netns tests, the demo and the benchmarks.

Why it exists: Ambit's capture path (TPROXY, policy routing, veths between pods and their node)
can only be tested against the real kernel. Network namespaces give each test a private
"cluster" that is never connected to the machine's own namespace, so a test cannot disturb the
host and the host's firewall or routes cannot disturb a test. This module is the small set of
operations the topology needs, each one failing with the command and the kernel's message, plus
a cleanup registry so that everything created is removed even when a test fails halfway.

Everything is done with ``ip -n NS ...`` and ``ip netns exec NS ...`` subprocesses rather than
by entering namespaces in-process (pyroute2's ``NetNS`` or ``setns``): each call names its
namespace explicitly, this process never changes namespace (so no thread can be left in the
wrong one, and nothing can accidentally be configured in the root namespace), and an error reads
exactly as it would for a person typing the command.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

IP = "ip"
# `ip netns add` stores namespaces here; a name becomes a file name, so keep it to a safe set.
_NETNS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# IFNAMSIZ is 16 including the NUL; '/', ':' and whitespace are rejected by the kernel or `ip`.
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_SYSCTL_KEY = re.compile(r"^[A-Za-z0-9_.\-/]+$")


class NetnsError(RuntimeError):
    """A namespace operation failed; the message holds the command and its error output."""


def check_netns_name(name: str) -> str:
    """Return ``name`` if it is a usable namespace name, else raise ``ValueError``."""
    if not _NETNS_NAME.match(name):
        raise ValueError(
            f"network namespace name {name!r} must be 1-64 characters of letters, digits, "
            "'_', '.', '-' and start with a letter or digit"
        )
    return name


def check_ifname(name: str) -> str:
    """Return ``name`` if it is a valid Linux interface name, else raise ``ValueError``."""
    if not _IFNAME.match(name):
        raise ValueError(
            f"interface name {name!r} must be 1-15 characters of letters, digits, '_', '.', '-'"
        )
    return name


def require_root() -> None:
    """Fail early and clearly: every operation here needs CAP_SYS_ADMIN and CAP_NET_ADMIN."""
    if os.geteuid() != 0:
        raise NetnsError("network namespaces need root (CAP_SYS_ADMIN, CAP_NET_ADMIN); run as root")


def run(argv: Sequence[str], *, input: str | None = None, timeout: float = 30.0) -> str:
    """Run a command to completion and return its stdout; raise ``NetnsError`` if it fails."""
    try:
        res = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise NetnsError(f"{argv[0]}: command not found (run `make setup`)") from None
    except subprocess.TimeoutExpired:
        raise NetnsError(f"`{' '.join(argv)}` did not finish within {timeout:g}s") from None
    if res.returncode != 0:
        detail = (res.stderr or res.stdout).strip() or f"exit status {res.returncode}"
        raise NetnsError(f"`{' '.join(argv)}` failed: {detail}")
    return res.stdout


def ns_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs ``argv`` inside namespace ``ns``."""
    return [IP, "netns", "exec", check_netns_name(ns), *argv]


def ns_run(ns: str, argv: Sequence[str], *, input: str | None = None, timeout: float = 30.0) -> str:
    """Run ``argv`` inside ``ns`` to completion; return stdout or raise ``NetnsError``."""
    return run(ns_argv(ns, argv), input=input, timeout=timeout)


def ns_spawn(
    ns: str,
    argv: Sequence[str],
    *,
    stdout: int | IO[Any] | None = subprocess.DEVNULL,
    stderr: int | IO[Any] | None = subprocess.STDOUT,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` inside ``ns`` and return at once.

    `ip netns exec` execs the command in place, so the returned pid is the program itself. It
    gets its own session (process group) so ``stop_process`` also reaches anything it forks.
    """
    return subprocess.Popen(
        ns_argv(ns, argv),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        start_new_session=True,
    )


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> int | None:
    """SIGTERM the process group of ``proc``, SIGKILL it if it lingers; return the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
    return proc.returncode


# --- namespaces --------------------------------------------------------------------------


def list_netns() -> list[str]:
    """Names of the named network namespaces (those `ip netns add` created)."""
    # Lines look like "name (id: 3)" or just "name".
    return [line.split()[0] for line in run([IP, "netns", "list"]).splitlines() if line.strip()]


def netns_exists(name: str) -> bool:
    return check_netns_name(name) in list_netns()


def netns_pids(name: str) -> list[int]:
    """Pids of processes whose network namespace is ``name``."""
    return [int(p) for p in run([IP, "netns", "pids", check_netns_name(name)]).split()]


def create_netns(name: str) -> None:
    """Create namespace ``name`` with its loopback up (many daemons assume 127.0.0.1 works)."""
    run([IP, "netns", "add", check_netns_name(name)])
    link_up(name, "lo")


def delete_netns(name: str) -> None:
    """Kill what still runs in ``name`` and delete it; a missing namespace is not an error.

    Only namespaces this tooling created are passed here, so every process inside was started
    by us (a test, the demo or a benchmark).
    """
    if not netns_exists(name):
        return
    for pid in netns_pids(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # Deleting the namespace also deletes its veths (and so their peers in other namespaces).
    run([IP, "netns", "del", name])


# --- links, addresses, routes, sysctls -----------------------------------------------------


def link_up(ns: str, ifname: str) -> None:
    run([IP, "-n", check_netns_name(ns), "link", "set", check_ifname(ifname), "up"])


def add_veth(ns_a: str, if_a: str, ns_b: str, if_b: str, *, up: bool = True) -> None:
    """Create a veth pair with ``if_a`` in ``ns_a`` and ``if_b`` in ``ns_b``.

    The pair is created inside ``ns_a`` and its peer placed straight into ``ns_b``, so neither
    end ever exists in the root namespace, not even for a moment.
    """
    run(
        [IP, "-n", check_netns_name(ns_a), "link", "add", check_ifname(if_a), "type", "veth",
         "peer", "name", check_ifname(if_b), "netns", check_netns_name(ns_b)]
    )  # fmt: skip
    if up:
        link_up(ns_a, if_a)
        link_up(ns_b, if_b)


def add_bridge(ns: str, name: str) -> None:
    run([IP, "-n", check_netns_name(ns), "link", "add", check_ifname(name), "type", "bridge"])
    link_up(ns, name)


def set_master(ns: str, ifname: str, bridge: str) -> None:
    run(
        [IP, "-n", check_netns_name(ns), "link", "set", check_ifname(ifname),
         "master", check_ifname(bridge)]
    )  # fmt: skip


def add_address(ns: str, ifname: str, cidr: str) -> None:
    """Add ``cidr`` (e.g. ``10.0.0.1/24``) to ``ifname`` inside ``ns``."""
    run([IP, "-n", check_netns_name(ns), "addr", "add", cidr, "dev", check_ifname(ifname)])


def add_route(
    ns: str,
    dst: str,
    *,
    via: str | None = None,
    dev: str | None = None,
    src: str | None = None,
    table: int | None = None,
    route_type: str | None = None,
    scope: str | None = None,
) -> None:
    """Add (or replace) a route inside ``ns``; ``route_type`` is e.g. ``local`` for TPROXY."""
    argv = [IP, "-n", check_netns_name(ns), "route", "replace"]
    if route_type:
        argv.append(route_type)
    argv.append(dst)
    if via:
        argv += ["via", via]
    if dev:
        argv += ["dev", check_ifname(dev)]
    if src:
        argv += ["src", src]
    if scope:
        argv += ["scope", scope]
    if table is not None:
        argv += ["table", str(table)]
    run(argv)


def ip(ns: str, args: Sequence[str]) -> str:
    """Run ``ip -n NS ARGS...`` (for the less common commands, e.g. ``rule add``)."""
    return run([IP, "-n", check_netns_name(ns), *args])


def set_sysctl(ns: str, key: str, value: str | int) -> None:
    """Set a sysctl inside ``ns``: ``net.*`` keys are per-namespace, so the host is unaffected."""
    if not _SYSCTL_KEY.match(key) or not key.startswith("net."):
        raise ValueError(f"sysctl {key!r}: only net.* keys are namespaced; refusing to set it")
    ns_run(ns, ["sysctl", "-q", "-w", f"{key}={value}"])


def get_sysctl(ns: str, key: str) -> str:
    return ns_run(ns, ["sysctl", "-n", key]).strip()


# --- cleanup -------------------------------------------------------------------------------


class CleanupError(NetnsError):
    """One or more cleanup steps failed (all steps are still attempted)."""


class Cleanup:
    """A LIFO registry of undo steps: namespaces to delete, processes to stop, files to remove.

    Used as a context manager, it runs every step on exit, even after a failure, and keeps
    going when one step fails so that one stuck process cannot leak the namespaces behind it.
    """

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], object]]] = []

    def callback(self, what: str, fn: Callable[[], object]) -> None:
        self._steps.append((what, fn))

    def netns(self, name: str) -> None:
        self.callback(f"delete netns {name}", lambda: delete_netns(name))

    def process(self, proc: subprocess.Popen[Any]) -> None:
        self.callback(f"stop pid {proc.pid}", lambda: stop_process(proc))

    def close(self) -> None:
        errors: list[str] = []
        while self._steps:
            what, fn = self._steps.pop()
            try:
                fn()
            except Exception as e:  # keep undoing the rest; report everything at the end
                errors.append(f"{what}: {e}")
        if errors:
            raise CleanupError("cleanup failed: " + "; ".join(errors))

    def __enter__(self) -> Cleanup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- names and stale namespaces ------------------------------------------------------------

DEFAULT_TAG = "amb"


def netns_prefix(tag: str = DEFAULT_TAG) -> str:
    """``<tag>-<pid>-``: the pid lets a later run tell a crashed run's leftovers from live ones."""
    return f"{tag}-{os.getpid()}-"


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (exited, not yet reaped) does not count."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def stale_netns(tag: str = DEFAULT_TAG, names: Sequence[str] | None = None) -> list[str]:
    """Namespaces named ``<tag>-<pid>-...`` whose creating process no longer exists."""
    pattern = re.compile(rf"^{re.escape(tag)}-(\d+)-")
    out = []
    for name in list_netns() if names is None else names:
        m = pattern.match(name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            out.append(name)
    return out


def remove_stale_netns(tag: str = DEFAULT_TAG) -> list[str]:
    """Delete namespaces left behind by crashed runs (see ``stale_netns``); return their names."""
    removed = []
    for name in stale_netns(tag):
        delete_netns(name)
        removed.append(name)
    return removed


@contextlib.contextmanager
def netns(name: str) -> Iterator[str]:
    """A namespace that exists for the duration of a ``with`` block."""
    create_netns(name)
    try:
        yield name
    finally:
        delete_netns(name)
