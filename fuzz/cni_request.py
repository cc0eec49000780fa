"""CNI request decoding, Python side: the plugin (``agent/cni/plugin.py`` ``handle``, which
parses the CNI variables and the network config with ``agent/cni/spec.py``), the node agent's
socket (``agent/cni_server.py``: a request line to ``CniRequest``/``ExecRequest``) and the
agent's answer as the plugin reads it (``spec.parse_agent_response``).

Input: byte 0 (mod 3) picks the decoder; for the plugin the rest is seven NUL-separated
fields, CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS, CNI_PATH (empty: unset;
decoded as ``os.environ`` does, surrogateescape) and the agent's answer line (decoded with
``parse_agent_response``), then stdin: the layout of the C shim's target (``fuzz/cni_shim.c``;
there the answer is an exec answer). For the socket and the answer, the rest is the line.

Invariants: ``handle`` never raises, exits 0 or 1, prints one JSON object or nothing and never
answers code 102 (its "internal error": a bug); a request line is either decoded or rejected
with ``CniRequestError`` (what the server answers ``bad request`` to); an answer is decoded or
rejected with ``CniSpecError`` code 101.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any

import atheris

with atheris.instrument_imports(include=["agent.cni", "agent.cni_server"]):
    from agent import cni_server
    from agent.cni import plugin, spec

VARS = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")


def split_invocation(data: bytes) -> tuple[dict[str, str], bytes, bytes]:
    """The CNI variables, the agent's answer and stdin of an input (see the docstring)."""
    fields = data.split(b"\0", len(VARS) + 1)
    fields += [b""] * (len(VARS) + 2 - len(fields))
    env = {name: value.decode("utf-8", "surrogateescape")
           for name, value in zip(VARS, fields, strict=False) if value}
    return env, fields[len(VARS)], fields[len(VARS) + 1]


def _plugin(data: bytes) -> None:
    env, answer, stdin = split_invocation(data)

    def ask(conf: spec.NetConf, request: Mapping[str, Any]) -> spec.AgentAnswer:
        assert request["op"] in cni_server.OPS, request
        return spec.parse_agent_response(answer)

    out, code = plugin.handle(env, stdin, ask)
    assert code in (0, 1), code
    if out:
        doc = json.loads(out)
        assert isinstance(doc, dict), out
        assert doc.get("code") != spec.ERR_INTERNAL, doc


def _server(line: bytes) -> None:
    try:
        raw = cni_server.decode_request(line)
    except cni_server.CniRequestError:
        return
    try:
        if isinstance(raw, dict) and raw.get("op") == cni_server.EXEC_OP:
            cni_server.ExecRequest.parse(raw)
        else:
            cni_server.CniRequest.parse(raw)
    except cni_server.CniRequestError:
        return


def _answer(line: bytes) -> None:
    try:
        spec.parse_agent_response(line)
    except spec.CniSpecError as e:
        assert e.code == spec.ERR_AGENT_PROTOCOL, e


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 3, data[1:]
    if mode == 0:
        _plugin(rest)
    elif mode == 1:
        _server(rest)
    else:
        _answer(rest)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
