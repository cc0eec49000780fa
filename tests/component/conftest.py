"""Component tests run on uvloop, the loop the ztunnel uses in production; the Kubernetes-path
tests share one API-server double fixture and a client for it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import uvloop
from kubernetes_asyncio import client

from controller.registry.kubernetes import api_client
from tests.k8s_double.server import ApiServerDouble


def pytest_asyncio_loop_factories(config: pytest.Config,
                                  item: pytest.Item) -> Mapping[str, Callable[[], Any]]:
    return {"uvloop": uvloop.new_event_loop}


# --- the Kubernetes API-server double, shared by the Kubernetes-path tests -----------------


@pytest.fixture
async def double() -> AsyncIterator[ApiServerDouble]:
    d = ApiServerDouble()
    await d.start()
    try:
        yield d
    finally:
        await d.close()


@pytest.fixture
async def api(double: ApiServerDouble, tmp_path: Path) -> AsyncIterator[client.ApiClient]:
    """The real kubernetes_asyncio client, talking to ``double`` through a kubeconfig."""
    a = await api_client(str(double.write_kubeconfig(tmp_path / "kubeconfig")))
    try:
        yield a
    finally:
        await a.close()
