"""The host binary of ambit-cni against the agent's real CNI server (agent/cni_server.py).

What this proves: with the agent up, the static binary and the Python plugin are
indistinguishable. For every command, failure policy, CNI version and agent decision (capture,
not in the mesh, refusal, handler crash, handler slower than ``timeoutSeconds``), the shim's
``exec`` request makes the agent run the Python plugin in-process, and the answer (stdout
bytes, exit status, log lines) and what the agent's handler is asked are exactly what the
Python plugin gets over the agent protocol. Also: malformed exec requests are refused without
harm, large configs pass, concurrent pods are served, and the agent's thread pool is released.

The agent's handler here is a stand-in for agent/app.py's ``handle_cni`` (capture is covered
by the netns and e2e tests); the server, the plugin and the shim are the real ones.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.cni import spec
from agent.cni_server import CniRequest, CniServer
from ambit.dev.cni_runner import default_ambit_cni
from tests.cni_data import PREV_040, PREV_RESULT

PYTHON_PLUGIN = default_ambit_cni()





@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ambit-shim-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class FakeNode:
    """The agent's CNI handler: answers as ``decision`` says and records what it was asked.

    ``capture`` (ok, captured), ``skip`` (ok, not in the mesh), ``refuse`` (ok false),
    ``crash`` (raises), ``slow`` (answers after ``delay`` seconds).
    """

    decision: str = "capture"
    delay: float = 0.0
    requests: list[CniRequest] = field(default_factory=list)

    async def handle(self, req: CniRequest) -> dict[str, Any]:
        self.requests.append(req)
        if self.decision == "crash":
            raise RuntimeError("capture backend exploded")
        if self.decision == "refuse":
            return {"ok": False, "error": f"pod {req.uid} is not in the registry yet"}
        if self.decision == "slow":
            await asyncio.sleep(self.delay)
        captured = self.decision != "skip"
        return {"ok": True, "captured": captured, "reason": "test"}


@pytest.fixture
async def node(workdir: Path) -> AsyncIterator[tuple[FakeNode, CniServer]]:
    fake = FakeNode()
    server = CniServer(workdir / "cni.sock", fake.handle)
    await server.start()
    try:
        yield fake, server
    finally:
        await server.close()


@dataclass(frozen=True)
class Run:
    status: int
    stdout: bytes
    stderr: bytes
    seconds: float


def base_env(command: str) -> dict[str, str]:
    return {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": "/var/run/netns/pod",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart;K8S_POD_UID=u9",
        "CNI_PATH": "/opt/cni/bin",
    }


def netconf(sock: Path, **extra: Any) -> bytes:
    conf = {"cniVersion": "1.0.0", "name": "ambit", "type": "ambit-cni",
            "agentSocket": str(sock), "prevResult": PREV_RESULT, **extra}  # fmt: skip
    return json.dumps(conf).encode()


async def execute(exe: Path, cni_env: dict[str, str], stdin: bytes) -> Run:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    env.update(cni_env)
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        str(exe), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin), 30)
    assert proc.returncode is not None and proc.returncode >= 0
    assert b"Traceback" not in err
    return Run(proc.returncode, out, err, time.monotonic() - started)


async def both(shim: Path, fake: FakeNode, env: dict[str, str], stdin: bytes) -> Run:
    """Run the shim, then the Python plugin; assert they behaved alike; return the shim's."""
    fake.requests.clear()
    ours = await execute(shim, env, stdin)
    asked_by_shim = list(fake.requests)
    fake.requests.clear()
    theirs = await execute(PYTHON_PLUGIN, env, stdin)
    assert (ours.status, ours.stdout.decode()) == (theirs.status, theirs.stdout.decode())
    assert ours.stderr.decode() == theirs.stderr.decode()
    assert asked_by_shim == fake.requests
    return ours


DECISIONS = ("capture", "skip", "refuse", "crash")


@pytest.mark.parametrize("version", ["1.0.0", "0.4.0"])
@pytest.mark.parametrize("policy", ["fail-closed", "fail-open"])
@pytest.mark.parametrize("command", ["ADD", "CHECK", "DEL"])
async def test_shim_through_the_agent_answers_like_the_python_plugin(
    shim: Path, node: tuple[FakeNode, CniServer], command: str, policy: str, version: str
) -> None:
    fake, server = node
    prev = PREV_RESULT if version == "1.0.0" else PREV_040
    stdin = netconf(server.path, cniVersion=version, failurePolicy=policy, prevResult=prev)
    for decision in DECISIONS:
        fake.decision = decision
        run = await both(shim, fake, base_env(command), stdin)
        (req,) = fake.requests  # the handler was asked once, by each of them
        assert (req.op, req.uid, req.container_id) == (command.lower(), "shop/cart", "c0ffee")
        refused = decision in ("refuse", "crash")
        if command == "DEL" or not refused or policy == "fail-open":
            assert run.status == 0
        else:
            doc = json.loads(run.stdout)
            assert (run.status, doc["code"], doc["cniVersion"]) == (
                1, spec.ERR_AGENT_REFUSED, version)
        if command == "ADD" and run.status == 0:
            expected = dict(prev)
            expected.setdefault("cniVersion", version)
            assert json.loads(run.stdout) == expected


async def test_config_errors_come_from_the_agent(
    shim: Path, node: tuple[FakeNode, CniServer]
) -> None:
    """What the shim does not check itself (prevResult's contents) the agent reports."""
    fake, server = node
    bad_prev = dict(PREV_RESULT, ips=[{"interface": 1, "address": "10.244.1.500/24"}])
    cases: list[tuple[dict[str, str], bytes]] = [
        (base_env("ADD"), netconf(server.path, prevResult=bad_prev)),
        (base_env("ADD"), netconf(server.path, prevResult={"interfaces": "eth0"})),
        (base_env("CHECK"), netconf(server.path, cniVersion="2.0.0")),
        (base_env("ADD"), netconf(server.path, timeoutSeconds="soon")),
        ({**base_env("ADD"), "CNI_IFNAME": ""}, netconf(server.path)),
        ({**base_env("ADD"), "CNI_ARGS": "K8S_POD_NAME"}, netconf(server.path)),
        (base_env("DEL"), netconf(server.path, prevResult={"ips": "none"})),
    ]
    for env, stdin in cases:
        run = await both(shim, fake, env, stdin)
        assert fake.requests == []
        if env["CNI_COMMAND"] != "DEL":
            assert run.status == 1 and json.loads(run.stdout)["code"] in (1, 4, 7)
    run = await both(shim, fake, base_env("ADD"), netconf(server.path, prevResult=bad_prev))
    assert "prevResult" in json.loads(run.stdout)["msg"]


async def test_a_slow_agent_is_a_timeout_for_both(
    shim: Path, node: tuple[FakeNode, CniServer]
) -> None:
    fake, server = node
    fake.decision, fake.delay = "slow", 1.5
    for policy in ("fail-closed", "fail-open"):
        stdin = netconf(server.path, timeoutSeconds=0.4, failurePolicy=policy)
        run = await both(shim, fake, base_env("ADD"), stdin)
        assert run.seconds < 1.4, "the shim waited past timeoutSeconds"
        if policy == "fail-closed":
            doc = json.loads(run.stdout)
            assert (run.status, doc["code"]) == (1, spec.ERR_TRY_AGAIN_LATER)
            assert "no answer within 0.4s" in doc["msg"]
        else:
            assert run.status == 0 and json.loads(run.stdout) == PREV_RESULT
            assert b"starts WITHOUT capture" in run.stderr
    # Slow but in time: both wait for the answer.
    fake.delay = 0.2
    run = await both(shim, fake, base_env("ADD"), netconf(server.path, timeoutSeconds=3))
    assert run.status == 0


async def test_version_is_answered_without_the_agent(
    shim: Path, node: tuple[FakeNode, CniServer]
) -> None:
    fake, server = node
    run = await both(shim, fake, base_env("VERSION"), netconf(server.path))
    assert json.loads(run.stdout) == spec.version_result()
    assert fake.requests == []


async def test_stdin_bytes_reach_the_plugin_unchanged(
    shim: Path, node: tuple[FakeNode, CniServer]
) -> None:
    """Surrogate bytes json.loads accepts, non-ASCII, escapes: the same answer either way."""
    fake, server = node
    stdin = netconf(server.path, failurePolicy="fail-open")[:-1]
    stdin += b', "x-note": "\xed\xa0\x80 caf\xc3\xa9 \\ud83d\\ude00"}'
    env = {**base_env("ADD"), "CNI_ARGS": "K8S_POD_NAMESPACE=sh\xf6p;K8S_POD_NAME=cart"}
    fake.decision = "refuse"
    run = await both(shim, fake, env, stdin)
    assert run.status == 0 and b"sh\xc3\xb6p/cart" in run.stderr
    (req,) = fake.requests
    assert req.pod_namespace == "sh\u00f6p"


async def test_large_config_and_many_pods_at_once(
    shim: Path, node: tuple[FakeNode, CniServer]
) -> None:
    fake, server = node
    big = dict(PREV_RESULT, routes=[{"dst": f"10.{i // 250}.{i % 250}.0/24"}
                                    for i in range(8000)])  # fmt: skip
    stdin = netconf(server.path, prevResult=big)
    assert len(stdin) > 200_000
    run = await execute(shim, base_env("ADD"), stdin)
    assert run.status == 0 and json.loads(run.stdout) == big

    fake.requests.clear()
    envs = [
        {**base_env("ADD"), "CNI_CONTAINERID": f"c{i:04d}",
         "CNI_ARGS": f"K8S_POD_NAMESPACE=shop;K8S_POD_NAME=p{i}"}
        for i in range(40)
    ]  # fmt: skip
    runs = await asyncio.gather(*(execute(shim, e, netconf(server.path)) for e in envs))
    assert [r.status for r in runs] == [0] * 40
    assert sorted(r.container_id for r in fake.requests) == [f"c{i:04d}" for i in range(40)]


async def _raw_request(path: Path, line: bytes) -> Any:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(line)
    await writer.drain()
    answer = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    return json.loads(answer)


async def test_malformed_exec_requests_are_refused(node: tuple[FakeNode, CniServer]) -> None:
    fake, server = node
    bad = [
        {"op": "exec"},
        {"op": "exec", "env": {"CNI_COMMAND": 7}, "stdin": ""},
        {"op": "exec", "env": {}, "stdin": ["not", "text"]},
        {"op": "exec", "env": {}, "stdin": "\ud800"},  # not a surrogateescape string
    ]
    for request in bad:
        answer = await _raw_request(server.path, json.dumps(request).encode() + b"\n")
        assert answer["ok"] is False and answer["error"].startswith("bad request: ")
    # The old protocol is still served on the same socket.
    answer = await _raw_request(server.path, json.dumps(
        {"op": "add", "containerId": "c1", "podName": "a", "podNamespace": "b"}).encode() + b"\n")
    assert answer == {"ok": True, "captured": True, "reason": "test"}
    # Only CNI_* variables reach the plugin; the answer has exactly the exec keys.
    answer = await _raw_request(server.path, json.dumps(
        {"op": "exec", "env": {"CNI_COMMAND": "VERSION", "PATH": "/x"}, "stdin": ""}
    ).encode() + b"\n")
    assert answer == {"exit": 0, "stdout": json.dumps(spec.version_result()) + "\n",
                      "stderr": ""}  # fmt: skip
    assert len(fake.requests) == 1


async def test_shim_against_an_agent_that_does_not_know_exec(
    shim: Path, workdir: Path
) -> None:
    """An older agent answers exec with ok=false: an invalid answer, so the policy applies."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b'{"ok": false, "error": "bad request: op: \'exec\' is not one of add, '
                     b'del, check"}\n')
        await writer.drain()
        writer.close()

    sock = workdir / "old.sock"
    server = await asyncio.start_unix_server(serve, str(sock))
    try:
        run = await execute(shim, base_env("ADD"), netconf(sock))
        doc = json.loads(run.stdout)
        assert (run.status, doc["code"]) == (1, spec.ERR_AGENT_PROTOCOL)
        assert "is not one of add, del, check" in doc["msg"]
        run = await execute(shim, base_env("ADD"), netconf(sock, failurePolicy="fail-open"))
        assert run.status == 0 and json.loads(run.stdout) == PREV_RESULT
        run = await execute(shim, base_env("DEL"), netconf(sock))
        assert (run.status, run.stdout) == (0, b"")
    finally:
        server.close()
        await server.wait_closed()
