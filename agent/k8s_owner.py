"""Is this agent's DaemonSet being deleted? Decides, at SIGTERM, whether to remove Ambit from
the node.

Why it exists: an agent stops for many reasons, and only one of them means "remove me". In a
rolling update, a node drain, a restart or an eviction the next agent takes over the kernel
state and the CNI chain, and traffic must keep flowing through the ztunnel meanwhile; so
stopping leaves capture in place. When Ambit is uninstalled, though, nothing would ever remove
the chain entry (whose fail-closed plugin would then fail every new pod on the node, with no
agent to answer) nor the programs and rules. The one signal that tells them apart is the
DaemonSet: deleting it deletes its pods, and while they stop it is gone (404, background
deletion) or marked ``metadata.deletionTimestamp`` (foreground deletion, what ``ambit
uninstall`` uses). So on SIGTERM the agent asks the API server for its DaemonSet and removes
everything only on that evidence. On any doubt (API server unreachable, 401/403, a DaemonSet
this agent never saw, one that was replaced by a new object) it leaves everything in place:
a leftover chain entry is fixed by reinstalling or ``ambit agent uninstall``, while removing
capture under a running install would let pods bypass the mesh.

The decision is the pure ``decide`` (a table test); ``DaemonSetClient`` is one HTTP GET with
the pod's in-cluster credentials (``KUBERNETES_SERVICE_HOST``/``PORT``, the service-account
token and CA), overridable for tests. It needs RBAC ``get`` on ``apps/daemonsets`` for that
one name (Role ``ambit-node``), nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("agent.owner")

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
REQUEST_TIMEOUT = 5.0
LEARN_RETRY = 30.0


@dataclass(frozen=True)
class Observation:
    """One answer about the DaemonSet: ``status`` is the HTTP status (``None``: no answer,
    ``error`` says why); ``uid`` and ``deletion_timestamp`` come from a 200's metadata."""

    status: int | None
    uid: str = ""
    deletion_timestamp: str = ""
    error: str = ""


@dataclass(frozen=True)
class Decision:
    remove: bool
    reason: str


def decide(obs: Observation, known_uid: str, what: str) -> Decision:
    """Remove Ambit from the node, or leave it? ``known_uid`` is the uid this agent saw its
    DaemonSet with earlier ("" if it never saw it); ``what`` names it (``ns/name``)."""
    if obs.status is None:
        return Decision(False, f"cannot ask the API server about DaemonSet {what} "
                        f"({obs.error}); leaving capture and the CNI chain in place")
    if obs.status == 200:
        if obs.deletion_timestamp:
            return Decision(True, f"DaemonSet {what} is being deleted (deletionTimestamp "
                            f"{obs.deletion_timestamp}): Ambit is being removed from the node")
        if known_uid and obs.uid and obs.uid != known_uid:
            return Decision(False, f"DaemonSet {what} was replaced by a new one (uid "
                            f"{known_uid} -> {obs.uid}); its pods take over, leaving capture "
                            "and the CNI chain in place")
        return Decision(False, f"DaemonSet {what} is still there (rolling update, drain or "
                        "restart); leaving capture and the CNI chain in place for the next "
                        "agent")
    if obs.status == 404:
        if known_uid:
            return Decision(True, f"DaemonSet {what} is gone (404): Ambit is being removed "
                            "from the node")
        return Decision(False, f"DaemonSet {what} is not found (404) and this agent never saw "
                        "it, so --daemonset may name the wrong object; leaving capture and "
                        "the CNI chain in place")
    if obs.status in (401, 403):
        return Decision(False, f"the API server refused to show DaemonSet {what} "
                        f"({obs.status}{': ' + obs.error if obs.error else ''}); the node "
                        "service account needs get on apps/daemonsets for that name (Role "
                        "ambit-node); leaving capture and the CNI chain in place")
    return Decision(False, f"unexpected answer {obs.status} about DaemonSet {what}"
                    f"{': ' + obs.error if obs.error else ''}; leaving capture and the CNI "
                    "chain in place")


class ApiConfigError(RuntimeError):
    """No way to reach the API server from this pod; the message says what is missing."""


@dataclass(frozen=True)
class ApiTarget:
    """Where and how to reach the API server. ``token_file`` is re-read on every request
    (projected tokens rotate); ``ca_file`` verifies an https server."""

    base_url: str
    token_file: Path | None = None
    ca_file: Path | None = None

    @classmethod
    def in_cluster(cls, env: Mapping[str, str] | None = None,
                   sa_dir: Path = SERVICE_ACCOUNT_DIR) -> ApiTarget:
        env = os.environ if env is None else env
        host = env.get("KUBERNETES_SERVICE_HOST", "")
        port = env.get("KUBERNETES_SERVICE_PORT", "")
        if not host or not port:
            raise ApiConfigError("KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT are not set: "
                                 "not running in a Kubernetes pod")
        if ":" in host:
            host = f"[{host}]"
        token, ca = sa_dir / "token", sa_dir / "ca.crt"
        if not token.is_file():
            raise ApiConfigError(f"{token} does not exist: the pod needs its service-account "
                                 "token (automountServiceAccountToken must not be false)")
        return cls(f"https://{host}:{port}", token, ca if ca.is_file() else None)


class DaemonSetClient:
    """GETs one DaemonSet; never raises for an answer, only reports it as an ``Observation``."""

    def __init__(self, target: ApiTarget, namespace: str, name: str,
                 timeout: float = REQUEST_TIMEOUT) -> None:
        self.target = target
        self.namespace = namespace
        self.name = name
        self.timeout = timeout

    @property
    def what(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def url(self) -> str:
        return (f"{self.target.base_url.rstrip('/')}/apis/apps/v1/namespaces/{self.namespace}"
                f"/daemonsets/{self.name}")

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.url.startswith("https:"):
            return False
        ca = self.target.ca_file
        return ssl.create_default_context(cafile=str(ca) if ca is not None else None)

    async def observe(self) -> Observation:
        import aiohttp

        headers = {"Accept": "application/json"}
        try:
            if self.target.token_file is not None:
                headers["Authorization"] = \
                    f"Bearer {self.target.token_file.read_text().strip()}"
            timeout = aiohttp.ClientTimeout(total=self.timeout)
            async with aiohttp.ClientSession(timeout=timeout) as session, \
                    session.get(self.url, headers=headers, ssl=self._ssl()) as resp:
                if resp.status != 200:
                    return Observation(resp.status, error=_status_message(await resp.text()))
                doc = await resp.json(content_type=None)
        except (OSError, aiohttp.ClientError, ValueError) as e:  # timeouts and TLS: OSError
            return Observation(None, error=f"{type(e).__name__}: {e}" if str(e)
                               else type(e).__name__)
        meta: Any = doc.get("metadata") if isinstance(doc, dict) else None
        if not isinstance(meta, dict):
            return Observation(None, error=f"{self.url} answered 200 without object metadata")
        return Observation(200, uid=str(meta.get("uid") or ""),
                           deletion_timestamp=str(meta.get("deletionTimestamp") or ""))


def _status_message(text: str) -> str:
    import json

    with contextlib.suppress(ValueError, AttributeError):
        return str(json.loads(text).get("message", ""))[:300]
    return text.strip()[:300]


class OwnerWatch:
    """Learns the DaemonSet's uid while the agent runs, and decides at shutdown."""

    def __init__(self, client: DaemonSetClient, retry: float = LEARN_RETRY) -> None:
        self.client = client
        self.retry = retry
        self.known_uid = ""

    async def learn(self) -> None:
        """Until the DaemonSet has been seen once (its uid), ask every ``retry`` seconds."""
        last = ""
        while not self.known_uid:
            obs = await self.client.observe()
            if obs.status == 200 and obs.uid:
                self.known_uid = obs.uid
                log.info("DaemonSet %s (uid %s) owns this agent: deleting it removes Ambit "
                         "from the node", self.client.what, obs.uid)
                return
            problem = decide(obs, "", self.client.what).reason
            if problem != last:
                log.warning("cannot see my DaemonSet yet: %s; retrying every %gs", problem,
                            self.retry)
                last = problem
            await asyncio.sleep(self.retry)

    async def decide_at_exit(self) -> Decision:
        obs = await self.client.observe()
        decision = decide(obs, self.known_uid, self.client.what)
        log.info("on SIGTERM: %s", decision.reason)
        return decision
