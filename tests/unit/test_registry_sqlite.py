"""The embedded registry: all-or-nothing batches, revisions, tokens, and watching."""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from controller.registry.documents import (
    DocumentError,
    load_documents,
    parse_document,
    parse_documents,
    to_document,
)
from controller.registry.model import Namespace, Pod, RegistrySnapshot
from controller.registry.sqlite import EmbeddedRegistry, NotFoundError, RegistryError
from controller.registry.translate import mesh_config
from mesh.state.model import Protocol

DOCS = load_documents("""
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {ambit.dev/dataplane-mode: ambient}}
---
apiVersion: ambit.dev/v1
kind: Workload
metadata: {name: echo-1, namespace: default, labels: {app: echo}}
spec: {serviceAccount: echo, node: node-a, addresses: [10.0.2.5], workloadName: echo}
---
apiVersion: ambit.dev/v1
kind: Workload
metadata: {name: client, labels: {app: client}}
spec: {node: node-b, addresses: [10.0.1.5, "fd00::5"], ready: false}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: security.ambit.dev/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/default]}}]
    to: [{operation: {ports: ["8080"]}}]
---
apiVersion: security.ambit.dev/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec: {mtls: {mode: STRICT}}
""")


@pytest.fixture
def registry(tmp_path: Path) -> Any:
    with EmbeddedRegistry(tmp_path / "r.db") as r:
        yield r


def test_apply_and_snapshot(registry: EmbeddedRegistry) -> None:
    changes = registry.apply(DOCS)
    assert [str(c) for c in changes] == [
        "Namespace default created", "Workload default/echo-1 created",
        "Workload default/client created", "Service default/echo created",
        "AuthorizationPolicy default/allow-client created",
        "PeerAuthentication default/default created"]
    snap = registry.snapshot()
    assert snap.revision == 1 == registry.revision
    assert [p.key for p in snap.pods] == ["default/client", "default/echo-1"]
    client = snap.pods[0]
    assert client.ready is False and client.service_account == "default"
    assert client.ips == (ipaddress.ip_address("10.0.1.5"), ipaddress.ip_address("fd00::5"))
    assert snap.services[0].cluster_ips == (ipaddress.ip_address("10.96.0.10"),)
    assert snap.services[0].ports[0].target_port == 8080
    assert snap.peer_authentications[0].spec == {"mtls": {"mode": "STRICT"}}
    cfg = mesh_config(snap, "cluster.local", snap.revision)
    assert {w.name: w.protocol for w in cfg.workloads} == {"client": Protocol.HBONE,
                                                           "echo-1": Protocol.HBONE}
    assert cfg.version == "1" and len(cfg.policies) == 1


def test_reapply_is_unchanged_and_keeps_revision(registry: EmbeddedRegistry) -> None:
    registry.apply(DOCS)
    assert {c.action for c in registry.apply(DOCS)} == {"unchanged"}
    assert registry.revision == 1
    changed = copy.deepcopy(DOCS[1])
    changed["spec"]["ready"] = False
    assert [c.action for c in registry.apply([changed])] == ["configured"]
    assert registry.revision == 2


@pytest.mark.parametrize(("index", "edit", "message"), [
    (4, lambda d: d["spec"]["rules"][0]["from"][0]["source"].update(ipBlocks=["x"]),
     "document 5 (AuthorizationPolicy default/allow-client): "
     "spec.rules[0].from[0].source.ipBlocks[0]: 'x' is not an IP address or CIDR block"),
    (1, lambda d: d["spec"].update(addresses=["10.0.2.5", "nope"]),
     "document 2 (Workload default/echo-1): spec.addresses[1]: 'nope' is not an IP address"),
    (1, lambda d: d["spec"].pop("node"), "document 2 (Workload default/echo-1): spec.node: "
     "is required"),
    (3, lambda d: d["spec"]["ports"][0].update(targetPort="http"),
     "document 4 (Service default/echo): spec.ports[0].targetPort: 'http' is not a port number"),
    (0, lambda d: d["metadata"]["labels"].update({"ambit.dev/dataplane-mode": "Ambient"}),
     "document 1 (Namespace default): metadata.labels.ambit.dev/dataplane-mode: 'Ambient' is "
     "not a data-plane mode"),
    (5, lambda d: d.update(apiVersion="security.istio.io/v1"),
     "document 6 (PeerAuthentication default/default): apiVersion: 'security.istio.io/v1' "
     "does not serve PeerAuthentication; use apiVersion: security.ambit.dev/v1"),
    (1, lambda d: d["metadata"].update(name="Echo_1"),
     "document 2 (Workload default/Echo_1): metadata.name: 'Echo_1' is not a valid DNS name"),
    (2, lambda d: d["spec"].update(addresses=["10.0.2.5"]),
     "document 3 (Workload default/client): spec.addresses[0]: 10.0.2.5 is already used by "
     "Workload default/echo-1"),
    (3, lambda d: d["spec"].update(clusterIP="10.0.1.5"),
     "document 4 (Service default/echo): spec.clusterIPs[0]: 10.0.1.5 is already used by "
     "Workload default/client"),
    (2, lambda d: d.update(metadata={"name": "echo-1"}),
     "document 3 (Workload default/echo-1): the same object as document 2"),
    (1, lambda d: d.update(kind="Pod"), "document 2 (Pod default/echo-1): kind: 'Pod' is not a "
     "registry kind"),
])
def test_bad_document_rejects_the_whole_batch(registry: EmbeddedRegistry, index: int,
                                              edit: Any, message: str) -> None:
    registry.apply(DOCS[:1])
    before = registry.snapshot()
    docs = copy.deepcopy(DOCS)
    edit(docs[index])
    with pytest.raises(DocumentError) as e:
        registry.apply(docs)
    assert str(e.value).startswith(message)
    assert registry.snapshot() == before and registry.revision == 1


def test_conflict_with_stored_object_rolls_back_everything(registry: EmbeddedRegistry) -> None:
    registry.apply(DOCS)
    new = copy.deepcopy(DOCS[1])
    new["metadata"]["name"] = "echo-2"
    new["spec"]["addresses"] = ["10.0.2.6"]
    thief = copy.deepcopy(DOCS[2])
    thief["metadata"]["name"] = "thief"
    thief["spec"]["addresses"] = ["10.96.0.10"]
    with pytest.raises(DocumentError, match=r"document 2 \(Workload default/thief\): "
                       r"spec.addresses\[0\]: 10.96.0.10 is already used by Service default/echo"):
        registry.apply([new, thief])
    assert registry.get("Workload", "default", "echo-2") is None and registry.revision == 1
    # Replacing an object may keep its own addresses.
    moved = copy.deepcopy(DOCS[1])
    moved["spec"]["node"] = "node-c"
    registry.apply([moved])
    got = registry.get("Workload", "default", "echo-1")
    assert isinstance(got, Pod) and got.node == "node-c"


def test_failure_mid_write_rolls_back(registry: EmbeddedRegistry,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    registry.apply(DOCS[:1])
    before = registry.snapshot()
    calls = 0
    real = to_document

    def failing(record: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError("disk on fire")
        return real(record)

    # The write loop serializes each record just before storing it: fail on the third.
    monkeypatch.setattr("controller.registry.sqlite.to_document", failing)
    with pytest.raises(OSError):
        registry.apply(DOCS)
    monkeypatch.undo()
    assert calls == 3 and registry.snapshot() == before


def test_canonical_documents_round_trip() -> None:
    for doc in DOCS:
        record = parse_document(doc)
        assert parse_document(to_document(record)) == record


def test_delete_and_namespace_cascade(registry: EmbeddedRegistry) -> None:
    registry.apply(DOCS)
    assert [str(c) for c in registry.delete("Service", "default", "echo")] == [
        "Service default/echo deleted"]
    assert registry.revision == 2
    with pytest.raises(NotFoundError, match="Service default/echo is not registered"):
        registry.delete("Service", "default", "echo")
    with pytest.raises(RegistryError, match="'Pod' is not a registry kind"):
        registry.delete("Pod", "default", "x")
    registry.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}}])
    deleted = registry.delete("Namespace", "", "default")
    assert len(deleted) == 5 and registry.revision == 4
    assert registry.snapshot() == RegistrySnapshot(namespaces=(Namespace("other"),), revision=4)


def test_namespace_enable_disable(registry: EmbeddedRegistry) -> None:
    registry.apply([{"apiVersion": "v1", "kind": "Namespace",
                     "metadata": {"name": "shop", "labels": {"team": "a"}}}])
    assert registry.set_namespace_mode("shop", ambient=True).action == "configured"
    ns = registry.get("Namespace", "", "shop")
    assert isinstance(ns, Namespace) and ns.ambient and dict(ns.labels)["team"] == "a"
    assert registry.set_namespace_mode("shop", ambient=True).action == "unchanged"
    assert registry.revision == 2
    registry.set_namespace_mode("shop", ambient=False)
    assert registry.get("Namespace", "", "shop") == Namespace("shop", (("team", "a"),))
    assert registry.set_namespace_mode("new", ambient=True).action == "created"
    with pytest.raises(NotFoundError, match="namespace gone is not registered"):
        registry.set_namespace_mode("gone", ambient=False)
    with pytest.raises(RegistryError, match="not a valid DNS label"):
        registry.set_namespace_mode("Bad_Name", ambient=True)


def test_node_tokens(registry: EmbeddedRegistry, tmp_path: Path) -> None:
    a1 = registry.issue_node_token("node-a")
    a2 = registry.issue_node_token("node-a")
    b = registry.issue_node_token("node-b")
    assert len({a1, a2, b}) == 3
    assert registry.node_for_token(a1) == "node-a" == registry.node_for_token(a2 + "\n")
    assert registry.node_for_token(b) == "node-b"
    token_id, _, secret = a1.partition(".")
    for bad in ("", token_id, f"{token_id}.", f"{token_id}.{secret[:-1]}x", f"nope.{secret}",
                f"{b.partition('.')[0]}.{secret}"):
        assert registry.node_for_token(bad) is None, bad
    # Only hashes are stored.
    raw = (tmp_path / "r.db").read_bytes() + (tmp_path / "r.db-wal").read_bytes()
    assert secret.encode() not in raw and token_id.encode() in raw
    assert registry.revision == 0  # tokens are not mesh state
    assert [t.node for t in registry.node_tokens()] == ["node-a", "node-a", "node-b"]
    assert registry.revoke_node_tokens("node-a") == 2
    assert registry.node_for_token(a1) is None and registry.node_for_token(b) == "node-b"
    with pytest.raises(RegistryError, match="node: 'Node A' is not a valid DNS name"):
        registry.issue_node_token("Node A")


def test_second_process_sees_commits_and_waits_for_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    with EmbeddedRegistry(path) as writer, EmbeddedRegistry(path, timeout=0.2) as other:
        writer.apply(DOCS[:2])
        assert other.revision == 1 and len(other.snapshot().pods) == 1
        # Hold the write lock from a raw connection: the other writer gives up with a message.
        raw = sqlite3.connect(path, isolation_level=None)
        raw.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(RegistryError, match="is busy"):
                other.apply(DOCS[2:3])
            assert other.revision == 1  # readers are not blocked by the writer
        finally:
            raw.execute("ROLLBACK")
            raw.close()
        other.apply(DOCS[2:3])
        assert writer.revision == 2


def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    path.write_text("hello, this is not sqlite" * 100)
    with pytest.raises(RegistryError, match="is not a usable registry database"):
        EmbeddedRegistry(path)


async def test_watch_yields_on_writes_from_another_connection(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    with EmbeddedRegistry(path) as watched, EmbeddedRegistry(path) as writer:
        seen: list[RegistrySnapshot] = []
        got = asyncio.Event()

        async def consume() -> None:
            async for snap in watched.watch(interval=0.01):
                seen.append(snap)
                got.set()

        task = asyncio.create_task(consume())
        try:
            await asyncio.wait_for(got.wait(), 5)
            assert [s.revision for s in seen] == [0]
            got.clear()
            await asyncio.to_thread(writer.apply, DOCS[:2])
            await asyncio.wait_for(got.wait(), 5)
            assert seen[-1].revision == 1 and [p.name for p in seen[-1].pods] == ["echo-1"]
            # An unchanged re-apply does not bump the revision, so nothing is yielded.
            got.clear()
            await asyncio.to_thread(writer.apply, DOCS[:2])
            await asyncio.sleep(0.1)
            assert not got.is_set() and len(seen) == 2
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


@pytest.mark.parametrize(("doc", "message"), [
    ({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
      "spec": {"clusterIP": "None", "ports": [{"port": 80}]}},
     "spec.clusterIP: headless services have no virtual IP"),
    ({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
      "spec": {"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.2"], "ports": [{"port": 80}]}},
     "spec.clusterIP: 10.96.0.1 must equal spec.clusterIPs[0]"),
    ({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
      "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 53, "protocol": "UDP"}]}},
     "spec.ports[0].protocol: 'UDP': the mesh carries TCP only"),
    ({"apiVersion": "security.ambit.dev/v1", "kind": "PeerAuthentication",
      "metadata": {"name": "s", "labels": {"a": "b"}}, "spec": {}},
     "metadata.labels: labels on a PeerAuthentication have no effect"),
    ({"apiVersion": "ambit.dev/v1", "kind": "Workload",
      "metadata": {"name": "w", "labels": {"version": 1}},
      "spec": {"node": "n", "addresses": ["10.0.0.1"]}},
     "metadata.labels.version: label values are strings; quote it: '1'"),
    ({"apiVersion": "ambit.dev/v1", "kind": "Workload", "metadata": {"name": "w"},
      "spec": {"node": "n", "addresses": ["10.0.0.1", "10.0.0.1"]}},
     "spec.addresses[1]: 10.0.0.1 is listed twice"),
    ({"apiVersion": "ambit.dev/v1", "kind": "Workload", "metadata": {"name": "w"},
      "spec": {"node": "n", "addresses": ["10.0.0.1"], "ready": "yes"}},
     "spec.ready: expected true or false, got 'yes'"),
    ({"apiVersion": "ambit.dev/v1", "kind": "Workload", "metadata": {"name": "w"},
      "spec": {"node": "n", "address": ["10.0.0.1"]}},
     "spec.address: unknown field; expected one of: addresses, node, ready"),
    ({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a", "namespace": "b"}},
     "metadata.namespace: a Namespace is not namespaced"),
    ({"apiVersion": "security.ambit.dev/v1", "kind": "AuthorizationPolicy",
      "metadata": {"name": "p"}, "spec": {"rules": [{"to": [{"operation": {"paths": ["/"]}}]}]}},
     "spec.rules[0].to[0].operation.paths: is an L7 attribute"),
])
def test_document_errors(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(DocumentError) as e:
        parse_documents([doc])
    assert message in str(e.value)


def test_load_documents_skips_empty_and_unwraps_lists() -> None:
    docs = load_documents("---\nkind: List\nitems: [{a: 1}, {b: 2}]\n---\n---\n{c: 3}\n")
    assert docs == [{"a": 1}, {"b": 2}, {"c": 3}]
    with pytest.raises(ValueError, match=r"f\.yaml: not valid YAML"):
        load_documents("a: [", "f.yaml")
