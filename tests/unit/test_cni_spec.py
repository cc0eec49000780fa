"""agent.cni.spec: parsing a CNI invocation, reading prevResult, and the answers ambit-cni gives."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.cni import spec
from agent.cni.spec import CniSpecError, Command, FailurePolicy

NETNS = "/var/run/netns/pod-a"

# What ptp 1.1.1 returns for cniVersion 1.0.0 (host veth first, no "sandbox" on it).
PTP_RESULT: dict[str, Any] = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "veth3c8e7a1f", "mac": "0e:7d:35:2b:6c:11"},
        {"name": "eth0", "mac": "5a:0b:1c:2d:3e:4f", "sandbox": NETNS},
    ],
    "ips": [{"interface": 1, "address": "10.244.1.2/24", "gateway": "10.244.1.1"}],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}],
    "dns": {},
}

# The bridge plugin lists the bridge, then the host veth, then the pod side.
BRIDGE_RESULT: dict[str, Any] = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cni0", "mac": "aa:aa:aa:aa:aa:01"},
        {"name": "veth0a1b2c3d", "mac": "aa:aa:aa:aa:aa:02"},
        {"name": "eth0", "mac": "aa:aa:aa:aa:aa:03", "sandbox": NETNS},
    ],
    "ips": [{"interface": 2, "address": "10.22.0.5/16", "gateway": "10.22.0.1"}],
}

# 0.4.0 results carry "version" on each IP.
V040_RESULT: dict[str, Any] = {
    "cniVersion": "0.4.0",
    "interfaces": [
        {"name": "vethabcdef01", "mac": "aa:aa:aa:aa:aa:04"},
        {"name": "eth0", "mac": "aa:aa:aa:aa:aa:05", "sandbox": NETNS},
    ],
    "ips": [{"version": "4", "interface": 1, "address": "10.244.2.7/24"}],
}

DUAL_STACK: dict[str, Any] = {
    "interfaces": [
        {"name": "vethdual0001", "sandbox": ""},
        {"name": "eth0", "sandbox": NETNS},
    ],
    "ips": [
        {"interface": 1, "address": "fd00::5/64"},
        {"interface": 1, "address": "10.244.1.9/24"},
        {"interface": 0, "address": "10.244.1.1/32"},  # on the host side: not the pod's
        {"interface": 1, "address": "10.244.1.9/24"},  # duplicates are dropped
    ],
}

IPAM_ONLY: dict[str, Any] = {"ips": [{"address": "10.244.3.4/24", "gateway": "10.244.3.1"}]}


def env(command: str = "ADD", **overrides: str | None) -> dict[str, str]:
    e: dict[str, str | None] = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "0123abcd",
        "CNI_NETNS": NETNS,
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web;K8S_POD_UID=u-1",
        "CNI_PATH": "/opt/cni/bin:/usr/lib/cni",
    }
    e.update(overrides)
    return {k: v for k, v in e.items() if v is not None}


def conf(**overrides: Any) -> str:
    c: dict[str, Any] = {
        "cniVersion": "1.0.0",
        "name": "ambit",
        "type": "ambit-cni",
        "prevResult": PTP_RESULT,
    }
    c.update(overrides)
    return json.dumps({k: v for k, v in c.items() if v is not None})


def error_of(env_: dict[str, str], stdin: str) -> CniSpecError:
    with pytest.raises(CniSpecError) as info:
        spec.parse_invocation(env_, stdin)
    return info.value


# --- good invocations ----------------------------------------------------------------------


def test_add_is_parsed_with_defaults() -> None:
    inv = spec.parse_invocation(env(), conf())
    assert inv.command is Command.ADD
    assert (inv.container_id, inv.netns, inv.ifname) == ("0123abcd", NETNS, "eth0")
    assert (inv.pod_name, inv.pod_namespace, inv.pod_uid) == ("web", "demo", "u-1")
    assert inv.path == ("/opt/cni/bin", "/usr/lib/cni")
    assert inv.conf is not None
    assert inv.conf.agent_socket == "/var/run/ambit/cni.sock"
    assert inv.conf.timeout_seconds == 10.0
    assert inv.conf.failure_policy is FailurePolicy.FAIL_CLOSED
    assert inv.conf.prev_result == PTP_RESULT
    assert (inv.conf.name, inv.conf.type, inv.conf.cni_version) == ("ambit", "ambit-cni", "1.0.0")


def test_config_keys_are_read() -> None:
    c = conf(agentSocket="/run/x/cni.sock", timeoutSeconds=2.5, failurePolicy="fail-open")
    inv = spec.parse_invocation(env(), c)
    assert inv.conf is not None
    assert inv.conf.agent_socket == "/run/x/cni.sock"
    assert inv.conf.timeout_seconds == 2.5
    assert inv.conf.failure_policy is FailurePolicy.FAIL_OPEN


def test_cni_version_040_is_accepted() -> None:
    inv = spec.parse_invocation(env(), conf(cniVersion="0.4.0", prevResult=V040_RESULT))
    assert inv.conf is not None and inv.conf.cni_version == "0.4.0"


def test_del_needs_neither_netns_nor_prev_result() -> None:
    inv = spec.parse_invocation(env("DEL", CNI_NETNS=None), conf(prevResult=None))
    assert inv.command is Command.DEL and inv.netns == ""
    assert spec.agent_request(inv, "del")["ips"] == []
    assert spec.agent_request(inv, "del")["hostIface"] == ""


def test_version_ignores_everything_else() -> None:
    inv = spec.parse_invocation({"CNI_COMMAND": "VERSION"}, "garbage")
    assert inv.command is Command.VERSION and inv.conf is None


def test_missing_cni_args_give_empty_pod_identity() -> None:
    inv = spec.parse_invocation(env(CNI_ARGS=None, CNI_PATH=None), conf())
    assert (inv.pod_name, inv.pod_namespace, inv.pod_uid, inv.path) == ("", "", "", ())


def test_agent_request_has_every_pinned_key() -> None:
    inv = spec.parse_invocation(env(), conf())
    assert spec.agent_request(inv, "add") == {
        "op": "add",
        "containerId": "0123abcd",
        "netns": NETNS,
        "ifname": "eth0",
        "podName": "web",
        "podNamespace": "demo",
        "podUid": "u-1",
        "ips": ["10.244.1.2"],
        "hostIface": "veth3c8e7a1f",
    }


# --- bad invocations -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env_", "stdin", "code", "needle"),
    [
        (env(CNI_COMMAND=None), conf(), 7, "CNI_COMMAND is not set"),
        (env(CNI_COMMAND="add"), conf(), 7, "ADD, DEL, CHECK, VERSION"),
        (env(CNI_COMMAND="GC"), conf(), 7, "not a CNI command"),
        (env(CNI_CONTAINERID=None), conf(), 7, "CNI_CONTAINERID is not set"),
        (env("DEL", CNI_CONTAINERID=""), conf(), 7, "CNI_CONTAINERID is not set"),
        (env(CNI_CONTAINERID="-abc"), conf(), 7, "not a valid container id"),
        (env(CNI_CONTAINERID="a/b"), conf(), 7, "not a valid container id"),
        (env(CNI_NETNS=None), conf(), 7, "CNI_NETNS is not set"),
        (env("CHECK", CNI_NETNS=None), conf(), 7, "CNI_NETNS is not set"),
        (env(CNI_IFNAME=None), conf(), 7, "CNI_IFNAME is not set"),
        (env(CNI_IFNAME="much-too-long-ifname"), conf(), 7, "not a valid interface name"),
        (env(CNI_IFNAME="eth/0"), conf(), 7, "not a valid interface name"),
        (env(CNI_IFNAME=".."), conf(), 7, "not a valid interface name"),
        (env(CNI_ARGS="K8S_POD_NAME"), conf(), 7, "not a KEY=VALUE pair"),
        (env(), "{not json", 4, "not valid JSON"),
        (env(), "", 4, "not valid JSON"),
        (env(), "[1, 2]", 4, "must be a JSON object"),
        (env(), conf(cniVersion=None), 4, "'cniVersion' is missing"),
        (env(), conf(cniVersion="0.2.0"), 1, "not supported by ambit-cni"),
        (env(), conf(cniVersion="2.0.0"), 1, 'set "cniVersion": "1.0.0"'),
        (env(), conf(name=None), 4, "'name' is missing"),
        (env(), conf(type=""), 4, "'type' must be a non-empty string"),
        (env(), conf(agentSocket="cni.sock"), 4, "must be an absolute path"),
        (env(), conf(agentSocket=7), 4, "'agentSocket' must be a non-empty string"),
        (env(), conf(timeoutSeconds=0), 4, "greater than 0"),
        (env(), conf(timeoutSeconds=-1), 4, "greater than 0"),
        (env(), conf(timeoutSeconds="10"), 4, "greater than 0"),
        (env(), conf(timeoutSeconds=True), 4, "greater than 0"),
        (env(), conf(failurePolicy="maybe"), 4, '"fail-closed" or "fail-open"'),
        (env(), conf(prevResult=None), 4, "chained plugin"),
        (env("CHECK"), conf(prevResult=None), 4, "chained plugin"),
        (env(), conf(prevResult=[1]), 4, "must be a JSON object"),
        (env(), conf(prevResult={"interfaces": "eth0"}), 4, "malformed CNI result"),
        (env(), conf(prevResult={"ips": [{"address": "x"}]}), 4, 'no valid "address"'),
        (env(), conf(prevResult={"ips": {}}), 4, '"ips" must be a list'),
        (
            env(),
            conf(prevResult={"interfaces": [], "ips": [{"address": "1.2.3.4/8", "interface": 0}]}),
            4,
            "refers to interface 0",
        ),
    ],
)
def test_bad_invocations(env_: dict[str, str], stdin: str, code: int, needle: str) -> None:
    err = error_of(env_, stdin)
    assert err.code == code
    assert needle in err.msg
    result = err.result()
    assert result == {"cniVersion": "1.0.0", "code": code, "msg": err.msg, "details": ""}


def test_missing_prev_result_says_how_to_fix_it() -> None:
    msg = error_of(env(), conf(prevResult=None)).msg
    assert "after the main plugin" in msg and "conflist" in msg


# --- CNI_ARGS ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        ("", {}),
        ("A=1", {"A": "1"}),
        ("A=1;B=2", {"A": "1", "B": "2"}),
        ("IgnoreUnknown=1;K8S_POD_NAME=web;", {"IgnoreUnknown": "1", "K8S_POD_NAME": "web"}),
        ("A=b=c", {"A": "b=c"}),
        ("A=", {"A": ""}),
        (";;A=1;;", {"A": "1"}),
        ("A=1;A=2", {"A": "2"}),
    ],
)
def test_cni_args(raw: str, parsed: dict[str, str]) -> None:
    assert spec.parse_cni_args(raw) == parsed


@pytest.mark.parametrize("raw", ["A", "=x", "A=1;B", " =1"])
def test_bad_cni_args(raw: str) -> None:
    with pytest.raises(CniSpecError, match="KEY=VALUE") as info:
        spec.parse_cni_args(raw)
    assert info.value.code == spec.ERR_INVALID_ENV


# --- prevResult ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("result", "ips", "host"),
    [
        (PTP_RESULT, ["10.244.1.2"], "veth3c8e7a1f"),
        (BRIDGE_RESULT, ["10.22.0.5"], "veth0a1b2c3d"),
        (V040_RESULT, ["10.244.2.7"], "vethabcdef01"),
        (DUAL_STACK, ["10.244.1.9"], "vethdual0001"),
        (IPAM_ONLY, ["10.244.3.4"], ""),
        ({"interfaces": [{"name": "eth0", "sandbox": NETNS}], "ips": []}, [], ""),
        ({}, [], ""),
    ],
)
def test_pod_ips_and_host_iface(result: dict[str, Any], ips: list[str], host: str) -> None:
    assert spec.pod_ips(result) == ips
    assert spec.host_iface(result) == host


# --- answers -------------------------------------------------------------------------------


def test_version_answer() -> None:
    assert spec.version_result() == {
        "cniVersion": "1.0.0",
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"],
    }


def test_error_object() -> None:
    assert spec.error_result(11, "agent down", "refused", "0.4.0") == {
        "cniVersion": "0.4.0",
        "code": 11,
        "msg": "agent down",
        "details": "refused",
    }
    err = CniSpecError(100, "no", "why")
    assert err.result() == {"cniVersion": "1.0.0", "code": 100, "msg": "no", "details": "why"}
    assert str(err) == "no"


@pytest.mark.parametrize(
    ("stdin", "version"),
    [
        ('{"cniVersion": "0.4.0"}', "0.4.0"),
        ('{"cniVersion": "1.0.0"}', "1.0.0"),
        ('{"cniVersion": "0.2.0"}', "1.0.0"),  # not ours to speak: answer in the latest
        ('{"cniVersion": 4}', "1.0.0"),
        ("[]", "1.0.0"),
        ("{oops", "1.0.0"),
        (b"\xff\xfe", "1.0.0"),
    ],
)
def test_version_of_possibly_bad_config(stdin: str | bytes, version: str) -> None:
    assert spec.cni_version_of(stdin) == version


@pytest.mark.parametrize(
    ("raw", "answer"),
    [
        (b'{"ok": true, "captured": true, "reason": "enrolled"}\n',
         spec.AgentAnswer(ok=True, captured=True, reason="enrolled")),
        (b'{"ok": true, "captured": false, "reason": "namespace not in the mesh"}',
         spec.AgentAnswer(ok=True, captured=False, reason="namespace not in the mesh")),
        (b'{"ok": true}', spec.AgentAnswer(ok=True)),
        (b'{"ok": false, "error": "no such pod"}', spec.AgentAnswer(ok=False, error="no such pod")),
        (b'{"ok": false}', spec.AgentAnswer(ok=False, error="no error given")),
    ],
)  # fmt: skip
def test_agent_answers(raw: bytes, answer: spec.AgentAnswer) -> None:
    assert spec.parse_agent_response(raw) == answer


@pytest.mark.parametrize("raw", [b"", b"hello", b"[]", b'{"ok": "yes"}', b'{"captured": true}'])
def test_bad_agent_answers(raw: bytes) -> None:
    with pytest.raises(CniSpecError, match="not a response of the agent protocol") as info:
        spec.parse_agent_response(raw)
    assert info.value.code == spec.ERR_AGENT_PROTOCOL


# Found by fuzz/cni_request.py: json.loads raises RecursionError (not ValueError) on deeply
# nested input, which escaped the agent's socket handler and parse_agent_response.
def test_deeply_nested_agent_answer_is_an_invalid_answer() -> None:
    with pytest.raises(CniSpecError) as e:
        spec.parse_agent_response(b"[" * 5000)
    assert e.value.code == spec.ERR_AGENT_PROTOCOL


@pytest.mark.parametrize("line", [b"[" * 5000, b'{"op": "\xff"}', b"{", b""])
def test_cni_server_rejects_undecodable_request_lines(line: bytes) -> None:
    from agent.cni_server import CniRequestError, decode_request

    with pytest.raises(CniRequestError):
        decode_request(line)
