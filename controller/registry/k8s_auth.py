"""CA credentials in Kubernetes mode: service-account tokens, checked by TokenReview.

Why TokenReview: the API server is the only party that can say a token is genuine, unexpired
and still bound to a live pod; we never verify JWTs ourselves. A token proves *which service
account* is calling; for a node credential we need *which node*, and we take it from the token:

1. the ``authentication.kubernetes.io/node-name`` extra, which the API server puts into bound
   tokens of pods (Kubernetes ≥ 1.30, ``ServiceAccountTokenPodNodeInfo``), signed at issuance,
   so it needs no further call and cannot be changed by the pod; else
2. the pod the token is bound to (``.../pod-name`` and ``.../pod-uid`` extras): we read that pod
   and take its ``spec.nodeName``, after checking its uid matches the token's, so a token of a
   deleted pod cannot borrow the node of a new pod with the same name.

Only the service accounts the ztunnel DaemonSet runs as (``allowed``, default
``ambit-system/ztunnel``) are node credentials: any other pod's token is never one, or every pod
could ask for its node's identities.

Waypoint pods ask the CA for their own certificate with their own projected token (audience
``ambit-ca``, see ``controller/waypoint/deploy.py``). With ``workload_audiences`` given
(``WORKLOAD_AUDIENCE``; off by default, so the ztunnel-only behaviour stays unless the
controller turns it on together with ``WorkloadScopedPolicy``), such a token, of any service
account but the ztunnel's, is accepted as a *workload credential* (``WorkloadCaller``): it must
be valid for ``workload_audiences`` (reviewed a second time with exactly those, so the default
API token every pod has is refused) and bound to a pod, and it can obtain one identity only,
its own, and only while its pod is a waypoint instance on the node the token names.
``authenticate`` returns it as a ``WorkloadCaller`` (a ``str``, so the CA's protocols are
unchanged) whose text is never a node name: a policy that does not know the type matches no
pod on it, and the NodeService refuses it (fail closed). ``WorkloadScopedPolicy`` is the
issuance policy that knows it.

``authenticate`` returns the node name (or a ``WorkloadCaller``), or None for a token that
proves neither (logged with the reason). An API server that cannot be asked raises
``TokenReviewUnavailable``: "cannot check now" must not look like "wrong credential".
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from kubernetes_asyncio import client

from controller.ca_service import AuthenticatorUnavailable, IssuancePolicy, MaybeAwaitable
from controller.registry.model import RegistrySnapshot
from controller.registry.translate import waypoint_of
from controller.waypoint.deploy import CA_AUDIENCE
from mesh.spiffe import SpiffeId

log = logging.getLogger(__name__)

# The audience of the projected tokens waypoint pods present to the CA (their Deployment's).
WORKLOAD_AUDIENCE = CA_AUDIENCE

NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
SA_PREFIX = "system:serviceaccount:"


class TokenReviewUnavailable(AuthenticatorUnavailable):
    """The API server could not review the token (network, 5xx, permissions)."""


class WorkloadCaller(str):
    """A pod's own service-account token (not a ztunnel's): one pod, on one node.

    Its text, ``"<node> (pod <ns>/<pod>, service account <sa>)"``, reads well in the CA's
    messages and can never be a Kubernetes node name, so code that takes it for a node finds
    nothing on it."""

    node: str
    namespace: str
    service_account: str
    pod: str

    def __new__(cls, node: str, namespace: str, service_account: str,
                pod: str) -> WorkloadCaller:
        self = super().__new__(
            cls, f"{node} (pod {namespace}/{pod}, service account {service_account})")
        self.node, self.namespace = node, namespace
        self.service_account, self.pod = service_account, pod
        return self


def _first(extra: Any, key: str) -> str | None:
    values = extra.get(key) if isinstance(extra, dict) else None
    if isinstance(values, list) and values and isinstance(values[0], str) and values[0]:
        return values[0]
    return None


class TokenReviewAuthenticator:
    """``allowed``: the ztunnels' service accounts (``namespace/name``); ``audiences``: what
    their tokens are reviewed against (empty: the API server's own audience);
    ``workload_audiences``: what other pods' tokens must be valid for to count as workload
    credentials (empty, the default: no workload credentials, only ztunnels; Kubernetes mode
    passes ``(WORKLOAD_AUDIENCE,)`` with ``WorkloadScopedPolicy`` as the CA's policy)."""

    def __init__(self, api: client.ApiClient, *,
                 allowed: Iterable[str] = ("ambit-system/ztunnel",),
                 audiences: Sequence[str] = (),
                 workload_audiences: Sequence[str] = ()) -> None:
        self._auth = client.AuthenticationV1Api(api)
        self._core = client.CoreV1Api(api)
        self._allowed = frozenset(allowed)
        self._audiences = list(audiences)
        self._workload_audiences = list(workload_audiences)

    async def authenticate(self, token: str) -> str | None:
        """The node a ztunnel's ``token`` proves, a ``WorkloadCaller`` for a waypoint pod's own
        token, or None; raises ``TokenReviewUnavailable``."""
        if not token:
            return None
        user, error = await self._review(token, self._audiences)
        account = _account(user)
        if user is not None and account in self._allowed:
            return await self._node(account, user, "node token")
        if not self._workload_audiences:
            self._reject(user, account, error)
            return None
        if self._audiences != self._workload_audiences:
            # Not a ztunnel's (or not valid for the ztunnels' audience): a workload token must
            # be valid for the workload audience, whatever else it is valid for.
            user, error = await self._review(token, self._workload_audiences)
            account = _account(user)
            if user is not None and account in self._allowed:
                return await self._node(account, user, "node token")
        if user is None or account is None:
            self._reject(user, account, error)
            return None
        namespace, service_account = account.split("/", 1)
        extra = user.get("extra") or {}
        pod = _first(extra, POD_NAME_EXTRA)
        if not pod:
            log.warning("workload token of %s rejected: not bound to a pod (use a projected "
                        "service-account token with audience %s)", account,
                        ", ".join(self._workload_audiences))
            return None
        node = await self._node(account, user, "workload token")
        if node is None:
            return None
        return WorkloadCaller(node, namespace, service_account, pod)

    async def _review(self, token: str,
                      audiences: Sequence[str]) -> tuple[dict[str, Any] | None, str]:
        """(the TokenReview's user, or None, and why not)."""
        spec: dict[str, Any] = {"token": token}
        if audiences:
            spec["audiences"] = list(audiences)
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        review = await self._call(self._auth.create_token_review, body)
        status = review.get("status") or {}
        if not status.get("authenticated"):
            return None, str(status.get("error") or "not authenticated")
        granted = status.get("audiences")
        if audiences and isinstance(granted, list) and not set(granted) & set(audiences):
            return None, f"token audiences {granted} are not {list(audiences)}"
        user = status.get("user")
        return (user if isinstance(user, dict) else {}), ""

    def _reject(self, user: dict[str, Any] | None, account: str | None, error: str) -> None:
        if user is None:
            log.info("node token rejected by TokenReview: %s", error)
        elif account is None:
            log.info("node token rejected: %s is not a service account",
                     user.get("username") or "(no user)")
        else:
            log.warning("node token rejected: service account %s is not a ztunnel's (allowed: "
                        "%s)", account, ", ".join(sorted(self._allowed)))

    async def _node(self, account: str, user: dict[str, Any], what: str) -> str | None:
        extra = user.get("extra") or {}
        node = _first(extra, NODE_NAME_EXTRA)
        if node:
            return node
        return await self._node_of_pod(account.split("/", 1)[0], extra, what)

    async def _node_of_pod(self, namespace: str, extra: Any,
                           what: str = "node token") -> str | None:
        pod_name, pod_uid = _first(extra, POD_NAME_EXTRA), _first(extra, POD_UID_EXTRA)
        if not pod_name:
            log.warning("%s rejected: not bound to a pod (no %s or %s extra; use a "
                        "projected service-account token)", what, NODE_NAME_EXTRA,
                        POD_NAME_EXTRA)
            return None
        pod = await self._call(self._core.read_namespaced_pod, pod_name, namespace,
                               not_found_ok=True)
        if not pod:
            log.warning("%s rejected: its pod %s/%s no longer exists", what, namespace,
                        pod_name)
            return None
        uid = (pod.get("metadata") or {}).get("uid")
        if pod_uid and uid != pod_uid:
            log.warning("%s rejected: pod %s/%s has uid %s, the token was issued to %s",
                        what, namespace, pod_name, uid, pod_uid)
            return None
        node = (pod.get("spec") or {}).get("nodeName")
        if not node:
            log.warning("%s rejected: pod %s/%s is not scheduled (spec.nodeName empty)",
                        what, namespace, pod_name)
            return None
        return str(node)

    @staticmethod
    async def _call(fn: Any, *args: Any, not_found_ok: bool = False) -> dict[str, Any]:
        try:
            resp = await fn(*args, _preload_content=False, _request_timeout=10)
            try:
                status, body = resp.status, await resp.read()
            finally:
                resp.release()
        except Exception as e:
            raise TokenReviewUnavailable(f"{type(e).__name__}: {e}") from e
        if status == 404 and not_found_ok:
            return {}
        if not 200 <= status < 300:
            raise TokenReviewUnavailable(f"API server answered {status}: {body[:200]!r}")
        doc = json.loads(body)
        if not isinstance(doc, dict):
            raise TokenReviewUnavailable(f"API server answered {body[:200]!r}")
        return doc


def _account(user: dict[str, Any] | None) -> str | None:
    """``namespace/name`` of the service account a reviewed token belongs to, or None."""
    username = str((user or {}).get("username") or "")
    if not username.startswith(SA_PREFIX):
        return None
    account = username.removeprefix(SA_PREFIX).replace(":", "/", 1)
    return account if "/" in account else None


class WorkloadScopedPolicy:
    """The CA's issuance policy for Kubernetes mode: node credentials (ztunnels) go to
    ``policy`` (a node may get the identities of its pods); a ``WorkloadCaller`` may get
    exactly one identity, its own service account's, and only while its pod is a waypoint
    instance (``gateway.networking.k8s.io/gateway-name`` label) scheduled on the node its token
    names, according to the registry's current ``snapshot``."""

    def __init__(self, policy: IssuancePolicy, snapshot: Callable[[], RegistrySnapshot],
                 trust_domain: str) -> None:
        self._policy = policy
        self._snapshot = snapshot
        self._trust_domain = trust_domain

    def may_issue(self, node: str, identity: SpiffeId) -> MaybeAwaitable[bool]:
        if not isinstance(node, WorkloadCaller):
            return self._policy.may_issue(node, identity)
        caller = node
        if (identity.trust_domain, identity.namespace, identity.service_account) != (
                self._trust_domain, caller.namespace, caller.service_account):
            log.warning("workload %s asked for %s: a workload token may obtain only its own "
                        "identity", caller, identity)
            return False
        for pod in self._snapshot().pods:
            if (pod.namespace, pod.name) == (caller.namespace, caller.pod):
                ok = (pod.node == caller.node and pod.service_account == caller.service_account
                      and waypoint_of(pod) is not None)
                if not ok:
                    log.warning("workload %s asked for %s: its pod is not a waypoint instance "
                                "on that node (only waypoint pods get certificates with their "
                                "own token)", caller, identity)
                return ok
        log.info("workload %s asked for %s: its pod is not in the registry (yet)", caller,
                 identity)
        return False
