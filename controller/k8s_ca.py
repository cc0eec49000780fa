"""The mesh root in Kubernetes mode: one Secret shared by every controller replica.

Why it exists: every workload certificate chains to one root, and the controller runs as
several replicas, each signing certificates; they must all sign with the same root, and the
root must outlive any pod. A pod's data directory is neither shared nor durable, so in
Kubernetes mode the root lives in the Secret ``ambit-system/ambit-ca`` (keys ``root-cert.pem``
and ``root-key.pem``, the file names of ``ca_store``):

* **present**: it is loaded and checked with ``ca_store.ca_from_pem``. A root the operator put
  there before installing is used as is; one that does not load is an error naming the Secret
  and the key, and the controller exits: it never overwrites a Secret it did not create.
* **absent**: only the leader (``controller.leader``) generates a root and creates the Secret.
  Creation is a POST, which the API server lets only one writer win (409 AlreadyExists for the
  others, who then read the winner's), so even two replicas that both think they lead cannot
  end up with two roots. Followers poll until it appears, logging every ~10 s whom they wait
  for.

Node pods verify the controller's TLS with the public half: the leader keeps the ConfigMap
``ambit-system/ambit-ca-root`` (key ``root-cert.pem``, the name and key the waypoint deployer
uses in waypoint namespaces) equal to the root (``keep_ca_root``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from controller.ca import CertificateAuthority
from controller.ca_store import ROOT_CERT_FILE, ROOT_KEY_FILE, CaStoreError, ca_from_pem
from controller.leader import PART_OF
from controller.registry.k8s_watch import Backoff
from controller.waypoint.deploy import CA_ROOT_CONFIGMAP, CA_ROOT_KEY
from controller.waypoint.k8s_apply import CONFIG_MAPS, ApiError, Resource, Rest

__all__ = [
    "CA_SECRET", "CERT_KEY", "KEY_KEY", "SECRETS", "SYSTEM_NAMESPACE", "ca_from_secret",
    "ca_root_configmap", "ensure_ca_root", "keep_ca_root", "load_or_create_ca",
    "parse_secret_ref", "plan_ca_root", "secret_body",
]

log = logging.getLogger("controller.ca")

SYSTEM_NAMESPACE = "ambit-system"
CA_SECRET = "ambit-ca"
CERT_KEY = ROOT_CERT_FILE  # "root-cert.pem"
KEY_KEY = ROOT_KEY_FILE  # "root-key.pem"
SECRETS = Resource("", "v1", "secrets", "Secret")
FIELD_MANAGER = "ambit-controller"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def parse_secret_ref(text: str) -> tuple[str, str]:
    """``NAMESPACE/NAME`` -> (namespace, name); ValueError says what is wrong."""
    ns, sep, name = text.partition("/")
    if not sep or not ns or not name:
        raise ValueError(f"{text!r} is not NAMESPACE/NAME")
    if not _DNS_LABEL.match(ns):
        raise ValueError(f"{text!r}: {ns!r} is not a namespace name (lowercase RFC 1123 label)")
    if not _DNS_SUBDOMAIN.match(name):
        raise ValueError(f"{text!r}: {name!r} is not a Secret name (lowercase RFC 1123 "
                         "subdomain)")
    return ns, name


def secret_body(namespace: str, name: str, ca: CertificateAuthority) -> dict[str, Any]:
    """The Secret the leader creates for a generated root."""
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(PART_OF)},
        "data": {CERT_KEY: base64.b64encode(ca.root_pem).decode(),
                 KEY_KEY: base64.b64encode(ca.key_pem).decode()},
    }


def ca_from_secret(secret: Mapping[str, Any], trust_domain: str, namespace: str, name: str,
                   now: dt.datetime | None = None) -> CertificateAuthority:
    """Load the root from a Secret as the API serves it; ``CaStoreError`` names the Secret and
    the key at fault and what to do."""
    where = f"Secret {namespace}/{name}"
    fix = ("fix or replace the Secret (it is never overwritten), or delete it to let the "
           "controller generate a new root (every workload certificate is then reissued)")
    data = secret.get("data") or {}
    if not isinstance(data, Mapping):
        raise CaStoreError(f"{where}: data is not a map of keys; {fix}")
    missing = [k for k in (CERT_KEY, KEY_KEY) if not data.get(k)]
    if missing:
        present = ", ".join(sorted(str(k) for k in data)) or "none"
        hint = ""
        if "tls.crt" in data or "tls.key" in data:
            hint = (f" (a kubernetes.io/tls Secret's tls.crt/tls.key are not read: store the "
                    f"root as {CERT_KEY} and {KEY_KEY})")
        raise CaStoreError(f"{where} has no key {' and no key '.join(missing)} (keys present: "
                           f"{present}){hint}; {fix}")
    pem: dict[str, bytes] = {}
    for key in (CERT_KEY, KEY_KEY):
        try:
            pem[key] = base64.b64decode(str(data[key]), validate=True)
        except (binascii.Error, ValueError):
            raise CaStoreError(f"{where}: key {key} is not valid base64; {fix}") from None
        if b"-----BEGIN " not in pem[key]:
            raise CaStoreError(f"{where}: key {key} is not PEM (no -----BEGIN line); {fix}")
    try:
        return ca_from_pem(pem[KEY_KEY], pem[CERT_KEY], trust_domain,
                           f"{where} (keys {CERT_KEY}, {KEY_KEY})", now=now)
    except CaStoreError as e:
        raise CaStoreError(f"{e}; {fix}") from None


async def load_or_create_ca(
    rest: Rest,
    namespace: str,
    name: str,
    trust_domain: str,
    *,
    is_leader: Callable[[], bool],
    leader: Callable[[], str] = lambda: "",
    became_leader: asyncio.Event | None = None,
    generate: Callable[[str], CertificateAuthority] = CertificateAuthority.generate,
    poll: float = 1.0,
    log_every: float = 10.0,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[CertificateAuthority, bool]:
    """The root from the Secret ``namespace/name``, created by this replica when it is absent
    and ``is_leader()``; (root, whether this call created the Secret). ``became_leader``: set
    when this replica starts leading, so that it need not wait out a poll interval to create it.

    Raises ``CaStoreError`` when the Secret exists but is unusable, or cannot ever be created
    (its namespace does not exist); retries everything else (unreachable API server,
    forbidden, a follower waiting for the leader), logging at most every ``log_every``."""
    where = f"Secret {namespace}/{name}"
    backoff = Backoff(initial=poll, cap=max(poll, 10.0))
    last_log = -float("inf")
    last_problem = ""

    def report(problem: str, level: int = logging.WARNING) -> None:
        nonlocal last_log, last_problem
        if problem != last_problem or clock() - last_log >= log_every:
            log.log(level, "%s", problem)
            last_log, last_problem = clock(), problem

    while True:
        delay = poll
        try:
            secret = await rest.get(SECRETS, namespace, name)
        except ApiError as e:
            secret = None
            report(_explain(e, f"read {where}", namespace, name, "get"))
            delay = backoff.delay()
        else:
            if secret is not None:
                ca = ca_from_secret(secret, trust_domain, namespace, name)
                log.info("loaded the mesh root from %s (%s, expires %s)", where,
                         ca.cert.subject.rfc4514_string(), ca.cert.not_valid_after_utc)
                return ca, False
            if is_leader():
                ca = generate(trust_domain)
                try:
                    await rest.create(SECRETS, namespace, secret_body(namespace, name, ca),
                                      FIELD_MANAGER)
                except ApiError as e:
                    if e.already_exists:
                        log.info("%s was created by another replica meanwhile; loading it",
                                 where)
                        continue
                    if e.status == 404:
                        raise CaStoreError(
                            f"cannot create {where}: namespace {namespace} does not exist "
                            f"({e.message}); install Ambit (`ambit install` creates it) or "
                            "pass --ca-secret NAMESPACE/NAME in an existing namespace") from None
                    report(_explain(e, f"create {where}", namespace, name, "create"))
                    delay = backoff.delay()
                else:
                    log.info("generated a new mesh root for trust domain %s and stored it in "
                             "%s", trust_domain, where)
                    return ca, True
            else:
                held = leader()
                report(f"waiting for the leader{f' ({held})' if held else ''} to create the "
                       f"mesh root in {where} (it does not exist yet)", logging.INFO)
        if became_leader is not None and not is_leader():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await became_leader.wait()
        else:
            await asyncio.sleep(delay)


def _explain(e: ApiError, doing: str, namespace: str, name: str, verb: str) -> str:
    if e.status == 403:
        return (f"cannot {doing}: forbidden ({e.message}); the controller's service account "
                f"needs {verb} on secrets (resourceNames {name}) in namespace {namespace} "
                "(Role ambit-controller); retrying")
    return f"cannot {doing}: {e}; retrying"


# --- the public root for node pods ----------------------------------------------------------


def ca_root_configmap(namespace: str, root_pem: str) -> dict[str, Any]:
    """The ConfigMap ``ambit-ca-root`` node pods mount to verify the controller's TLS."""
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": CA_ROOT_CONFIGMAP, "namespace": namespace,
                         "labels": dict(PART_OF)},
            "data": {CA_ROOT_KEY: root_pem}}


def plan_ca_root(live: Mapping[str, Any] | None, namespace: str, root_pem: str) \
        -> tuple[str, dict[str, Any]] | None:
    """("create" | "update", body) to make ``live`` (None: absent) carry the root and our
    labels; None when it already does. An update keeps other keys, labels and annotations."""
    desired = ca_root_configmap(namespace, root_pem)
    if live is None:
        return "create", desired
    meta = live.get("metadata") or {}
    labels = meta.get("labels") or {}
    data = live.get("data") or {}
    if data.get(CA_ROOT_KEY) == root_pem and all(labels.get(k) == v for k, v in PART_OF.items()):
        return None
    body = {k: v for k, v in live.items() if k not in ("binaryData",)}
    body["metadata"] = {**meta, "labels": {**labels, **PART_OF}}
    body["data"] = {**data, CA_ROOT_KEY: root_pem}
    if live.get("binaryData"):
        body["binaryData"] = {k: v for k, v in live["binaryData"].items() if k != CA_ROOT_KEY}
    return "update", body


async def ensure_ca_root(rest: Rest, namespace: str, root_pem: str) -> str:
    """Make ``namespace/ambit-ca-root`` hold the root: "created", "updated" or "unchanged".
    Raises ``ApiError`` (a 409 when someone else wrote it meanwhile: call again)."""
    live = await rest.get(CONFIG_MAPS, namespace, CA_ROOT_CONFIGMAP)
    plan = plan_ca_root(live, namespace, root_pem)
    if plan is None:
        return "unchanged"
    verb, body = plan
    if verb == "create":
        await rest.create(CONFIG_MAPS, namespace, body, FIELD_MANAGER)
        return "created"
    await rest.replace(CONFIG_MAPS, namespace, CA_ROOT_CONFIGMAP, body, FIELD_MANAGER)
    return "updated"


async def keep_ca_root(rest: Rest, namespace: str, root_pem: str | bytes, *,
                       resync: float = 60.0,
                       backoff: Callable[[], Backoff] = lambda: Backoff(initial=1.0, cap=30.0)) \
        -> None:
    """Leader-only: keep ``namespace/ambit-ca-root`` equal to the root, checking every
    ``resync`` seconds (retrying failures with backoff), until cancelled."""
    pem = root_pem.decode() if isinstance(root_pem, bytes) else root_pem
    where = f"ConfigMap {namespace}/{CA_ROOT_CONFIGMAP}"
    retry = backoff()
    last_problem = ""
    while True:
        try:
            outcome = await ensure_ca_root(rest, namespace, pem)
        except ApiError as e:
            problem = (f"cannot write {where}: forbidden ({e.message}); the controller's "
                       "service account needs get, create and update on configmaps"
                       if e.status == 403 else f"cannot write {where}: {e}")
            if e.status == 409:
                problem = f"{where} changed while being written"
            level = logging.WARNING if problem != last_problem else logging.DEBUG
            last_problem = problem
            delay = retry.delay()
            log.log(level, "%s; retrying in %.1fs", problem, delay)
            await asyncio.sleep(delay)
            continue
        if outcome != "unchanged":
            log.info("%s the mesh root's public certificate in %s", outcome, where)
        elif last_problem:
            log.info("%s holds the mesh root", where)
        last_problem = ""
        retry.reset()
        await asyncio.sleep(resync)
