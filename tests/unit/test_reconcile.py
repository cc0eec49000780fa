"""The agent's reconcile as a table: which pods to capture, release, or look for."""

from __future__ import annotations

import pytest

from agent.pods import LocalPod
from agent.reconcile import MeshPod, Plan, desired, plan


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
