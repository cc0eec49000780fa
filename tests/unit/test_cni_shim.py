"""The static host binary of ambit-cni (agent/cni/shim) against the Python plugin, without an agent.

What this proves: the binary the runtime executes on a node is static (it needs nothing from
the node), and whenever it must answer by itself (VERSION; a config it cannot forward; the
agent absent, dead, hung past ``timeoutSeconds``, or answering garbage) it gives exactly the
Python plugin's answer: the same stdout bytes, exit status and log lines, for ADD, CHECK and
DEL, both failure policies and both CNI versions. With a real agent the two are compared in
tests/component/test_cni_shim_agent.py. A light fuzz holds the binary's JSON scanner to
"never crash, always one JSON document or nothing", and to Python's answers.

The binary is built once per session (``make -C agent/cni/shim``); a missing compiler or
static libc fails the tests rather than skipping them (hack/setup.sh installs both).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import socket
import socketserver
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.cni import plugin, spec
from agent.cni import shim as shim_build
from ambit.dev.cni_runner import default_ambit_cni
from tests import cni_data
from tests.cni_data import PREV_RESULT

PYTHON_PLUGIN = default_ambit_cni()

# Extra members of odd types, which pass-through must print exactly as Python's json does.
PREV_040: dict[str, Any] = {
    **cni_data.PREV_040,
    "x-float": 1.5e-7,
    "x-big": 12345678901234567890,
    "x-text": "caf\u00e9 \U0001f600 \"q\" \\ \t",
}




@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short, so Unix socket paths stay under the 108-byte limit.
    d = Path(tempfile.mkdtemp(prefix="ambit-shim-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --- running both plugins ------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    status: int
    stdout: bytes
    stderr: bytes
    seconds: float

    def doc(self) -> dict[str, Any] | None:
        if not self.stdout:
            return None
        doc = json.loads(self.stdout)  # exactly one JSON document, nothing else
        assert isinstance(doc, dict)
        return doc


def base_env(command: str) -> dict[str, str]:
    return {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "abc123",
        "CNI_NETNS": "/var/run/netns/x",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web;K8S_POD_UID=u1",
        "CNI_PATH": "/opt/cni/bin",
    }


def execute(exe: Path, cni_env: dict[str, str], stdin: bytes, timeout: float = 30) -> Run:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    env.update(cni_env)
    started = time.monotonic()
    res = subprocess.run([str(exe)], input=stdin, capture_output=True, env=env,
                         timeout=timeout, check=False)  # fmt: skip
    assert res.returncode >= 0, f"{exe.name} was killed by signal {-res.returncode}"
    assert b"Traceback" not in res.stderr
    return Run(res.returncode, res.stdout, res.stderr, time.monotonic() - started)


def netconf(sock: Path, **extra: Any) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "ambit", "type": "ambit-cni",
            "agentSocket": str(sock), "prevResult": PREV_RESULT, **extra}  # fmt: skip


# --- agents that are not there, or not right -----------------------------------------------


class StubAgent:
    """A socket that reads one line per connection and answers with ``reply`` (bytes), or
    never (``None``: a hung agent, released on close)."""

    def __init__(self, path: Path, reply: bytes | None) -> None:
        self.path = path
        self.requests: list[bytes] = []
        release = self._release = threading.Event()
        requests = self.requests

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                requests.append(self.rfile.readline())
                if reply is None:
                    release.wait(30)
                    return
                self.wfile.write(reply)

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True
            block_on_close = False

        self._server = Server(str(path), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        self.path.unlink(missing_ok=True)


AGENT_REPLIES: dict[str, bytes | None] = {
    "garbage": b"<html>oops</html>\n",
    "garbage-json": b'  {"ok": "yes", "exit": "0"}  \nmore\n',
    "closes": b"",
    "blank": b"  \n",
    "hangs": None,
}


@contextlib.contextmanager
def agent(kind: str, sock: Path) -> Iterator[None]:
    """``absent`` (no socket), ``stale`` (a socket nobody listens on), or a stub."""
    if kind == "absent":
        yield
        return
    if kind == "stale":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(sock))
        s.close()
        try:
            yield
        finally:
            sock.unlink(missing_ok=True)
        return
    stub = StubAgent(sock, AGENT_REPLIES[kind])
    try:
        yield
    finally:
        stub.close()


# --- the differential table ----------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    command: str
    stdin: Callable[[Path], bytes]
    agent: str = "absent"
    env: dict[str, str | None] = field(default_factory=dict)


def conf_of(**extra: Any) -> Callable[[Path], bytes]:
    return lambda sock: json.dumps(netconf(sock, **extra)).encode()


def raw(text: bytes) -> Callable[[Path], bytes]:
    return lambda _sock: text


def _table() -> list[Case]:
    cases: list[Case] = []
    for command in ("ADD", "CHECK", "DEL"):
        for policy in ("fail-closed", "fail-open"):
            for version, prev in (("1.0.0", PREV_RESULT), ("0.4.0", PREV_040)):
                for kind in ("absent", "stale", "garbage", "garbage-json", "closes", "blank"):
                    cases.append(Case(
                        f"{command}-{policy}-{version}-{kind}", command,
                        conf_of(cniVersion=version, failurePolicy=policy, prevResult=prev),
                        kind,
                    ))  # fmt: skip
        cases.append(Case(f"{command}-hangs", command, conf_of(timeoutSeconds=0.3), "hangs"))
    # flannel's and Calico's conflists say 0.3.1: spoken like 0.4.0.
    for policy in ("fail-closed", "fail-open"):
        for kind in ("absent", "garbage"):
            cases.append(Case(f"ADD-{policy}-0.3.1-{kind}", "ADD",
                              conf_of(cniVersion="0.3.1", failurePolicy=policy,
                                      prevResult=PREV_040), kind))  # fmt: skip
    cases.append(Case("ADD-fail-open-hangs", "ADD",
                      conf_of(timeoutSeconds=0.3, failurePolicy="fail-open"), "hangs"))  # fmt: skip
    cases += [
        Case("VERSION", "VERSION", conf_of()),
        Case("VERSION-garbage", "VERSION", raw(b"\xff{")),
        Case("VERSION-no-stdin", "VERSION", raw(b"")),
        Case("no-command", "", conf_of()),
        Case("unknown-command", "DANCE", conf_of(cniVersion="0.4.0")),
        Case("unknown-command-quotes", "it's", raw(b"{")),
        Case("no-container-id", "ADD", conf_of(), env={"CNI_CONTAINERID": None}),
        Case("bad-container-id", "ADD", conf_of(), env={"CNI_CONTAINERID": "a b/'\""}),
        Case("container-id-newline", "ADD", conf_of(), env={"CNI_CONTAINERID": "abc\n"}),
        Case("no-netns", "CHECK", conf_of(), env={"CNI_NETNS": ""}),
        Case("del-no-netns", "DEL", conf_of(), env={"CNI_NETNS": None}),
        Case("no-ifname", "ADD", conf_of(), env={"CNI_IFNAME": None}),
        Case("bad-ifname", "ADD", conf_of(), env={"CNI_IFNAME": "eth\t0"}),
        Case("long-ifname", "ADD", conf_of(), env={"CNI_IFNAME": "x" * 16}),
        Case("bad-cni-args", "ADD", conf_of(), env={"CNI_ARGS": "A=1; ;B"}),
        Case("no-pod-name", "ADD", conf_of(), env={"CNI_ARGS": "K8S_POD_NAMESPACE=demo"}),
        Case("no-pod-namespace", "ADD", conf_of(), env={"CNI_ARGS": " K8S_POD_NAME =w=x"}),
        Case("not-json", "ADD", raw(b"{this is not json")),
        Case("trailing-comma", "ADD", raw(b'{"cniVersion": "1.0.0",\n  }')),
        Case("truncated", "CHECK", raw(b'{"cniVersion": "1.0.0", "name": "am')),
        Case("bad-escape", "ADD", raw(b'{"a": "\\x"}')),
        Case("bad-unicode-escape", "ADD", raw(b'{"a": "\\u12g4"}')),
        Case("control-char", "ADD", raw(b'{"a": "x\x01"}')),
        Case("extra-data", "ADD", raw(b'{"a": 1} {}')),
        Case("empty-stdin", "ADD", raw(b"")),
        Case("bad-utf8", "ADD", raw(b'{"cniVersion": "1.0.0", "name": "\xe2\x82"}')),
        Case("bom", "ADD", lambda sock: b"\xef\xbb\xbf" + conf_of()(sock)),
        Case("deep", "ADD", raw(b"[" * 5000)),
        Case("huge-int", "ADD", raw(b'{"a": ' + b"7" * 4301 + b"}")),
        Case("not-an-object", "ADD", raw(b'["cniVersion"]')),
        Case("del-not-json", "DEL", raw(b"{garbage")),
        Case("no-cni-version", "ADD", lambda s: json.dumps({"name": "n", "type": "t"}).encode()),
        Case("cni-version-number", "ADD", conf_of(cniVersion=1.0)),
        Case("cni-version-old", "ADD", conf_of(cniVersion="0.2.0")),
        Case("name-empty", "ADD", conf_of(name="")),
        Case("type-null", "ADD", conf_of(type=None)),
        Case("socket-relative", "ADD", conf_of(agentSocket="run/ambit.sock")),
        Case("socket-null", "ADD", conf_of(agentSocket=None)),
        Case("socket-list", "ADD", conf_of(agentSocket=["/x"])),
        Case("socket-too-long", "ADD", conf_of(agentSocket="/" + "s" * 120)),
        Case("timeout-bool", "ADD", conf_of(timeoutSeconds=True)),
        Case("timeout-zero", "ADD", conf_of(timeoutSeconds=0)),
        Case("timeout-string", "ADD", conf_of(timeoutSeconds="10")),
        Case("timeout-nested", "ADD", conf_of(timeoutSeconds={"a": [1e-7, None, 2.5e16]})),
        Case("timeout-nan", "ADD", raw(b'{"cniVersion": "1.0.0", "name": "a", "type": "b", '
                                       b'"timeoutSeconds": NaN}')),
        Case("timeout-huge", "ADD", conf_of(timeoutSeconds=1e300)),
        Case("policy-typo", "ADD", conf_of(failurePolicy="fail-opne")),
        Case("policy-null", "ADD", conf_of(failurePolicy=None)),
        Case("no-prev-result", "ADD", conf_of(prevResult=None)),
        Case("no-prev-result-check", "CHECK", conf_of(prevResult=None)),
        Case("prev-result-list", "ADD", conf_of(prevResult=[PREV_RESULT])),
        Case("del-bad-config", "DEL", conf_of(cniVersion="9.9.9")),
        Case("duplicate-keys", "ADD", raw(
            b'{"cniVersion": "1.0.0", "name": "a", "type": "b", "failurePolicy": "x", '
            b'"prevResult": {"b": 1, "a": 2, "b": [3]}, "failurePolicy": "fail-open", '
            b'"agentSocket": "/nonexistent/s"}'
        )),
        Case("escaped-keys", "ADD", raw(
            b'{"\\u0063niVersion": "0.4.0", "name": "a", "type": "b", "failurePolicy": '
            b'"fail-open", "prevResult": {"x": "\\ud83d\\ude00\\ud800\\u00e9\\/"}, '
            b'"agentSocket": "/nonexistent/s"}'
        )),
    ]
    return cases


TABLE = _table()


@pytest.mark.parametrize("case", TABLE, ids=[c.id for c in TABLE])
def test_shim_answers_like_the_python_plugin(shim: Path, workdir: Path, case: Case) -> None:
    sock = workdir / "agent.sock"
    env = base_env(case.command)
    for key, value in case.env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    if not case.command:
        env.pop("CNI_COMMAND")
    stdin = case.stdin(sock)
    with agent(case.agent, sock):
        ours = execute(shim, env, stdin)
        theirs = execute(PYTHON_PLUGIN, env, stdin)
    assert (ours.status, ours.stdout.decode()) == (theirs.status, theirs.stdout.decode())
    assert ours.stderr.decode() == theirs.stderr.decode()
    doc = ours.doc()
    if case.command == "DEL":
        assert (ours.status, doc) == (0, None)
    elif doc is not None and ours.status == 1:
        assert set(doc) == {"cniVersion", "code", "msg", "details"}
    if case.agent == "hangs":
        assert ours.seconds < 5, "the shim waited past timeoutSeconds"


def test_the_table_covers_the_failure_answers(shim: Path, workdir: Path) -> None:
    """Spot checks that the shared answers are the intended ones (not both wrong alike)."""
    sock = workdir / "agent.sock"
    run = execute(shim, base_env("ADD"), json.dumps(netconf(sock)).encode())
    doc = run.doc()
    assert run.status == 1 and doc is not None
    assert doc["code"] == spec.ERR_TRY_AGAIN_LATER and "does not exist" in doc["details"]
    assert "pod demo/web (container abc123) cannot be captured" in doc["msg"]

    run = execute(shim, base_env("ADD"),
                  json.dumps(netconf(sock, failurePolicy="fail-open")).encode())  # fmt: skip
    assert (run.status, run.doc()) == (0, PREV_RESULT)
    assert b"starts WITHOUT capture (failurePolicy fail-open)" in run.stderr

    with agent("hangs", sock):
        stdin = json.dumps(netconf(sock, timeoutSeconds=0.2)).encode()
        run = execute(shim, base_env("CHECK"), stdin)
    doc = run.doc()
    assert run.status == 1 and doc is not None and "no answer within 0.2s" in doc["msg"]
    assert run.seconds < 2

    with agent("garbage", sock):
        run = execute(shim, base_env("ADD"), json.dumps(netconf(sock)).encode())
    doc = run.doc()
    assert doc is not None and doc["code"] == spec.ERR_AGENT_PROTOCOL
    assert "'<html>oops</html>'" in doc["msg"]

    run = execute(shim, base_env("VERSION"), b"")
    assert (run.status, run.doc(), run.stderr) == (0, spec.version_result(), b"")


def test_exec_request_carries_env_and_stdin_bytes(shim: Path, workdir: Path) -> None:
    """The forwarded request: the CNI variables that are set and stdin, byte for byte."""
    sock = workdir / "agent.sock"
    # An encoded surrogate: json.loads takes it (surrogatepass), strict UTF-8 does not, so
    # it travels as \udcXX escapes and must come back as the same three bytes.
    stdin = json.dumps(netconf(sock)).encode()[:-1] + b', "x": "\xed\xa0\x80 caf\xc3\xa9"}'
    env = base_env("ADD")
    env["CNI_ARGS"] = "K8S_POD_NAME=w\xe9b"  # becomes b"w\xc3\xa9b" in the environment
    del env["CNI_PATH"]
    stub = StubAgent(sock, b"{}\n")
    try:
        execute(shim, env, stdin)
    finally:
        stub.close()
    (line,) = stub.requests
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and line.isascii()
    req = json.loads(line)
    assert req["op"] == "exec"
    assert req["env"] == {k: v for k, v in env.items() if k.startswith("CNI_")}
    assert req["stdin"].encode("utf-8", "surrogateescape") == stdin


def test_shim_refuses_oversized_stdin(shim: Path, workdir: Path) -> None:
    conf = netconf(workdir / "agent.sock", pad="x" * (1 << 20))
    run = execute(shim, base_env("ADD"), json.dumps(conf).encode())
    doc = run.doc()
    assert run.status == 1 and doc is not None and doc["code"] == spec.ERR_IO
    run = execute(shim, base_env("DEL"), json.dumps(conf).encode())
    assert (run.status, run.stdout) == (0, b"")


# --- the binary itself ---------------------------------------------------------------------

PT_DYNAMIC, PT_INTERP = 2, 3


def test_binary_is_static(shim: Path) -> None:
    data = shim.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not a 64-bit ELF file"
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    (machine,) = struct.unpack_from("<H", data, 0x12)
    assert machine == 62, "not x86_64"
    types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    assert PT_INTERP not in types, "needs a program interpreter (dynamically linked)"
    assert PT_DYNAMIC not in types, "has a dynamic section"
    if shutil.which("file"):
        out = subprocess.run(["file", "-b", str(shim)], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
        assert "statically linked" in out


def test_build_is_incremental(shim: Path) -> None:
    before = shim.stat().st_mtime_ns
    assert shim_build.build() == shim
    assert shim.stat().st_mtime_ns == before


# --- fuzzing the JSON scanner --------------------------------------------------------------

FUZZ_CASES = 400
_INTERESTING = [b"{", b"}", b"[", b"]", b'"', b"\\", b":", b",", b" ", b"\n", b"\\u",
                b"\\ud800", b"-", b"0", b"1e", b".", b"NaN", b"-Infinity", b"null", b"\xc3",
                b"\xe2\x82", b"\xff", b"\x00", b"\x01", b"\xed\xa0\x80", b"'"]  # fmt: skip


def _mutate(rng: random.Random, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        at = rng.randrange(len(data) + 1)
        if op == 0 and data:  # delete a run
            del data[at: at + rng.randint(1, 8)]
        elif op == 1:  # insert something JSON cares about
            data[at:at] = rng.choice(_INTERESTING)
        elif op == 2 and data:  # flip a byte
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif op == 3:  # truncate
            del data[at:]
        else:  # duplicate a slice
            a = rng.randrange(len(data) + 1)
            data[at:at] = data[a: a + rng.randint(1, 40)]
    return bytes(data)


def _python_answer(env: dict[str, str], stdin: bytes) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = plugin.run(env, stdin, out, err)
    return status, out.getvalue(), err.getvalue()


def _comparable(stdin: bytes, python_stdout: str) -> bool:
    """Inputs on which the shim is documented to differ from the Python plugin."""
    if len(stdin) >= 2 and 0 in stdin[:2]:
        return False  # json.loads reads this as UTF-16/32
    if not stdin.isascii():
        return False  # repr() of non-ASCII characters is approximated
    # Without an agent the shim does not re-check prevResult's addresses.
    return '"msg": "prevResult:' not in python_stdout


def test_fuzz_the_json_scanner(shim: Path, workdir: Path) -> None:
    rng = random.Random(6)
    sock = workdir / "none.sock"
    seeds = [
        json.dumps(netconf(sock)).encode(),
        json.dumps(
            netconf(sock, cniVersion="0.4.0", prevResult=PREV_040, failurePolicy="fail-open"),
            indent=1,
        ).encode(),
        b'{"cniVersion":"1.0.0","name":"a","type":"b","agentSocket":"/nonexistent/s",'
        b'"timeoutSeconds":0.5,"prevResult":{"a":[1,-0.0,2e-9,true,null,"\\u00e9\\n"]}}',
    ]
    compared = 0
    for i in range(FUZZ_CASES):
        stdin = _mutate(rng, seeds[i % len(seeds)])
        command = ("ADD", "CHECK", "DEL")[i % 3]
        env = base_env(command)
        ours = execute(shim, env, stdin, timeout=10)
        assert ours.status in (0, 1), (stdin, ours)
        doc = ours.doc()  # valid JSON or nothing
        if command == "DEL":
            assert (ours.status, doc) == (0, None), stdin
        status, stdout, _ = _python_answer(env, stdin)
        if _comparable(stdin, stdout):
            compared += 1
            assert (ours.status, ours.stdout.decode()) == (status, stdout), stdin
    assert compared > FUZZ_CASES // 3
