"""A small libcni for the dev cluster: runs a CNI conflist inside a node namespace.

Why it exists: on a real node the kubelet (through containerd and libcni) wires each pod by
executing the conflist's plugins. The dev cluster must wire pods the same way, with the real
plugins (ptp + host-local from Debian's containernetworking-plugins, then ``ambit-cni``), so
that what the node agent learns, and when, is exactly what it will learn in production. This
module does what libcni does for that: it finds each plugin by its ``type`` in a search path,
sets the ``CNI_*`` environment, injects ``name``, ``cniVersion`` and ``prevResult`` into each
plugin's config, chains ADD results, caches the final result (libcni keeps it under
``/var/lib/cni/results``) for DEL and CHECK, and turns CNI error objects into ``CniError``.

Network safety: every plugin is executed *inside the node's namespace* (``ip netns exec NODE``).
ptp creates the host end of the veth in its current namespace, so running it anywhere else
would put interfaces, addresses and routes into the machine's own namespace.

Semantics kept from libcni: ADD runs the plugins in order and stops at the first failure
without undoing anything (the caller, like containerd, then runs DEL); DEL runs them in reverse
with the cached result. Deliberate difference: DEL does not stop at a failing plugin but runs
the rest and returns every error, so one broken plugin cannot leak a veth or an IP lease; the
cache is kept until a DEL succeeds completely.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ambit.dev import netns
from mesh.files import write_atomic

log = logging.getLogger(__name__)

SYSTEM_PLUGIN_DIR = Path("/usr/lib/cni")
SYSTEM_PLUGINS = ("ptp", "host-local", "loopback")
AMBIT_PLUGIN = "ambit-cni"
DEFAULT_NETWORK = "ambit"
CNI_VERSION = "1.0.0"
DEFAULT_TIMEOUT = 60.0
# CHECK exists, and DEL gets the cached result, from spec 0.4.0 on.
_NO_CHECK_VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.3.1")
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class CniError(RuntimeError):
    """A CNI operation failed.

    ``plugin`` is the failing plugin's ``type`` ("" when the runtime itself refused, e.g. CHECK
    without a cached result); ``code`` is the CNI error code from the plugin's error object,
    ``None`` when the plugin died without one (crash, timeout, not found); ``msg`` and
    ``details`` come from the error object; ``stderr`` is what the plugin logged.
    """

    def __init__(
        self,
        plugin: str,
        command: str,
        code: int | None,
        msg: str,
        details: str = "",
        stderr: str = "",
    ) -> None:
        self.plugin = plugin
        self.command = command
        self.code = code
        self.msg = msg
        self.details = details
        self.stderr = stderr
        where = f"plugin {plugin!r}" if plugin else "the CNI runtime"
        text = f"CNI {command} failed in {where}"
        text += f" (CNI error code {code}): {msg}" if code is not None else f": {msg}"
        if details and details not in msg:
            text += f" [details: {details}]"
        if stderr.strip():
            text += f"\nplugin stderr:\n{stderr.strip()[-2000:]}"
        super().__init__(text)


class CniConfigError(ValueError):
    """The conflist, the runtime parameters or the plugin directory are unusable."""


@dataclass(frozen=True)
class RuntimeConf:
    """What the runtime knows about one pod interface (libcni's ``RuntimeConf``)."""

    container_id: str
    netns_path: str
    ifname: str = "eth0"
    args: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not _CONTAINER_ID.match(self.container_id):
            raise CniConfigError(
                f"container id {self.container_id!r}: use letters, digits, '_', '.', '-'"
            )
        netns.check_ifname(self.ifname)
        for key, value in self.args:
            if not key or "=" in key or ";" in key or ";" in value:
                raise CniConfigError(
                    f"CNI_ARGS entry {key!r}={value!r}: keys must be non-empty without '=' or "
                    "';', values without ';'"
                )

    @property
    def cni_args(self) -> str:
        return ";".join(f"{k}={v}" for k, v in self.args)


def k8s_pod_args(
    namespace: str, name: str, uid: str, container_id: str
) -> tuple[tuple[str, str], ...]:
    """The CNI_ARGS containerd passes for a Kubernetes pod sandbox."""
    return (
        ("IgnoreUnknown", "1"),
        ("K8S_POD_NAMESPACE", namespace),
        ("K8S_POD_NAME", name),
        ("K8S_POD_INFRA_CONTAINER_ID", container_id),
        ("K8S_POD_UID", uid),
    )


def _check_conflist(conflist: Mapping[str, Any]) -> tuple[str, str, list[dict[str, Any]]]:
    name = conflist.get("name")
    version = conflist.get("cniVersion")
    plugins = conflist.get("plugins")
    if not isinstance(name, str) or not name:
        raise CniConfigError('conflist: "name" must be a non-empty string')
    if not isinstance(version, str) or not version:
        raise CniConfigError('conflist: "cniVersion" must be a string such as "1.0.0"')
    if not isinstance(plugins, list) or not plugins:
        raise CniConfigError('conflist: "plugins" must be a non-empty list')
    for i, p in enumerate(plugins):
        if not isinstance(p, dict) or not isinstance(p.get("type"), str) or not p["type"]:
            raise CniConfigError(f'conflist: plugins[{i}] must be an object with a "type"')
        if "/" in p["type"]:
            raise CniConfigError(f"conflist: plugins[{i}] type {p['type']!r} must not hold '/'")
    return name, version, [dict(p) for p in plugins]


class CniRunner:
    """Runs one conflist for the pods of one node, as libcni does for the kubelet.

    ``plugin_path`` is the search path for plugin executables (CNI_PATH), ``node_netns`` the
    name of the node's network namespace (plugins run inside it), ``cache_dir`` where final
    ADD results are kept for DEL and CHECK (a per-node directory).
    """

    def __init__(
        self,
        conflist: Mapping[str, Any],
        plugin_path: Sequence[str | Path],
        node_netns: str,
        cache_dir: Path,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.name, self.cni_version, self.plugins = _check_conflist(conflist)
        self.conflist = dict(conflist)
        self.plugin_path = [Path(p) for p in plugin_path]
        if not self.plugin_path:
            raise CniConfigError("plugin_path: give at least one directory to find plugins in")
        self.node_netns = netns.check_netns_name(node_netns)
        self.cache_dir = Path(cache_dir)
        self.timeout = timeout

    # --- the operations --------------------------------------------------------------------

    def add(self, rt: RuntimeConf) -> dict[str, Any]:
        """ADD every plugin in order, each getting the previous one's result; cache the last.

        Raises ``CniError`` at the first failure; nothing is undone (call ``delete``, as
        containerd does when sandbox setup fails).
        """
        prev: dict[str, Any] | None = None
        for plugin in self.plugins:
            out = self._exec("ADD", plugin, rt, prev)
            prev = self._parse_result(plugin["type"], out)
        assert prev is not None  # the conflist has at least one plugin
        self._write_cache(rt, prev)
        return prev

    def delete(self, rt: RuntimeConf) -> list[CniError]:
        """DEL every plugin in reverse order with the cached result; return the failures.

        Every plugin is run even if an earlier one failed. On full success the cached result
        is removed; otherwise it is kept so that a retried DEL still has it. A DEL of a pod
        that was never added (or already deleted) runs without ``prevResult``, as per spec.
        """
        cached = self.cached_result(rt) if self._has_prev_on_del() else None
        errors: list[CniError] = []
        for plugin in reversed(self.plugins):
            try:
                self._exec("DEL", plugin, rt, cached)
            except CniError as e:
                log.warning("%s", e)
                errors.append(e)
        if not errors:
            with contextlib.suppress(FileNotFoundError):
                self._cache_file(rt).unlink()
        return errors

    def check(self, rt: RuntimeConf) -> None:
        """CHECK every plugin in order with the cached result; raise ``CniError`` if one fails."""
        if not self._has_prev_on_del():
            raise CniError("", "CHECK", None, f"cniVersion {self.cni_version} has no CHECK")
        cached = self.cached_result(rt)
        if cached is None:
            raise CniError(
                "",
                "CHECK",
                None,
                f"no cached result for container {rt.container_id} interface {rt.ifname} in "
                f"network {self.name!r} ({self._cache_file(rt)}): ADD it first",
            )
        for plugin in self.plugins:
            self._exec("CHECK", plugin, rt, cached)

    def version(self, plugin_type: str) -> dict[str, Any]:
        """The VERSION answer of one plugin (found in the search path)."""
        exe = self.find_plugin(plugin_type)
        res = self._run(plugin_type, "VERSION", exe, {"CNI_COMMAND": "VERSION"},
                        {"cniVersion": self.cni_version})  # fmt: skip
        return self._parse_result(plugin_type, res, "VERSION")

    def cached_result(self, rt: RuntimeConf) -> dict[str, Any] | None:
        """The result the last successful ADD returned for this pod interface, if any."""
        try:
            doc = json.loads(self._cache_file(rt).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable CNI cache %s: %s", self._cache_file(rt), e)
            return None
        result = doc.get("result") if isinstance(doc, dict) else None
        return result if isinstance(result, dict) else None

    # --- plumbing --------------------------------------------------------------------------

    def find_plugin(self, plugin_type: str) -> Path:
        for d in self.plugin_path:
            exe = d / plugin_type
            if exe.is_file() and os.access(exe, os.X_OK):
                return exe
        raise CniError(
            plugin_type,
            "find",
            None,
            f"no executable {plugin_type!r} in the plugin path "
            f"{':'.join(map(str, self.plugin_path))}; see prepare_plugin_dir()",
        )

    def _has_prev_on_del(self) -> bool:
        return self.cni_version not in _NO_CHECK_VERSIONS

    def _cache_file(self, rt: RuntimeConf) -> Path:
        return self.cache_dir / "results" / f"{self.name}-{rt.container_id}-{rt.ifname}"

    def _write_cache(self, rt: RuntimeConf, result: Mapping[str, Any]) -> None:
        path = self._cache_file(rt)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "kind": "cniCacheV1",
            "containerId": rt.container_id,
            "ifName": rt.ifname,
            "networkName": self.name,
            "cniArgs": [list(a) for a in rt.args],
            "config": self.conflist,
            "result": result,
        }
        write_atomic(path, json.dumps(doc, indent=2))

    def _plugin_config(
        self, plugin: Mapping[str, Any], prev: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        # What libcni's buildOneConfig does: the list's name and version win over the entry's.
        conf = dict(plugin)
        conf["name"] = self.name
        conf["cniVersion"] = self.cni_version
        if prev is not None:
            conf["prevResult"] = prev
        else:
            conf.pop("prevResult", None)
        return conf

    def _exec(
        self,
        command: str,
        plugin: Mapping[str, Any],
        rt: RuntimeConf,
        prev: Mapping[str, Any] | None,
    ) -> bytes:
        plugin_type = str(plugin["type"])
        try:
            exe = self.find_plugin(plugin_type)
        except CniError as e:
            raise CniError(plugin_type, command, None, e.msg) from None
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": rt.container_id,
            "CNI_NETNS": rt.netns_path,
            "CNI_IFNAME": rt.ifname,
            "CNI_ARGS": rt.cni_args,
            "CNI_PATH": ":".join(map(str, self.plugin_path)),
        }
        return self._run(plugin_type, command, exe, env, self._plugin_config(plugin, prev))

    def _run(
        self,
        plugin_type: str,
        command: str,
        exe: Path,
        cni_env: Mapping[str, str],
        conf: Mapping[str, Any],
    ) -> bytes:
        # Like libcni: the runtime's environment plus the CNI variables (none left over).
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
        env.update(cni_env)
        argv = netns.ns_argv(self.node_netns, [str(exe)])
        try:
            res = subprocess.run(
                argv,
                input=json.dumps(conf).encode(),
                capture_output=True,
                env=env,
                timeout=self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise CniError(
                plugin_type,
                command,
                None,
                f"did not finish within {self.timeout:g}s and was killed; run it by hand "
                f"inside the node namespace ({self.node_netns}) to see where it hangs",
            ) from None
        stderr = res.stderr.decode("utf-8", "replace")
        if stderr.strip():
            cid = cni_env.get("CNI_CONTAINERID", "-")
            log.info("CNI %s %s (container %s) stderr: %s", command, plugin_type, cid, stderr)
        if res.returncode != 0:
            raise _error_from(plugin_type, command, res.returncode, res.stdout, stderr)
        return res.stdout

    def _parse_result(self, plugin_type: str, out: bytes, command: str = "ADD") -> dict[str, Any]:
        try:
            doc = json.loads(out)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise CniError(
                plugin_type,
                command,
                None,
                f"exited 0 but printed no CNI result (stdout: {out[:300]!r})",
            )
        return doc


def _error_from(
    plugin_type: str, command: str, status: int, stdout: bytes, stderr: str
) -> CniError:
    """A ``CniError`` from a failed plugin: its error object, or what it left behind."""
    try:
        doc = json.loads(stdout)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("code"), int):
        return CniError(
            plugin_type,
            command,
            int(doc["code"]),
            str(doc.get("msg", "")),
            str(doc.get("details", "")),
            stderr,
        )
    text = stdout.decode("utf-8", "replace").strip()
    return CniError(
        plugin_type,
        command,
        None,
        f"exited with status {status} without a CNI error object"
        + (f" (stdout: {text[:300]!r})" if text else ""),
        stderr=stderr,
    )


# --- the dev cluster's network -------------------------------------------------------------


def conflist_for_node(
    pod_cidr: str,
    node_dir: Path,
    agent_socket: str | Path,
    *,
    gateway: str | None = None,
    name: str = DEFAULT_NETWORK,
    failure_policy: str = "fail-closed",
    timeout_seconds: float | None = None,
    mtu: int = 1500,
) -> dict[str, Any]:
    """The dev cluster's conflist for one node: ptp + host-local IPAM, then ``ambit-cni``.

    ``pod_cidr`` is the node's pod subnet (e.g. ``10.244.1.0/24``); ``gateway`` defaults to
    its first address. host-local keeps its leases under ``node_dir/host-local`` so nodes that
    share this machine do not share (or fight over) leases.
    """
    try:
        subnet = ipaddress.IPv4Network(pod_cidr)
    except ValueError as e:
        raise CniConfigError(f"pod CIDR {pod_cidr!r}: {e} (e.g. 10.244.1.0/24)") from None
    gw = ipaddress.IPv4Address(gateway) if gateway else subnet.network_address + 1
    if gw not in subnet:
        raise CniConfigError(f"gateway {gw} is outside the pod CIDR {subnet}")
    ambit: dict[str, Any] = {
        "type": AMBIT_PLUGIN,
        "agentSocket": str(agent_socket),
        "failurePolicy": failure_policy,
    }
    if timeout_seconds is not None:
        ambit["timeoutSeconds"] = timeout_seconds
    return {
        "cniVersion": CNI_VERSION,
        "name": name,
        "plugins": [
            {
                "type": "ptp",
                "ipMasq": False,
                "mtu": mtu,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": str(subnet), "gateway": str(gw)}]],
                    "routes": [{"dst": "0.0.0.0/0", "gw": str(gw)}],
                    "dataDir": str(Path(node_dir) / "host-local"),
                },
            },
            ambit,
        ],
    }


def default_ambit_cni() -> Path:
    """The ``ambit-cni`` console script of the running venv."""
    return Path(sys.executable).parent / AMBIT_PLUGIN


def prepare_plugin_dir(
    dest: Path,
    *,
    system_dir: Path = SYSTEM_PLUGIN_DIR,
    ambit_cni: Path | None = None,
) -> Path:
    """Make ``dest`` a CNI_PATH directory: links to ptp, host-local, loopback and ambit-cni."""
    ambit_cni = ambit_cni or default_ambit_cni()
    targets = {p: system_dir / p for p in SYSTEM_PLUGINS}
    targets[AMBIT_PLUGIN] = ambit_cni
    for plugin, target in targets.items():
        if not (target.is_file() and os.access(target, os.X_OK)):
            fix = (
                "install the project into the venv (`make setup`, or "
                "`.venv/bin/pip install -e .`) so the console script exists"
                if plugin == AMBIT_PLUGIN
                else "install Debian's containernetworking-plugins "
                "(`apt-get install containernetworking-plugins`)"
            )
            raise CniConfigError(f"CNI plugin {plugin}: {target} is not an executable; {fix}")
    dest.mkdir(parents=True, exist_ok=True)
    for plugin, target in targets.items():
        link = dest / plugin
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    return dest
