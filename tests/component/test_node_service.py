"""NodeService over real gRPC: the agent's membership question at CNI ADD, and its refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.membership import MembershipClient, MembershipUnavailable
from controller.app import Controller, ControllerConfig
from controller.ca_store import open_ca
from controller.embedded import EmbeddedFeed
from controller.node_service import NodeService
from controller.registry.sqlite import EmbeddedRegistry
from tests.component.harness import free_port

TD = "cluster.local"


def doc(kind: str, name: str, ns: str = "", **spec: Any) -> dict[str, Any]:
    if kind == "Namespace":
        return {"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "labels": spec}}
    return {"apiVersion": "ambit.dev/v1", "kind": "Workload",
            "metadata": {"name": name, "namespace": ns, "labels": spec.pop("labels", {})},
            "spec": spec}


async def test_membership_answers_and_refusals(tmp_path: Path) -> None:
    registry = EmbeddedRegistry(tmp_path / "registry.db")
    registry.apply([
        doc("Namespace", "mesh", **{"ambit.dev/dataplane-mode": "ambient"}),
        doc("Namespace", "plain"),
        # Scheduled, no address yet: what the registry holds at CNI ADD time.
        doc("Workload", "web", "mesh", node="node-1"),
        doc("Workload", "db", "plain", node="node-1"),
        doc("Workload", "away", "mesh", node="node-2"),
    ])
    token = tmp_path / "node-1.token"
    token.write_text(registry.issue_node_token("node-1"))
    ca = open_ca(TD, tmp_path / "data")
    feed = EmbeddedFeed(registry, TD, interval=0.02)
    port = free_port("127.0.0.1")
    controller = Controller(ControllerConfig(trust_domain=TD, listen_host="127.0.0.1",
                                             grpc_port=port, monitoring_port=0,
                                             insecure=True), feed, ca,
                            authenticator=feed)
    service = NodeService(feed, feed.pod_membership, controller.metrics)
    controller.add_services = service.add_to_server
    await controller.start()
    target = f"127.0.0.1:{port}"
    client = MembershipClient(target, "node-1", token, None, timeout=5)
    try:
        a = await client.ask("mesh", "web")
        assert (a.known, a.in_mesh) == (True, True)
        a = await client.ask("plain", "db")
        assert (a.known, a.in_mesh) == (True, False) and "not labelled" in a.reason
        a = await client.ask("mesh", "away")  # another node's pod: not known here
        assert (a.known, a.in_mesh) == (False, False) and "node-2" in a.reason
        a = await client.ask("mesh", "ghost")
        assert not a.known

        # Asking as another node with node-1's credential is refused.
        impostor = MembershipClient(target, "node-2", token, None, timeout=5)
        with pytest.raises(MembershipUnavailable, match="PERMISSION_DENIED"):
            await impostor.ask("mesh", "away")
        await impostor.close()
        bad = tmp_path / "bad.token"
        bad.write_text("not-a-token")
        stranger = MembershipClient(target, "node-1", bad, None, timeout=5)
        with pytest.raises(MembershipUnavailable, match="UNAUTHENTICATED"):
            await stranger.ask("mesh", "web")
        await stranger.close()
        anonymous = MembershipClient(target, "node-1", None, None, timeout=5)
        with pytest.raises(MembershipUnavailable, match="UNAUTHENTICATED"):
            await anonymous.ask("mesh", "web")
        await anonymous.close()
        missing = MembershipClient(target, "node-1", tmp_path / "nope", None, timeout=5)
        with pytest.raises(MembershipUnavailable, match="cannot read the node token"):
            await missing.ask("mesh", "web")
        await missing.close()
        samples = {s.labels["result"]: s.value
                   for m in controller.metrics.collect() if m.name ==
                   "ambit_node_membership_requests" for s in m.samples
                   if s.name.endswith("_total")}
        assert samples == {"in_mesh": 1, "not_in_mesh": 1, "unknown": 2, "refused": 3}
    finally:
        await client.close()
        await controller.stop(grace=0)
        registry.close()


async def test_controller_down_is_unavailable(tmp_path: Path) -> None:
    client = MembershipClient(f"127.0.0.1:{free_port('127.0.0.1')}", "node-1", None, None,
                              timeout=1)
    try:
        with pytest.raises(MembershipUnavailable, match=r"UNAVAILABLE|DEADLINE"):
            await client.ask("mesh", "web")
    finally:
        await client.close()
