"""The agent's question to the controller at CNI ADD: is this pod in the mesh?

Why it exists: the pod has no IP in the registry yet when its sandbox is created, so the state
push cannot answer; ``NodeService.GetPodMembership`` (controller/node_service.py) can, by name.
The node credential is read from its file on every call, since Kubernetes rotates projected
service-account tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from mesh.api.ambit.v1 import node_pb2, node_pb2_grpc


class MembershipUnavailable(Exception):
    """The controller could not be asked (down, refused the credential, timed out)."""


@dataclass(frozen=True)
class Answer:
    known: bool
    in_mesh: bool
    reason: str
    # The pod's workload fields (set for mesh pods): handed to the node's ztunnel at ADD.
    service_account: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    workload_name: str = ""


class MembershipClient:
    def __init__(self, target: str, node: str, token_file: Path | None,
                 credentials: grpc.ChannelCredentials | None, timeout: float = 5.0) -> None:
        self.node = node
        self.token_file = token_file
        self.timeout = timeout
        options = [("grpc.keepalive_time_ms", 20_000)]
        self.channel = (grpc.aio.insecure_channel(target, options=options) if credentials is None
                        else grpc.aio.secure_channel(target, credentials, options=options))
        self.stub = node_pb2_grpc.NodeServiceStub(self.channel)

    async def ask(self, namespace: str, name: str) -> Answer:
        metadata = []
        if self.token_file is not None:
            try:
                token = self.token_file.read_text().strip()
            except OSError as e:
                raise MembershipUnavailable(f"cannot read the node token {self.token_file}: "
                                            f"{e.strerror}") from None
            metadata.append(("authorization", f"Bearer {token}"))
        try:
            reply = await self.stub.GetPodMembership(
                node_pb2.PodMembershipRequest(node=self.node, namespace=namespace, name=name),
                metadata=metadata, timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            raise MembershipUnavailable(f"controller: {e.code().name}: {e.details()}") from None
        return Answer(reply.known, reply.in_mesh, reply.reason, reply.service_account,
                      tuple(sorted(reply.labels.items())), reply.workload_name)

    async def close(self) -> None:
        await self.channel.close()
