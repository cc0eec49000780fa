"""Node credentials in Kubernetes mode: a ztunnel's service-account token, checked by TokenReview.

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
``ambit-system/ztunnel``) are node credentials: any other pod's token is rejected even though it
is genuine, or every pod could ask for its node's identities.

``authenticate`` returns the node name, or None for a token that does not prove one (logged
with the reason). An API server that cannot be asked raises ``TokenReviewUnavailable``: "cannot
check now" must not look like "wrong credential" to the caller.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from kubernetes_asyncio import client

from controller.ca_service import AuthenticatorUnavailable

log = logging.getLogger(__name__)

NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
SA_PREFIX = "system:serviceaccount:"


class TokenReviewUnavailable(AuthenticatorUnavailable):
    """The API server could not review the token (network, 5xx, permissions)."""


def _first(extra: Any, key: str) -> str | None:
    values = extra.get(key) if isinstance(extra, dict) else None
    if isinstance(values, list) and values and isinstance(values[0], str) and values[0]:
        return values[0]
    return None


class TokenReviewAuthenticator:
    def __init__(self, api: client.ApiClient, *,
                 allowed: Iterable[str] = ("ambit-system/ztunnel",),
                 audiences: Sequence[str] = ()) -> None:
        self._auth = client.AuthenticationV1Api(api)
        self._core = client.CoreV1Api(api)
        self._allowed = frozenset(allowed)
        self._audiences = list(audiences)

    async def authenticate(self, token: str) -> str | None:
        """The node ``token`` proves, or None; raises ``TokenReviewUnavailable``."""
        if not token:
            return None
        spec: dict[str, Any] = {"token": token}
        if self._audiences:
            spec["audiences"] = self._audiences
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        review = await self._call(self._auth.create_token_review, body)
        status = review.get("status") or {}
        if not status.get("authenticated"):
            log.info("node token rejected by TokenReview: %s", status.get("error") or
                     "not authenticated")
            return None
        user = status.get("user") or {}
        username = str(user.get("username") or "")
        if not username.startswith(SA_PREFIX):
            log.info("node token rejected: %s is not a service account", username)
            return None
        account = username.removeprefix(SA_PREFIX).replace(":", "/", 1)
        if account not in self._allowed:
            log.warning("node token rejected: service account %s is not a ztunnel's (allowed: "
                        "%s)", account, ", ".join(sorted(self._allowed)))
            return None
        extra = user.get("extra") or {}
        node = _first(extra, NODE_NAME_EXTRA)
        if node:
            return node
        return await self._node_of_pod(account.split("/", 1)[0], extra)

    async def _node_of_pod(self, namespace: str, extra: Any) -> str | None:
        pod_name, pod_uid = _first(extra, POD_NAME_EXTRA), _first(extra, POD_UID_EXTRA)
        if not pod_name:
            log.warning("node token rejected: not bound to a pod (no %s or %s extra; use a "
                        "projected service-account token)", NODE_NAME_EXTRA, POD_NAME_EXTRA)
            return None
        pod = await self._call(self._core.read_namespaced_pod, pod_name, namespace,
                               not_found_ok=True)
        if not pod:
            log.warning("node token rejected: its pod %s/%s no longer exists", namespace,
                        pod_name)
            return None
        uid = (pod.get("metadata") or {}).get("uid")
        if pod_uid and uid != pod_uid:
            log.warning("node token rejected: pod %s/%s has uid %s, the token was issued to %s",
                        namespace, pod_name, uid, pod_uid)
            return None
        node = (pod.get("spec") or {}).get("nodeName")
        if not node:
            log.warning("node token rejected: pod %s/%s is not scheduled (spec.nodeName empty)",
                        namespace, pod_name)
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
