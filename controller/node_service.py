"""``NodeService``: what a node agent asks the controller about the pods on its node.

Why it exists: at CNI ADD a pod has no IP in the registry yet (the kubelet reports it after the
sandbox is up), so the state push, which addresses workloads by IP, cannot tell the agent
whether to capture it. The agent asks here by name, and captures the pod before its containers
start. Nodes authenticate as they do for the CA (node token or service-account token), and a
node may only ask about pods on itself, so the answer leaks nothing about other nodes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NoReturn

import grpc
from prometheus_client import CollectorRegistry, Counter

from controller.ca_service import NodeAuthenticator, NodeAuthError, authenticate_node
from controller.registry.translate import Membership
from mesh.api.ambit.v1 import node_pb2, node_pb2_grpc

log = logging.getLogger("controller.node")

MembershipLookup = Callable[[str, str, str], Membership]  # (node, namespace, name)

Context = grpc.aio.ServicerContext[node_pb2.PodMembershipRequest, node_pb2.PodMembership]


class NodeService(node_pb2_grpc.NodeServiceServicer):
    def __init__(self, authenticator: NodeAuthenticator, lookup: MembershipLookup,
                 registry: CollectorRegistry) -> None:
        self.authenticator = authenticator
        self.lookup = lookup
        self.requests = Counter("ambit_node_membership_requests", "Pod membership questions "
                                "from node agents by result (in_mesh, not_in_mesh, unknown, "
                                "refused)", ("result",), registry=registry)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        node_pb2_grpc.add_NodeServiceServicer_to_server(self, server)

    async def _refuse(self, context: Context, code: grpc.StatusCode, message: str) -> NoReturn:
        self.requests.labels("refused").inc()
        log.warning("refused a membership question from %s: %s", context.peer(), message)
        await context.abort(code, message)
        raise AssertionError("abort() returned")

    async def GetPodMembership(self, request: node_pb2.PodMembershipRequest,
                               context: Context) -> node_pb2.PodMembership:
        try:
            node = await authenticate_node(self.authenticator, context.invocation_metadata(),
                                           claimed_node=request.node)
        except NodeAuthError as e:
            await self._refuse(context, e.code, str(e))
        if not request.namespace or not request.name:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                               "namespace and name are required")
        answer = self.lookup(node, request.namespace, request.name)
        result = ("unknown" if not answer.known else
                  "in_mesh" if answer.in_mesh else "not_in_mesh")
        self.requests.labels(result).inc()
        log.info("node %s asked about pod %s/%s: %s", node, request.namespace, request.name,
                 answer.reason)
        return node_pb2.PodMembership(known=answer.known, in_mesh=answer.in_mesh,
                                      reason=answer.reason,
                                      service_account=answer.service_account,
                                      labels=dict(answer.labels),
                                      workload_name=answer.workload_name)
