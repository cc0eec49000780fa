"""State push decoding (``mesh/state/wire.py``): a ``StateUpdate`` protobuf from the
controller, decoded and applied.

Input: the serialized ``StateUpdate``. It is applied to an empty state and to a small valid
one (a workload, a service, a policy).

Invariants: the only rejections are protobuf's ``DecodeError`` (not a message) and
``StateError`` (a message with an invalid part: the ztunnel keeps its state); an accepted
update gives a state whose workload addresses and service VIPs are all distinct and whose
policies are named (as a state file's must be), whose ports are in 1..65535, and which
survives ``full_update`` -> ``apply_update`` unchanged.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["mesh.state", "mesh.spiffe", "mesh.ports"]):
    from google.protobuf.message import DecodeError

    from mesh.api.ambit.v1 import state_pb2
    from mesh.state.model import AuthorizationPolicy, MeshConfig, PeerAuthentication
    from mesh.state.parse import StateError, load_state_text
    from mesh.state.wire import apply_update, full_update

BASE = load_state_text("""
workloads:
  - {name: client, namespace: default, node: node-a, addresses: [10.0.1.5], labels: {app: c}}
services:
  - name: echo
    namespace: default
    vips: [10.96.0.10]
    selector: {app: echo}
    ports: [{port: 80, targetPort: 8080}]
authorizationPolicies:
  - {name: allow, namespace: default, spec: {rules: [{from: [{source: {namespaces: [a]}}]}]}}
""")


def _check(config: MeshConfig) -> None:
    # The rules of a state file (parse_state): pod addresses and service VIPs all distinct.
    ips = [ip for w in config.workloads for ip in w.addresses]
    vips = [ip for s in config.services for ip in s.vips]
    assert len(set(ips + vips)) == len(ips) + len(vips), config
    named: list[AuthorizationPolicy | PeerAuthentication] = [*config.policies,
                                                            *config.peer_authentications]
    for pol in named:
        assert pol.name and pol.namespace, pol
    for s in config.services:
        for p in s.ports:
            assert 1 <= p.port <= 65535 and 1 <= p.target_port <= 65535, s
    again = apply_update(MeshConfig(), full_update(config))
    assert again == config, (config, again)


def test_one_input(data: bytes) -> None:
    try:
        update = state_pb2.StateUpdate.FromString(data)
    except DecodeError:
        return
    for base in (MeshConfig(), BASE):
        try:
            config = apply_update(base, update)
        except StateError:
            continue
        _check(config)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
