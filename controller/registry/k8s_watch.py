"""A reflector: one Kubernetes resource kind mirrored into memory by list + watch.

Why this shape (client-go's Reflector, kopf's watcher): a watch alone misses whatever happened
before it started and while it was disconnected, and a periodic relist alone is slow and heavy.
So a reflector lists once (recording the list's ``resourceVersion``), then watches from that
version with bookmarks, and after every ending of the stream resumes from the last version it
saw, so nothing is missed and nothing is re-read:

* the server ends the stream (its ``timeoutSeconds`` or a disconnect): watch again from the
  last version at once; an error or a stream that ended at once without news: back off with
  jitter first, so a struggling API server is not hammered by every controller in step;
* ``410 Gone`` (the version was compacted away, as an ``ERROR`` event or an HTTP status):
  relist, because only a list can say what happened in the forgotten window;
* ``BOOKMARK`` events only move the version forward, so a resume after a quiet period does
  not start from a version the server has already forgotten.

The cache holds the raw JSON objects (dicts), keyed ``namespace/name``; turning them into
registry records is ``k8s_convert``'s job. Objects are never deserialized into the client's
generated models: the dicts are what the converters and the CRD schemas speak.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.watch import Watch

log = logging.getLogger(__name__)

# A kubernetes_asyncio list method (``CoreV1Api().list_pod_for_all_namespaces`` or a
# ``functools.partial`` of ``CustomObjectsApi().list_cluster_custom_object``).
ListFn = Callable[..., Awaitable[Any]]


class Gone(Exception):
    """The resourceVersion we hold is no longer served: relist."""


class NotServed(Exception):
    """The API server does not serve this resource (404): a CRD that is not installed."""


@dataclass
class Backoff:
    """Exponential backoff with jitter: ``initial * factor**n``, capped, stretched at random.

    The jitter (up to ``jitter`` times the delay, added) keeps many clients that failed together
    from retrying together.
    """

    initial: float = 0.8
    cap: float = 30.0
    factor: float = 2.0
    jitter: float = 1.0
    _next: float = 0.0

    def delay(self) -> float:
        base = self._next or self.initial
        self._next = min(self.cap, base * self.factor)
        return float(min(self.cap, base) * (1 + self.jitter * random.random()))

    def reset(self) -> None:
        self._next = 0.0


def object_key(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))


class Reflector:
    """Mirror one resource kind into ``cache``; call ``on_change`` after every change.

    ``optional``: a 404 on list (the CRD is not installed) counts as an empty, synced list,
    retried with backoff; no objects of an uninstalled kind can exist, so empty is the truth.
    That is logged once (a warning), not at every retry, and again once the kind is served.
    """

    def __init__(
        self,
        kind: str,
        list_fn: ListFn,
        on_change: Callable[[], None],
        *,
        backoff: Backoff | None = None,
        watch_timeout: tuple[float, float] = (300.0, 600.0),
        optional: bool = False,
    ) -> None:
        self.kind = kind
        self._list_fn = list_fn
        self._on_change = on_change
        self._backoff = backoff or Backoff()
        self._watch_timeout = watch_timeout
        self._optional = optional
        self.cache: dict[str, dict[str, Any]] = {}
        self.resource_version: str | None = None
        self.synced = asyncio.Event()
        # Counters for diagnostics and tests: how the reflector got where it is.
        self.lists = 0
        self.watches = 0
        self.relists_after_gone = 0
        self.not_served = False  # the last list found the kind not served (404)

    async def run(self) -> None:
        """Run until cancelled; never returns on errors, only backs off."""
        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                started = time.monotonic()
                news = await self._watch()
                if news or time.monotonic() - started > 1.0:
                    self._backoff.reset()
                else:
                    # Ended at once with nothing to say: do not spin on a server that does so.
                    await asyncio.sleep(self._backoff.delay())
            except Gone as e:
                self.relists_after_gone += 1
                log.info("%s: resourceVersion %s expired (%s); relisting", self.kind,
                         self.resource_version, e)
                self.resource_version = None
            except NotServed as e:
                delay = max(self._backoff.delay(), 1.0)
                log.log(logging.DEBUG if self.not_served else logging.WARNING,
                        "%s: %s; treating as empty, retrying in %.1fs", self.kind, e, delay)
                self.not_served = True
                if self.cache or not self.synced.is_set():
                    self.cache = {}
                    self.synced.set()
                    self._on_change()
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                delay = self._backoff.delay()
                log.warning("%s: %s: %s; retrying in %.2fs from resourceVersion %s", self.kind,
                            type(e).__name__, e, delay, self.resource_version or "(relist)")
                await asyncio.sleep(delay)

    async def _list(self) -> None:
        self.lists += 1
        resp = await self._list_fn(_preload_content=False, _request_timeout=60)
        try:
            body = await resp.read()
            status = resp.status
        finally:
            resp.release()
        if status == 404 and self._optional:
            raise NotServed(f"the API server does not serve {self.kind} (CRD not installed?)")
        if status == 410:
            raise Gone(_message(body))
        if not 200 <= status < 300:
            raise ApiException(status=status, reason=_message(body))
        if self.not_served:
            log.info("%s: now served by the API server", self.kind)
            self.not_served = False
        doc = json.loads(body)
        items = doc.get("items") or []
        self.cache = {object_key(o): o for o in items if isinstance(o, dict)}
        self.resource_version = str(doc["metadata"]["resourceVersion"])
        log.debug("%s: listed %d at resourceVersion %s", self.kind, len(self.cache),
                  self.resource_version)
        self.synced.set()
        self._on_change()

    async def _watch(self) -> bool:
        """One watch request, until the server ends it. True if any event arrived."""
        self.watches += 1
        timeout = random.uniform(*self._watch_timeout)
        news = False
        # return_type "object": keep events as the server's JSON, no model deserialization.
        watch = Watch(return_type="object")
        stream = watch.stream(
            self._list_fn,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            # A server-side timeout also turns off the client's own silent reconnects and
            # 410 retries: this class owns resumption.
            timeout_seconds=int(timeout),
            _request_timeout=aiohttp.ClientTimeout(total=None, sock_connect=30,
                                                   sock_read=timeout + 30),
        )
        async with watch:
            try:
                async for event in stream:
                    news = True
                    self._apply(event)
            except ApiException as e:
                if e.status == 410:
                    raise Gone(e.reason) from None
                if e.status == 404 and self._optional:
                    raise NotServed(f"the API server stopped serving {self.kind}") from None
                raise
        return news

    def _apply(self, event: Any) -> None:
        if not isinstance(event, dict):
            raise ValueError(f"malformed watch event: {str(event)[:200]!r}")
        kind = event.get("type")
        obj = event.get("raw_object")
        if not isinstance(obj, dict):
            raise ValueError(f"{kind} event without an object")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            if rv:
                self.resource_version = str(rv)
            return
        key = object_key(obj)
        if kind in ("ADDED", "MODIFIED"):
            self.cache[key] = obj
        elif kind == "DELETED":
            self.cache.pop(key, None)
        else:
            raise ValueError(f"unknown watch event type {kind!r}")
        if rv:
            self.resource_version = str(rv)
        self._on_change()


async def stop_tasks(tasks: Iterable[asyncio.Task[None]]) -> None:
    """Cancel the reflectors' (and their owner's) tasks, then wait for each to end; an error
    other than the cancellation is raised, not hidden."""
    tasks = list(tasks)
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t


def _message(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return body[:200].decode(errors="replace")
    if isinstance(doc, dict) and "message" in doc:
        return str(doc["message"])
    return body[:200].decode(errors="replace")
