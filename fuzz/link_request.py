"""The pod hand-off lines the node agent sends the ztunnel over ``ztunnel.sock``
(``ztunnel/agent_link.py`` ``parse_link_request``): the ztunnel's one input from the agent at
CNI ADD and DEL, validated as strictly as a state file.

Input: the raw line (JSON or not), parsed for node ``node-1`` in trust domain
``cluster.local``.

Invariants: the only rejection is ``LinkRequestError`` (and its message is bounded); an
accepted ``pod_added`` carries a workload of node ``node-1`` whose uid is
``namespace/name``, with 1 or 2 distinct addresses and at most 64 labels, enrolled (HBONE) and
not ready; an accepted ``pod_deleted`` or ``pod_netns_gone`` names ``namespace/name``; an
accepted ``pod_netns`` names ``namespace/name``, 1 or 2 addresses and at most 192 known
listener names, and counts one descriptor more than it names; an accepted ``superseded``
names a pid; the id is an integer in 0..2^53.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["ztunnel.agent_link", "mesh.state.parse"]):
    from mesh.state.model import Protocol
    from ztunnel.agent_link import (
        POD_LISTENER_NAMES,
        LinkRequestError,
        PodAdded,
        PodDeleted,
        PodNetns,
        PodNetnsGone,
        Superseded,
        parse_link_request,
    )

NODE = "node-1"
TD = "cluster.local"


def test_one_input(data: bytes) -> None:
    try:
        request_id, req = parse_link_request(data, NODE, TD)
    except LinkRequestError as e:
        assert len(str(e)) < 2048, len(str(e))
        assert e.request_id is None or 0 <= e.request_id < 2**53
        return
    assert 0 <= request_id < 2**53
    if isinstance(req, PodAdded):
        w = req.workload
        assert w.node == NODE and w.trust_domain == TD
        assert w.uid == f"{w.namespace}/{w.name}", w.uid
        assert 1 <= len(w.addresses) <= 2 and len(set(w.addresses)) == len(w.addresses)
        assert len(w.labels) <= 64
        assert w.protocol is Protocol.HBONE and not w.healthy
    elif isinstance(req, Superseded):
        assert 0 < req.by < 2**22
    else:
        assert isinstance(req, PodDeleted | PodNetns | PodNetnsGone)
        namespace, sep, name = req.uid.partition("/")
        assert sep and namespace and name and "/" not in name
        if isinstance(req, PodNetns):
            assert 1 <= len(req.ips) <= 2 and len(req.listener_names) <= 192
            assert set(req.listener_names) <= set(POD_LISTENER_NAMES)
            assert req.fd_count == 1 + len(req.listener_names) and req.netns == -1


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
