"""The pure parts of ambit.dev.netns: name checks, argv building, stale-namespace detection."""

from __future__ import annotations

import os

import pytest

from ambit.dev import netns


def test_stale_namespaces_are_those_of_dead_runs() -> None:
    names = [
        "amb-1-1-net",  # pid 1 (init) is alive
        "amb-999999999-1-n1",  # no such process
        f"amb-{os.getpid()}-1-n1",  # our own
        "ambench-999999999-1-n1",  # another tag
        "other",
    ]
    assert netns.stale_netns("amb", names) == ["amb-999999999-1-n1"]
    assert netns.stale_netns("ambench", names) == ["ambench-999999999-1-n1"]


def test_prefix_carries_the_pid() -> None:
    assert netns.netns_prefix("amb") == f"amb-{os.getpid()}-"


@pytest.mark.parametrize("name", ["", "a/b", "-x", "a b", "x" * 65])
def test_bad_netns_names(name: str) -> None:
    with pytest.raises(ValueError, match="network namespace name"):
        netns.check_netns_name(name)


@pytest.mark.parametrize("name", ["", "veth-much-too-long", "a:b", "a/b", "a b"])
def test_bad_interface_names(name: str) -> None:
    with pytest.raises(ValueError, match="interface name"):
        netns.check_ifname(name)


def test_ns_argv_runs_inside_the_namespace() -> None:
    assert netns.ns_argv("amb-1-n1", ["sysctl", "-a"]) == [
        "ip", "netns", "exec", "amb-1-n1", "sysctl", "-a",
    ]  # fmt: skip


def test_only_namespaced_sysctls_are_set() -> None:
    # kernel.* and vm.* are global: setting them "inside" a namespace would change the host.
    with pytest.raises(ValueError, match="only net"):
        netns.set_sysctl("amb-1-n1", "kernel.pid_max", 1)


def test_run_reports_the_command_and_its_error() -> None:
    with pytest.raises(netns.NetnsError, match=r"`sh -c echo nope >&2; exit 3` failed: nope"):
        netns.run(["sh", "-c", "echo nope >&2; exit 3"])
    with pytest.raises(netns.NetnsError, match="command not found"):
        netns.run(["/nonexistent/tool"])


def test_cleanup_runs_every_step_in_reverse_and_reports_failures() -> None:
    order: list[str] = []

    def fail() -> None:
        order.append("fail")
        raise OSError("stuck")

    c = netns.Cleanup()
    c.callback("first", lambda: order.append("first"))
    c.callback("broken", fail)
    c.callback("last", lambda: order.append("last"))
    with pytest.raises(netns.CleanupError, match="broken: stuck"):
        c.close()
    assert order == ["last", "fail", "first"]
    c.close()  # nothing left to do, no error
