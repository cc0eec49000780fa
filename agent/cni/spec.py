"""The CNI protocol as ``ambit-cni`` sees it: parsing an invocation, building answers and errors.

Why it exists: a CNI plugin is an executable the container runtime calls with environment
variables and a JSON network config on stdin, and whose only channel back is one JSON object on
stdout plus its exit status. Getting that contract exactly right (which variables each command
needs, what a chained plugin receives in ``prevResult``, which error code makes the kubelet
retry) decides whether a broken node agent shows up as a clear, retried pod-sandbox error or
as a pod that silently runs without capture. Keeping it pure (no I/O, no sockets) lets every
case be table-tested; ``agent.cni.plugin`` only adds the socket call and the process plumbing.

Reference: the CNI specification 1.0 (https://www.cni.dev/docs/spec/), sections "Parameters",
"Section 3: Execution of Network Configurations" (chaining, ``prevResult``) and "Error".
"""

from __future__ import annotations

import enum
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

PLUGIN_TYPE = "ambit-cni"
# 0.3.x: flannel's and Calico's default conflists still say 0.3.1, and the runtime passes the
# list's version to every plugin in it. Its results have the shape of 0.4.0's (which only added
# CHECK, and libcni never sends CHECK to a 0.3.x list).
SUPPORTED_VERSIONS: tuple[str, ...] = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
LATEST_VERSION = "1.0.0"
DEFAULT_AGENT_SOCKET = "/var/run/ambit/cni.sock"
DEFAULT_TIMEOUT_SECONDS = 10.0

# Error codes of the CNI spec ("Error" section); 1-99 are reserved for the spec.
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_NETWORK_CONFIG = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_ENV = 7
ERR_TRY_AGAIN_LATER = 11
# Plugin-specific codes (100+).
ERR_AGENT_REFUSED = 100  # the node agent answered ok=false
ERR_AGENT_PROTOCOL = 101  # the node agent answered something that is not a valid response
ERR_INTERNAL = 102  # a bug in ambit-cni itself

# Containerd and CRI-O container ids are hex; the spec allows letters, digits, '_', '.', '-'.
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_IFNAME_BAD = re.compile(r"[/:\s]")
_IFNAMSIZ = 15


class Command(enum.StrEnum):
    ADD = "ADD"
    DEL = "DEL"
    CHECK = "CHECK"
    VERSION = "VERSION"


class FailurePolicy(enum.StrEnum):
    """What ADD does when the pod cannot be handed to the node agent.

    ``fail-closed`` (default): the sandbox fails and the kubelet retries it, so no pod ever runs
    without capture. ``fail-open``: the pod starts uncaptured and the failure is only logged.
    """

    FAIL_CLOSED = "fail-closed"
    FAIL_OPEN = "fail-open"


class CniSpecError(Exception):
    """A CNI error: ``code`` per the spec, ``msg`` saying what is wrong and how to fix it."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def result(self, cni_version: str = LATEST_VERSION) -> dict[str, Any]:
        """The error object to print on stdout (with exit status 1)."""
        return error_result(self.code, self.msg, self.details, cni_version)


@dataclass(frozen=True)
class NetConf:
    """The plugin's entry of the conflist, as the runtime hands it over (name etc. injected)."""

    cni_version: str
    name: str
    type: str
    agent_socket: str = DEFAULT_AGENT_SOCKET
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    failure_policy: FailurePolicy = FailurePolicy.FAIL_CLOSED
    prev_result: dict[str, Any] | None = None


@dataclass(frozen=True)
class Invocation:
    """One call of the plugin: the command, its parameters and (except VERSION) the config."""

    command: Command
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: Mapping[str, str] = field(default_factory=dict)
    path: tuple[str, ...] = ()
    conf: NetConf | None = None

    @property
    def pod_name(self) -> str:
        return self.args.get("K8S_POD_NAME", "")

    @property
    def pod_namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE", "")

    @property
    def pod_uid(self) -> str:
        return self.args.get("K8S_POD_UID", "")


# --- answers -------------------------------------------------------------------------------


def error_result(
    code: int, msg: str, details: str = "", cni_version: str = LATEST_VERSION
) -> dict[str, Any]:
    """The spec's error object: ``{"cniVersion", "code", "msg", "details"}``."""
    return {"cniVersion": cni_version, "code": code, "msg": msg, "details": details}


def version_result() -> dict[str, Any]:
    """The answer to ``CNI_COMMAND=VERSION``."""
    return {"cniVersion": LATEST_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}


def answer_version(requested: str) -> str:
    """The ``cniVersion`` to put in an answer: the config's if we speak it, else the latest."""
    return requested if requested in SUPPORTED_VERSIONS else LATEST_VERSION


def cni_version_of(stdin: bytes | str) -> str:
    """Best-effort ``cniVersion`` of a config that may not parse (for error answers)."""
    try:
        doc = json.loads(stdin)
    except (ValueError, UnicodeDecodeError):
        return LATEST_VERSION
    version = doc.get("cniVersion") if isinstance(doc, dict) else None
    return answer_version(version) if isinstance(version, str) else LATEST_VERSION


# --- environment ---------------------------------------------------------------------------


def parse_command(env: Mapping[str, str]) -> Command:
    """``CNI_COMMAND`` as a ``Command``; code 7 if it is missing or unknown."""
    raw = env.get("CNI_COMMAND", "")
    if not raw:
        raise CniSpecError(
            ERR_INVALID_ENV,
            "CNI_COMMAND is not set: ambit-cni is a CNI plugin and must be run by a container "
            "runtime (or with CNI_COMMAND=ADD|DEL|CHECK|VERSION and the CNI_* variables set)",
        )
    try:
        return Command(raw)
    except ValueError:
        raise CniSpecError(
            ERR_INVALID_ENV,
            f"CNI_COMMAND={raw!r} is not a CNI command; use one of ADD, DEL, CHECK, VERSION",
        ) from None


def parse_cni_args(raw: str) -> dict[str, str]:
    """``CNI_ARGS`` (``K=V;K=V``) as a dict; empty segments are ignored, values may hold '='."""
    out: dict[str, str] = {}
    for part in raw.split(";"):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise CniSpecError(
                ERR_INVALID_ENV,
                f"CNI_ARGS: {part!r} is not a KEY=VALUE pair; CNI_ARGS must look like "
                "'K8S_POD_NAMESPACE=default;K8S_POD_NAME=web'",
            )
        out[key.strip()] = value
    return out


def _require_env(env: Mapping[str, str], name: str, command: Command, what: str) -> str:
    value = env.get(name, "")
    if not value:
        raise CniSpecError(
            ERR_INVALID_ENV,
            f"{name} is not set: {command} needs {what}; the container runtime must set it "
            "(when calling ambit-cni by hand, export it)",
        )
    return value


def _check_container_id(cid: str) -> str:
    if not _CONTAINER_ID.match(cid):
        raise CniSpecError(
            ERR_INVALID_ENV,
            f"CNI_CONTAINERID={cid!r} is not a valid container id: use letters, digits, '_', "
            "'.', '-', starting with a letter or digit",
        )
    return cid


def _check_ifname(name: str) -> str:
    if len(name) > _IFNAMSIZ or name in (".", "..") or _IFNAME_BAD.search(name):
        raise CniSpecError(
            ERR_INVALID_ENV,
            f"CNI_IFNAME={name!r} is not a valid interface name: at most {_IFNAMSIZ} "
            "characters, without '/', ':' or whitespace, and not '.' or '..'",
        )
    return name


# --- network config ------------------------------------------------------------------------


def _bad_config(msg: str) -> CniSpecError:
    return CniSpecError(ERR_INVALID_NETWORK_CONFIG, msg)


def _positive_number(value: object, key: str) -> float:
    # bool is an int subclass: "timeoutSeconds": true must not mean 1 second.
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise _bad_config(
            f"network config: {key!r} must be a number of seconds greater than 0, "
            f'got {value!r}; e.g. "{key}": {DEFAULT_TIMEOUT_SECONDS:g}'
        )
    return float(value)


def _string(doc: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = doc.get(key, default)
    if value is None:
        raise _bad_config(
            f'network config: {key!r} is missing; a CNI config needs "cniVersion", "name" '
            'and "type" (the runtime injects name and cniVersion from the conflist)'
        )
    if not isinstance(value, str) or not value:
        raise _bad_config(f"network config: {key!r} must be a non-empty string, got {value!r}")
    return value


def parse_netconf(stdin: bytes | str, command: Command) -> NetConf:
    """The network config from stdin; ADD and CHECK also need ``prevResult`` (chaining)."""
    try:
        doc = json.loads(stdin)
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad_config(
            f"network config on stdin is not valid JSON ({e}); the runtime must pass the "
            "plugin's entry of the conflist as one JSON object"
        ) from None
    if not isinstance(doc, dict):
        raise _bad_config(
            f"network config on stdin must be a JSON object, got {type(doc).__name__}"
        )
    version = _string(doc, "cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniSpecError(
            ERR_INCOMPATIBLE_VERSION,
            f"cniVersion {version!r} is not supported by ambit-cni (supported: "
            f'{", ".join(SUPPORTED_VERSIONS)}); set "cniVersion": "{LATEST_VERSION}" '
            "in the conflist",
        )
    name = _string(doc, "name")
    plugin_type = _string(doc, "type")
    socket_path = _string(doc, "agentSocket", DEFAULT_AGENT_SOCKET)
    if not socket_path.startswith("/"):
        raise _bad_config(
            f'network config: "agentSocket" must be an absolute path, got {socket_path!r}; '
            f"the node agent listens on {DEFAULT_AGENT_SOCKET} by default"
        )
    timeout = _positive_number(doc.get("timeoutSeconds", DEFAULT_TIMEOUT_SECONDS), "timeoutSeconds")
    raw_policy = doc.get("failurePolicy", FailurePolicy.FAIL_CLOSED.value)
    try:
        policy = FailurePolicy(raw_policy)
    except ValueError:
        raise _bad_config(
            f'network config: "failurePolicy" must be "fail-closed" or "fail-open", '
            f"got {raw_policy!r}"
        ) from None
    prev = doc.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise _bad_config(
            f'network config: "prevResult" must be a JSON object (a CNI result), got '
            f"{type(prev).__name__}"
        )
    if prev is None and command in (Command.ADD, Command.CHECK):
        raise _bad_config(
            f'{command} without "prevResult": ambit-cni is a chained plugin and does not '
            "create interfaces; put it after the main plugin (e.g. ptp or bridge) in the "
            '"plugins" list of a conflist'
        )
    if prev is not None:
        # Validate now, so ADD fails before the agent is asked anything.
        pod_ips(prev)
        host_iface(prev)
    return NetConf(
        cni_version=version,
        name=name,
        type=plugin_type,
        agent_socket=socket_path,
        timeout_seconds=timeout,
        failure_policy=policy,
        prev_result=prev,
    )


def parse_invocation(env: Mapping[str, str], stdin: bytes | str) -> Invocation:
    """Everything one call of the plugin was given; raises ``CniSpecError`` on bad input.

    ADD and CHECK need CNI_CONTAINERID, CNI_NETNS and CNI_IFNAME; DEL does not need CNI_NETNS
    (the namespace may already be gone). CNI_PATH is parsed but not required: ambit-cni
    delegates to no other plugin. VERSION ignores everything but the command.
    """
    command = parse_command(env)
    if command is Command.VERSION:
        return Invocation(command=command)
    cid = _check_container_id(_require_env(env, "CNI_CONTAINERID", command, "the container id"))
    if command is Command.DEL:
        netns = env.get("CNI_NETNS", "")
    else:
        netns = _require_env(env, "CNI_NETNS", command, "the path of the pod's network namespace")
    ifname = _check_ifname(
        _require_env(env, "CNI_IFNAME", command, "the pod's interface name (e.g. eth0)")
    )
    args = parse_cni_args(env.get("CNI_ARGS", ""))
    path = tuple(p for p in env.get("CNI_PATH", "").split(":") if p)
    conf = parse_netconf(stdin, command)
    return Invocation(
        command=command,
        container_id=cid,
        netns=netns,
        ifname=ifname,
        args=args,
        path=path,
        conf=conf,
    )


# --- prevResult ----------------------------------------------------------------------------


def _interfaces(result: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    ifaces = result.get("interfaces", [])
    if not isinstance(ifaces, list) or not all(
        isinstance(i, dict) and isinstance(i.get("name"), str) for i in ifaces
    ):
        raise _bad_config(
            'prevResult: "interfaces" must be a list of objects with a "name"; the plugin '
            "before ambit-cni returned a malformed CNI result"
        )
    return ifaces


def _sandboxed(iface: Mapping[str, Any]) -> bool:
    return bool(iface.get("sandbox"))


def pod_ips(result: Mapping[str, Any]) -> list[str]:
    """The pod's IPv4 addresses in a CNI result (0.3.x, 0.4.0, 1.0.0), in order, no duplicates.

    An address counts when its ``interface`` index points at an interface inside a sandbox
    (the pod side), or when it names no interface at all (an IPAM-only result). Addresses on
    host-side interfaces and IPv6 addresses are left out.
    """
    ifaces = _interfaces(result)
    ips = result.get("ips", [])
    if not isinstance(ips, list):
        raise _bad_config('prevResult: "ips" must be a list of {"address": "IP/PREFIX"}')
    out: list[str] = []
    for entry in ips:
        address = entry.get("address") if isinstance(entry, dict) else None
        try:
            iface_ip = ipaddress.ip_interface(address if isinstance(address, str) else "")
        except ValueError:
            raise _bad_config(
                f'prevResult: {entry!r} in "ips" has no valid "address" (CIDR, e.g. '
                '"10.244.1.2/24"); the plugin before ambit-cni returned a malformed result'
            ) from None
        index = entry.get("interface")
        if index is not None:
            if (
                isinstance(index, bool)
                or not isinstance(index, int)
                or not (0 <= index < len(ifaces))
            ):
                raise _bad_config(
                    f"prevResult: address {address} refers to interface {index!r}, but "
                    f'"interfaces" has {len(ifaces)} entries'
                )
            if not _sandboxed(ifaces[index]):
                continue
        if iface_ip.version == 4 and str(iface_ip.ip) not in out:
            out.append(str(iface_ip.ip))
    return out


def host_iface(result: Mapping[str, Any]) -> str:
    """The node-side end of the pod's veth: an interface of the result without ``sandbox``.

    With several (the bridge plugin lists the bridge first, then the host veth, then the pod's
    interface), the last one is taken: main plugins list the host veth right before the pod
    side. ``""`` when the result has none (e.g. macvlan, or a DEL without prevResult).
    """
    host = [i["name"] for i in _interfaces(result) if not _sandboxed(i)]
    return str(host[-1]) if host else ""


# --- the request to the node agent ---------------------------------------------------------


def agent_request(inv: Invocation, op: str) -> dict[str, Any]:
    """The JSON request for the node agent (the pinned agent protocol), for ``op``."""
    prev = inv.conf.prev_result if inv.conf is not None else None
    return {
        "op": op,
        "containerId": inv.container_id,
        "netns": inv.netns,
        "ifname": inv.ifname,
        "podName": inv.pod_name,
        "podNamespace": inv.pod_namespace,
        "podUid": inv.pod_uid,
        "ips": pod_ips(prev) if prev is not None else [],
        "hostIface": host_iface(prev) if prev is not None else "",
    }


@dataclass(frozen=True)
class AgentAnswer:
    """The node agent's response: ``ok`` and, if so, whether it captured the pod and why."""

    ok: bool
    captured: bool = False
    reason: str = ""
    error: str = ""


def parse_agent_response(raw: bytes) -> AgentAnswer:
    """Decode the agent's one-line JSON answer; code 101 if it is not a valid response."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply ("[[[[...")
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("ok"), bool):
        raise CniSpecError(
            ERR_AGENT_PROTOCOL,
            f"the node agent answered {text[:200]!r}, which is not a response of the agent "
            'protocol ({"ok": true|false, ...}); run an ambit-cni and a node agent of the '
            "same Ambit release",
        )
    if doc["ok"]:
        return AgentAnswer(
            ok=True, captured=doc.get("captured") is True, reason=str(doc.get("reason", ""))
        )
    return AgentAnswer(ok=False, error=str(doc.get("error", "")) or "no error given")
