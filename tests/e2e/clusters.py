"""One way to bring up a 2-node dev cluster for an e2e module (one per redirect mode), so every
module checks the same things: the agents run the mode asked for, and nothing is left behind."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import pytest

from ambit.dev import netns
from ambit.dev.cluster import DevCluster


@contextlib.contextmanager
def dev_cluster(tag: str, mode: str, tmp_path_factory: pytest.TempPathFactory,
                ambient: tuple[str, ...] = ("default",), plain: tuple[str, ...] = ()) \
        -> Iterator[DevCluster]:
    """A started cluster named ``<tag><mode>…``, its namespaces labelled; torn down after, and
    no namespace of it may remain."""
    name = f"{tag}{mode[:2]}{uuid.uuid4().hex[:4]}"
    root = tmp_path_factory.mktemp(f"{tag}-{mode}")
    c = DevCluster(name, nodes=2, redirect_mode=mode, root=root, out=lambda _line: None)
    try:
        c.up()
        for node in c.nodes:
            status = c.agent_status(node)
            assert status["redirectMode"] == mode, status
        for ns in ambient:
            c.set_namespace(ns, ambient=True)
        for ns in plain:
            c.set_namespace(ns, ambient=False)
        yield c
    finally:
        c.down(quiet=True)
        assert not [n for n in netns.list_netns() if n.startswith(c.prefix)]
