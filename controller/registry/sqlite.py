"""The embedded registry: the mesh's objects in one SQLite file, for hosts without Kubernetes.

Why SQLite: ``ambit`` commands (one short-lived writer at a time) and the controller (a
long-running reader) are separate processes that must agree on one consistent state. SQLite in
WAL mode gives exactly that with the standard library: writes are transactions (a batch of
documents is applied whole or not at all), readers never block the writer, and a reader sees
one committed state per read transaction.

Every change to the objects bumps a revision counter in the same transaction, so the
controller notices changes from other processes by polling one integer row, cheaply, and the
revision doubles as the version of the mesh state pushed to ztunnels. Node tokens are not
part of the mesh state and do not bump it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from controller.registry.documents import (
    KINDS,
    DocumentError,
    describe,
    find_address_conflict,
    key_of,
    parse_document,
    parse_documents,
    to_document,
)
from controller.registry.fields import dns_name
from controller.registry.model import (
    AMBIENT,
    DATAPLANE_MODE_LABEL,
    AuthorizationPolicy,
    Namespace,
    NodeToken,
    PeerAuthentication,
    Pod,
    Record,
    RegistrySnapshot,
    Service,
)
from controller.waypoint.model import Gateway, HTTPFault, HTTPRoute, TCPRoute
from mesh.state.parse import StateError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('revision', 0), ('schema', 1);
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    document TEXT NOT NULL,
    PRIMARY KEY (kind, namespace, name)
);
CREATE TABLE IF NOT EXISTS node_tokens (
    token_id TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    secret_sha256 BLOB NOT NULL,
    issued_at REAL NOT NULL
);
"""


class RegistryError(ValueError):
    """A request the registry refuses; the message says what is wrong and how to fix it."""


class NotFoundError(RegistryError):
    pass


@dataclass(frozen=True)
class Change:
    """What one write did to one object: created, configured, unchanged or deleted."""

    kind: str
    namespace: str
    name: str
    action: str

    def __str__(self) -> str:
        return f"{describe(self.kind, self.namespace, self.name)} {self.action}"


def _sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


class EmbeddedRegistry:
    """One registry database. Safe to share between threads; one writer process at a time
    (others wait up to ``timeout`` seconds for the write lock)."""

    def __init__(self, path: str | Path, *, timeout: float = 10.0) -> None:
        self.path = Path(path)
        try:
            self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None,
                                       check_same_thread=False)
        except sqlite3.OperationalError as e:
            raise RegistryError(f"cannot open registry {self.path}: {e}") from None
        # One connection shared by threads (watch reads in a worker thread): sqlite3 objects
        # are not safe for concurrent use, so every use holds this lock.
        self._lock = threading.Lock()
        self._parsed: dict[str, Record] = {}  # document text -> record (see _records)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            with self._write() as db:
                # Statement by statement: executescript() would commit the transaction.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                (schema,) = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise RegistryError(f"{self.path} is not a usable registry database: {e}") from None
        if schema > SCHEMA_VERSION:
            self._db.close()
            raise RegistryError(f"{self.path} was written by a newer ambit (schema {schema}); "
                                "upgrade this ambit")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> EmbeddedRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transactions ------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so the checks a write makes against the
        # current content (conflicts, unchanged objects) cannot be invalidated by another
        # process committing in between.
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                raise RegistryError(f"registry {self.path} is busy ({e}); another ambit "
                                    "command is writing it, try again") from None
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        # A deferred transaction: every SELECT in it sees the same committed state.
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")

    @staticmethod
    def _bump(db: sqlite3.Connection) -> None:
        db.execute("UPDATE meta SET value = value + 1 WHERE key = 'revision'")

    # --- reading -----------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        with self._read() as db:
            return int(db.execute("SELECT value FROM meta WHERE key='revision'").fetchone()[0])

    def snapshot(self) -> RegistrySnapshot:
        with self._read() as db:
            (revision,) = db.execute("SELECT value FROM meta WHERE key='revision'").fetchone()
            records = self._records(db)
        return RegistrySnapshot(
            namespaces=tuple(r for r in records if isinstance(r, Namespace)),
            pods=tuple(r for r in records if isinstance(r, Pod)),
            services=tuple(r for r in records if isinstance(r, Service)),
            authorization_policies=tuple(r for r in records
                                         if isinstance(r, AuthorizationPolicy)),
            peer_authentications=tuple(r for r in records if isinstance(r, PeerAuthentication)),
            gateways=tuple(r for r in records if isinstance(r, Gateway)),
            http_routes=tuple(r for r in records if isinstance(r, HTTPRoute)),
            http_faults=tuple(r for r in records if isinstance(r, HTTPFault)),
            tcp_routes=tuple(r for r in records if isinstance(r, TCPRoute)),
            revision=int(revision),
        )

    def _records(self, db: sqlite3.Connection, kinds: Sequence[str] = ()) -> list[Record]:
        query = "SELECT kind, namespace, name, document, rowid FROM objects"
        if kinds:
            query += f" WHERE kind IN ({','.join('?' * len(kinds))})"
        out: list[Record] = []
        # Stored documents are canonical JSON, so equal text means an equal record: parse only
        # what changed since the last read. With 10,000 workloads this turns a 250 ms
        # snapshot into a 30 ms one, which is most of the config push latency.
        cache = self._parsed
        seen: dict[str, Record] = {}
        for kind, namespace, name, document, rowid in db.execute(
                query + " ORDER BY kind, namespace, name", tuple(kinds)):
            record = cache.get(document)
            if record is None:
                try:
                    record = parse_document(json.loads(document))
                except (StateError, ValueError) as e:
                    raise RegistryError(f"stored {describe(kind, namespace, name)} does not "
                                        f"load ({e}); delete it and apply it again") from None
            seen[document] = record
            if isinstance(record, HTTPRoute | TCPRoute):
                # Gateway API precedence between routes is by age: the row id is the order of
                # first creation (updates keep the row, see _put_in).
                record = replace(record, creation_index=int(rowid))
            out.append(record)
        if kinds:
            cache.update(seen)
        else:
            self._parsed = seen  # a full read: forget documents that are gone
        return out

    def get(self, kind: str, namespace: str, name: str) -> Record | None:
        with self._read() as db:
            return self._get(db, kind, namespace, name)

    def _get(self, db: sqlite3.Connection, kind: str, namespace: str,
             name: str) -> Record | None:
        row = db.execute("SELECT document, rowid FROM objects WHERE kind=? AND namespace=? "
                         "AND name=?", (kind, namespace, name)).fetchone()
        if row is None:
            return None
        record = parse_document(json.loads(row[0]))
        if isinstance(record, HTTPRoute | TCPRoute):
            record = replace(record, creation_index=int(row[1]))
        return record

    async def watch(self, interval: float = 0.1) -> AsyncIterator[RegistrySnapshot]:
        """The current snapshot, then a new one each time the revision changes (by this or any
        other process). Reads run in a worker thread so a busy disk never stalls the loop."""
        snapshot = await asyncio.to_thread(self.snapshot)
        yield snapshot
        last = snapshot.revision
        while True:
            await asyncio.sleep(interval)
            if await asyncio.to_thread(lambda: self.revision) == last:
                continue
            snapshot = await asyncio.to_thread(self.snapshot)
            last = snapshot.revision
            yield snapshot

    # --- writing -----------------------------------------------------------------------------

    def apply(self, documents: Sequence[Any]) -> list[Change]:
        """Create or replace every object in ``documents``, all in one transaction or none.

        Raises ``DocumentError`` naming the document and field of the first problem."""
        records = parse_documents(documents)
        return self._put(records)

    def _put(self, records: Sequence[Record]) -> list[Change]:
        with self._write() as db:
            return self._put_in(db, records)

    def _put_in(self, db: sqlite3.Connection, records: Sequence[Record]) -> list[Change]:
        changes: list[Change] = []
        conflict = find_address_conflict(records, self._records(db, ("Workload", "Service")))
        if conflict is not None:
            index, path, problem = conflict
            raise DocumentError(index, describe(*key_of(records[index])),
                                StateError(path, problem))
        for record in records:
            kind, namespace, name = key_of(record)
            document = json.dumps(to_document(record), sort_keys=True)
            row = db.execute("SELECT document FROM objects WHERE kind=? AND namespace=? "
                             "AND name=?", (kind, namespace, name)).fetchone()
            if row is not None and row[0] == document:
                changes.append(Change(kind, namespace, name, "unchanged"))
                continue
            if row is None:
                db.execute("INSERT INTO objects (kind, namespace, name, document) "
                           "VALUES (?, ?, ?, ?)", (kind, namespace, name, document))
            else:
                # UPDATE, not INSERT OR REPLACE: the row (and its rowid, the object's creation
                # order) stays, as an object's creationTimestamp does in Kubernetes.
                db.execute("UPDATE objects SET document=? WHERE kind=? AND namespace=? "
                           "AND name=?", (document, kind, namespace, name))
            changes.append(Change(kind, namespace, name,
                                  "created" if row is None else "configured"))
        # A batch that changes nothing leaves the revision alone: no push to ztunnels.
        if any(c.action != "unchanged" for c in changes):
            self._bump(db)
        return changes

    def delete(self, kind: str, namespace: str, name: str) -> list[Change]:
        """Delete one object; deleting a Namespace deletes everything in it, as in
        Kubernetes. Raises ``NotFoundError`` if there is no such object."""
        if kind not in KINDS:
            raise RegistryError(f"{kind!r} is not a registry kind; expected one of: "
                                f"{', '.join(KINDS)}")
        if kind == "Namespace":
            namespace = ""
        with self._write() as db:
            deleted = db.execute("DELETE FROM objects WHERE kind=? AND namespace=? AND name=?",
                                 (kind, namespace, name)).rowcount
            if not deleted:
                raise NotFoundError(f"{describe(kind, namespace, name)} is not registered "
                                    "(list objects with `ambit get`)")
            changes = [Change(kind, namespace, name, "deleted")]
            if kind == "Namespace":
                contained = db.execute("DELETE FROM objects WHERE namespace=? "
                                       "RETURNING kind, name", (name,)).fetchall()
                changes += [Change(k, name, n, "deleted") for k, n in sorted(contained)]
            self._bump(db)
        return changes

    def set_namespace_mode(self, name: str, ambient: bool) -> Change:
        """Enable (label ``ambit.dev/dataplane-mode=ambient``, creating the namespace if it
        is new) or disable (remove the label) a namespace's pods in the mesh."""
        try:
            dns_name(name, "name", label=True)
        except StateError as e:
            raise RegistryError(f"namespace {e}") from None
        # Read and write in one transaction, so labels another process sets meanwhile are
        # not lost.
        with self._write() as db:
            current = self._get(db, "Namespace", "", name)
            if current is None and not ambient:
                raise NotFoundError(f"namespace {name} is not registered, so it is not in the "
                                    "mesh (list namespaces with `ambit get namespaces`)")
            labels = dict(current.labels) if isinstance(current, Namespace) else {}
            if ambient:
                labels[DATAPLANE_MODE_LABEL] = AMBIENT
            else:
                labels.pop(DATAPLANE_MODE_LABEL, None)
            (change,) = self._put_in(db, [Namespace(name, tuple(sorted(labels.items())))])
        return change

    # --- node tokens -------------------------------------------------------------------------

    def issue_node_token(self, node: str) -> str:
        """A new secret token for ``node`` (``<id>.<secret>``); only its hash is stored, so it
        is shown once. Earlier tokens of the node stay valid until revoked."""
        try:
            dns_name(node, "node")
        except StateError as e:
            raise RegistryError(str(e)) from None
        token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        with self._write() as db:
            db.execute("INSERT INTO node_tokens (token_id, node, secret_sha256, issued_at) "
                       "VALUES (?, ?, ?, ?)", (token_id, node, _sha256(secret), time.time()))
        return f"{token_id}.{secret}"

    def node_for_token(self, token: str) -> str | None:
        """The node a token was issued to, or None for an unknown, revoked or malformed one."""
        token_id, _, secret = token.strip().partition(".")
        with self._read() as db:
            row = db.execute("SELECT node, secret_sha256 FROM node_tokens WHERE token_id=?",
                             (token_id,)).fetchone()
        # Compare in constant time even for an unknown id, so timing tells nothing about the
        # secret (the id is not secret; it only selects the row).
        node, expected = row if row is not None else (None, b"\0" * 32)
        ok = hmac.compare_digest(_sha256(secret), bytes(expected))
        return node if ok and node is not None and secret else None

    def node_tokens(self) -> tuple[NodeToken, ...]:
        with self._read() as db:
            rows = db.execute("SELECT token_id, node, secret_sha256, issued_at FROM node_tokens "
                              "ORDER BY node, issued_at").fetchall()
        return tuple(NodeToken(t, n, bytes(s), float(at)) for t, n, s, at in rows)

    def revoke_node_tokens(self, node: str, token_id: str | None = None) -> int:
        """Revoke every token of ``node``, or only the one with ``token_id`` (the part of the
        token before the dot, so an old token can be revoked after a new one is issued).
        Returns how many were revoked."""
        with self._write() as db:
            if token_id is None:
                cursor = db.execute("DELETE FROM node_tokens WHERE node=?", (node,))
            else:
                cursor = db.execute("DELETE FROM node_tokens WHERE node=? AND token_id=?",
                                    (node, token_id))
            return int(cursor.rowcount)
