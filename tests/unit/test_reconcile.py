"""The agent's reconcile as a table: which pods to capture, release, or look for."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.pods import LocalPod, PodTable, Tombstone
from agent.reconcile import (
    MAX_TOMBSTONES,
    TOMBSTONE_SETTLE,
    TOMBSTONE_TTL,
    MeshPod,
    Plan,
    adoption,
    desired,
    plan,
    prune,
)


def lp(uid: str, ip: str, decision: bool | None = None) -> LocalPod:
    return LocalPod(uid, (ip,), f"veth-{uid.split('/')[1]}", decision=decision)


A = lp("ns/a", "10.0.0.2", decision=True)   # CNI ADD said: in the mesh
B = lp("ns/b", "10.0.0.3", decision=False)  # CNI ADD said: not in the mesh
C = lp("ns/c", "10.0.0.4")                  # found on the node, no CNI record


@pytest.mark.parametrize(("pod", "mesh", "want"), [
    (A, {}, True),                                          # no IP in the registry yet
    (B, {}, False),
    (C, {}, False),
    (A, {"10.0.0.2": MeshPod("ns/a", False)}, False),       # opted out later
    (B, {"10.0.0.3": MeshPod("ns/b", True)}, True),         # namespace enabled later
    (C, {"10.0.0.4": MeshPod("ns/c", True)}, True),
    (A, {"10.0.0.9": MeshPod("ns/x", False)}, True),        # other pods do not matter
    # the push still gives A's IP to a deleted pod: says nothing about A, A's ADD decides
    (A, {"10.0.0.2": MeshPod("ns/old", False)}, True),
    (B, {"10.0.0.3": MeshPod("ns/old", True)}, False),
])
def test_desired(pod: LocalPod, mesh: dict[str, MeshPod], want: bool) -> None:
    assert desired(pod, mesh) is want


@pytest.mark.parametrize(("local", "mesh", "enrolled", "expected"), [
    # nothing to do when kernel and wishes agree
    ({"ns/a": A, "ns/b": B}, {}, {"10.0.0.2"}, Plan()),
    # a new mesh pod is enrolled; a pod that should not be captured is released
    ({"ns/a": A, "ns/b": B}, {}, {"10.0.0.3"}, Plan(enroll=(A,), unenroll=(B,))),
    # the registry changes its mind (namespace enabled / pod opted out)
    ({"ns/a": A, "ns/b": B},
     {"10.0.0.2": MeshPod("ns/a", False), "10.0.0.3": MeshPod("ns/b", True)},
     {"10.0.0.2"}, Plan(enroll=(B,), unenroll=(A,))),
    # captured by a previous agent, pod unknown, not in the mesh: release
    ({}, {}, {"10.0.0.7"}, Plan(release=("10.0.0.7",))),
    # captured or not, a mesh pod of this node we have no record of: look for it, keep it
    ({}, {"10.0.0.7": MeshPod("ns/z", True)}, {"10.0.0.7"}, Plan(discover=("10.0.0.7",))),
    ({}, {"10.0.0.7": MeshPod("ns/z", True), "10.0.0.8": MeshPod("ns/y", False)}, set(),
     Plan(discover=("10.0.0.7",))),
])
def test_plan(local: dict[str, LocalPod], mesh: dict[str, MeshPod], enrolled: set[str],
              expected: Plan) -> None:
    assert plan(local, mesh, enrolled) == expected


def test_plan_is_deterministic() -> None:
    local = {p.uid: p for p in (B, A)}
    assert plan(local, {}, set()).enroll == (A,)
    assert plan(dict(reversed(local.items())), {}, set()) == plan(local, {}, set())


# --- deletes, tombstones and live evidence (issue 19) ------------------------------------------

T0 = 1000.0
X_IP = "10.0.0.7"
X = lp("ns/x", X_IP, decision=True)          # a mesh pod, then CNI DEL
DEAD_X = Tombstone.of(X, T0)
Y = lp("ns/y", X_IP, decision=True)          # a new pod the CNI gave X's address
X_LISTED = {X_IP: MeshPod("ns/x", True)}     # the push lags: it still lists X


@pytest.mark.parametrize(("local", "mesh", "enrolled", "deleted", "gone", "expected"), [
    # deleted pod still in the registry: not looked for, not adopted
    ({}, X_LISTED, set(), (DEAD_X,), set(), Plan()),
    # ... and if something still captures its IP, that is released
    ({}, X_LISTED, {X_IP}, (DEAD_X,), set(), Plan(release=(X_IP,))),
    # without the tombstone the same push would make the agent look for it
    ({}, X_LISTED, set(), (), set(), Plan(discover=(X_IP,))),
    # a tombstone of X does not hold back another pod of the push
    ({}, {**X_LISTED, "10.0.0.8": MeshPod("ns/z", True)}, set(), (DEAD_X,), set(),
     Plan(discover=("10.0.0.8",))),
    # a tombstone of X at another IP (an earlier incarnation) does not hold X back
    ({}, {"10.0.0.9": MeshPod("ns/x", True)}, set(), (DEAD_X,), set(),
     Plan(discover=("10.0.0.9",))),
    # new pod with the tombstoned pod's IP: enrolled, its CNI ADD wins over the lagging push
    ({"ns/y": Y}, X_LISTED, set(), (DEAD_X,), set(), Plan(enroll=(Y,))),
    # ... also when the lagging push says the old pod was not in the mesh
    ({"ns/y": Y}, {X_IP: MeshPod("ns/x", False)}, set(), (DEAD_X,), set(), Plan(enroll=(Y,))),
    # a local pod whose interface is gone: forgotten (released, record dropped), not enrolled
    ({"ns/x": X}, X_LISTED, set(), (), {"ns/x"}, Plan(forget=(X,))),
    ({"ns/x": X, "ns/a": A}, {}, {X_IP}, (), {"ns/x"}, Plan(enroll=(A,), forget=(X,))),
])
def test_plan_deletes(local: dict[str, LocalPod], mesh: dict[str, MeshPod], enrolled: set[str],
                      deleted: tuple[Tombstone, ...], gone: set[str], expected: Plan) -> None:
    assert plan(local, mesh, enrolled, deleted, gone) == expected


@pytest.mark.parametrize(("ip", "mesh", "deleted", "iface", "adopted", "why"), [
    # a pod predating the agent, its route over a live veth: adopted with all its IPs
    (X_IP, {**X_LISTED, "10.0.0.9": MeshPod("ns/x", True)}, (), "veth-x", ("10.0.0.7",
                                                                           "10.0.0.9"), "live"),
    # deleted pod whose netns (and so its veth and route) is gone: not adopted
    (X_IP, X_LISTED, (), None, None, "no route to it over a pod interface"),
    # deleted pod still routed (the main plugin's DEL has not run yet): the tombstone wins
    (X_IP, X_LISTED, (DEAD_X,), "veth-x", None, "was deleted (CNI DEL)"),
    # the push dropped it, or it left the mesh, since the plan
    (X_IP, {}, (), "veth-x", None, "no longer a mesh pod"),
    (X_IP, {X_IP: MeshPod("ns/x", False)}, (), "veth-x", None, "no longer a mesh pod"),
])
def test_adoption_needs_live_evidence(ip: str, mesh: dict[str, MeshPod],
                                      deleted: tuple[Tombstone, ...], iface: str | None,
                                      adopted: tuple[str, ...] | None, why: str) -> None:
    got = adoption(ip, mesh, deleted, iface)
    assert why in got.reason
    if adopted is None:
        assert got.pod is None
    else:
        assert got.pod is not None and got.pod.ips == adopted and got.pod.host_iface == iface
        assert got.pod.decision is None and "found on the node" in got.pod.reason


LATER = T0 + TOMBSTONE_SETTLE


@pytest.mark.parametrize(("mesh", "local", "now", "kept"), [
    # the push still lists the deleted pod: kept
    (X_LISTED, {}, T0 + 1, True),
    (X_LISTED, {}, T0 + TOMBSTONE_TTL - 1, True),
    # the push dropped the pod: cleared, once it had time to catch up with the pod at all
    ({}, {}, LATER, False),
    ({}, {}, T0 + 1, True),
    # the push gives the IP to a new pod (a new uid for the IP): cleared at once
    ({X_IP: MeshPod("ns/y", True)}, {}, T0 + 1, False),
    # a CNI ADD recorded a pod with the IP, or the same pod again: cleared
    (X_LISTED, {"ns/y": Y}, T0 + 1, False),
    (X_LISTED, {"ns/x": X}, T0 + 1, False),
    # too old, whatever the push says
    (X_LISTED, {}, T0 + TOMBSTONE_TTL + 1, False),
])
def test_prune_tombstones(mesh: dict[str, MeshPod], local: dict[str, LocalPod], now: float,
                          kept: bool) -> None:
    assert prune((DEAD_X,), mesh, local, now) == ((DEAD_X,) if kept else ())


def test_tombstones_are_bounded(tmp_path: Path) -> None:
    """N+1 deletes keep the newest N, in the table (at DEL) and in prune."""
    table = PodTable(tmp_path / "pods.json")
    n = MAX_TOMBSTONES
    pods = [lp(f"ns/p{i}", f"10.1.{i // 250}.{i % 250 + 1}", decision=True) for i in range(n + 1)]
    for i, p in enumerate(pods):
        table.put(p)
        table.bury(p, T0 + i, n)
    assert len(table.deleted) == n and table.pods == {}
    assert table.deleted[0].uid == pods[-1].uid and pods[0].uid not in {
        t.uid for t in table.deleted}
    listed = {p.ips[0]: MeshPod(p.uid, True) for p in pods}
    everything = (Tombstone.of(pods[0], T0), *table.deleted)
    assert prune(everything, listed, {}, T0 + n) == table.deleted
    # persisted with the table: a restarted agent still knows them
    again = PodTable(tmp_path / "pods.json")
    again.load()
    assert again.deleted == table.deleted


def test_bury_keeps_a_newer_record_of_the_same_pod(tmp_path: Path) -> None:
    """A pass that planned with an old record (a CNI ADD replaced it meanwhile) tombstones the
    old one and leaves the new record alone; the next prune drops the tombstone."""
    table = PodTable(tmp_path / "pods.json")
    newer = LocalPod("ns/x", ("10.0.0.9",), "veth-x2", decision=True)
    table.put(newer)
    table.bury(X, T0, MAX_TOMBSTONES, reason="gone")
    assert table.pods == {"ns/x": newer} and table.deleted == (Tombstone.of(X, T0, "gone"),)
    assert prune(table.deleted, X_LISTED, table.pods, T0 + 1) == ()
