"""``ambit-cni``: the chained CNI plugin that hands every new pod to the node agent.

Why it exists: capture must be in place before a pod's first packet, and the only moment the
node is guaranteed to see a pod before it runs is the CNI ADD of its sandbox. The main plugin
(ptp, bridge, Calico, ...) creates the interfaces and addresses; ``ambit-cni`` runs after it in
the conflist, passes its result through unchanged and tells the node agent (one JSON line over
its Unix socket, ``spec.agent_request``) which pod got which IPs on which host interface.

Failure policy (``"failurePolicy"`` in the network config):

* ``fail-closed`` (default): if the agent is unreachable or does not answer in time, ADD fails
  with CNI code 11 ("try again later"), so the kubelet tears the sandbox down and retries it;
  if the agent refuses the pod (``ok: false``), ADD fails with code 100. No pod runs uncaptured.
* ``fail-open``: the same failures are logged to stderr and the result is passed through, so
  the pod starts without capture. CHECK follows the same policy.

DEL never fails: it tells the agent best effort and exits 0 (DEL must be idempotent, and a pod
must be deletable while the agent is down; the agent reconciles what it missed).

Stdout carries exactly one JSON document (the result, the VERSION answer or a CNI error) or
nothing; diagnostics go to stderr, and no traceback is ever printed.

One implementation, two ways in: ``handle`` is the whole plugin as a function of its inputs
(CNI variables, stdin) and of how to ask the agent. The ``ambit-cni`` Python executable (the
dev cluster, tests) calls it with ``socket_ask`` (the request over the agent's socket). On a
real node the runtime executes the static host binary (``agent/cni/shim``) instead, which
forwards its inputs to the agent; the agent (``agent/cni_server.py``) calls ``handle`` with an
in-process ``ask_agent``, so the CNI protocol logic (``spec``) and these messages live in one
place. The shim repeats only what it must do without the agent (VERSION, failure policy).
"""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any

from agent.cni import spec
from agent.cni.spec import (
    AgentAnswer,
    CniSpecError,
    Command,
    FailurePolicy,
    Invocation,
    NetConf,
)

MAX_ANSWER_BYTES = 64 * 1024
# socket.settimeout() overflows past ~9e9 s; a "timeoutSeconds" beyond a year means "wait".
MAX_WAIT_SECONDS = 365 * 24 * 3600.0


class AgentUnavailable(Exception):
    """The node agent could not be asked: no socket, nobody listening, timeout, closed early."""


AskAgent = Callable[[NetConf, Mapping[str, Any]], AgentAnswer]
"""How ``handle`` asks the node agent: the config (socket, timeout) and the request in, the
answer out; raises ``AgentUnavailable`` or ``CniSpecError`` (code 101), as ``call_agent``."""


def call_agent(socket_path: str, request: Mapping[str, Any], timeout: float) -> AgentAnswer:
    """Send one request to the agent and return its answer, all within ``timeout`` seconds.

    Raises ``AgentUnavailable`` (the reason in words) when the agent cannot be reached or does
    not answer in time, and ``CniSpecError`` (code 101) when its answer is not a response.
    """
    deadline = time.monotonic() + timeout

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return min(left, MAX_WAIT_SECONDS)

    data = (json.dumps(request, separators=(",", ":")) + "\n").encode()
    buf = b""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(remaining())
            sock.connect(socket_path)
            sock.settimeout(remaining())
            sock.sendall(data)
            while b"\n" not in buf:
                sock.settimeout(remaining())
                chunk = sock.recv(4096)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_ANSWER_BYTES:
                    break
    except FileNotFoundError:
        raise AgentUnavailable(f"the socket {socket_path} does not exist") from None
    except ConnectionRefusedError:
        raise AgentUnavailable(
            f"nothing listens on {socket_path} (a socket left behind by an agent that exited)"
        ) from None
    except TimeoutError:
        raise AgentUnavailable(f"no answer within {timeout:g}s") from None
    except OSError as e:
        raise AgentUnavailable(f"{socket_path}: {e.strerror or e}") from None
    if not buf.strip():
        raise AgentUnavailable("it closed the connection without answering")
    return spec.parse_agent_response(buf.split(b"\n", 1)[0])


def socket_ask(conf: NetConf, request: Mapping[str, Any]) -> AgentAnswer:
    """``AskAgent`` over the agent's Unix socket (the ``ambit-cni`` Python executable)."""
    return call_agent(conf.agent_socket, request, conf.timeout_seconds)


# --- the commands --------------------------------------------------------------------------


def _pod(inv: Invocation) -> str:
    if inv.pod_name:
        return f"pod {inv.pod_namespace or '?'}/{inv.pod_name} (container {inv.container_id})"
    return f"container {inv.container_id}"


def _consequence(inv: Invocation) -> str:
    if inv.command is Command.ADD:
        return (
            f"{_pod(inv)} cannot be captured, so its sandbox fails (failurePolicy fail-closed) "
            "and the kubelet retries it"
        )
    return f"the capture of {_pod(inv)} cannot be checked (failurePolicy fail-closed)"


def _unavailable_error(inv: Invocation, conf: NetConf, reason: str) -> CniSpecError:
    return CniSpecError(
        spec.ERR_TRY_AGAIN_LATER,
        f"the Ambit node agent at {conf.agent_socket} is not running or not answering "
        f"({reason}): {_consequence(inv)}. Check the node agent on this node (its pod and "
        f"log; `ls -l {conf.agent_socket}` shows whether it created its socket) and that "
        '"agentSocket" in the CNI config is the socket it listens on',
        details=reason,
    )


def _refused_error(inv: Invocation, conf: NetConf, error: str) -> CniSpecError:
    return CniSpecError(
        spec.ERR_AGENT_REFUSED,
        f"the Ambit node agent at {conf.agent_socket} refused {inv.command} of {_pod(inv)}: "
        f"{error}; see the node agent's log on this node for why",
        details=error,
    )


@dataclass(frozen=True)
class _Failure:
    error: CniSpecError  # what fail-closed reports
    summary: str  # what fail-open logs


def _ask(inv: Invocation, ask_agent: AskAgent) -> _Failure | None:
    """Ask the agent about ``inv``; ``None`` if it said ok, else what went wrong."""
    conf = inv.conf
    assert conf is not None  # parse_invocation sets it for every command but VERSION
    op = inv.command.lower()
    where = f"the node agent at {conf.agent_socket}"
    try:
        answer = ask_agent(conf, spec.agent_request(inv, op))
    except AgentUnavailable as e:
        return _Failure(_unavailable_error(inv, conf, str(e)), f"{where} is unreachable ({e})")
    except CniSpecError as e:  # an answer that is not a response
        return _Failure(e, f"{where} gave an invalid answer ({e.msg})")
    if not answer.ok:
        return _Failure(_refused_error(inv, conf, answer.error), f"{where}: {answer.error}")
    return None


def _apply_policy(inv: Invocation, failure: _Failure | None, err_out: IO[str]) -> None:
    """Raise the failure's error under fail-closed; under fail-open only log it."""
    assert inv.conf is not None
    if failure is None:
        return
    if inv.conf.failure_policy is FailurePolicy.FAIL_OPEN:
        what = "starts WITHOUT capture" if inv.command is Command.ADD else "is reported healthy"
        _log(
            err_out,
            f"{inv.command} of {_pod(inv)}: {failure.summary}; the pod {what} "
            "(failurePolicy fail-open)",
        )
        return
    raise failure.error


def _add(inv: Invocation, ask_agent: AskAgent, out: IO[str], err_out: IO[str]) -> None:
    assert inv.conf is not None and inv.conf.prev_result is not None
    _apply_policy(inv, _ask(inv, ask_agent), err_out)
    result = dict(inv.conf.prev_result)
    # A chained plugin passes the previous result through; a result must carry its version.
    result.setdefault("cniVersion", inv.conf.cni_version)
    _emit(out, result)


def _check(inv: Invocation, ask_agent: AskAgent, err_out: IO[str]) -> None:
    _apply_policy(inv, _ask(inv, ask_agent), err_out)


def _delete(
    env: Mapping[str, str], stdin: bytes, ask_agent: AskAgent, err_out: IO[str]
) -> None:
    """Best effort: every failure is logged, none is returned."""
    try:
        inv = _parse_invocation(env, stdin)
    except CniSpecError as e:
        _log(err_out, f"DEL: invalid input, nothing to tell the node agent: {e.msg}")
        return
    assert inv.conf is not None
    try:
        answer = ask_agent(inv.conf, spec.agent_request(inv, "del"))
    except (AgentUnavailable, CniSpecError) as e:
        _log(
            err_out,
            f"DEL of {_pod(inv)}: the node agent at {inv.conf.agent_socket} was not told "
            f"({e}); it drops the pod when it reconciles",
        )
        return
    if not answer.ok:
        _log(err_out, f"DEL of {_pod(inv)}: the node agent answered: {answer.error}")


# --- process plumbing ----------------------------------------------------------------------


def _emit(out: IO[str], doc: Mapping[str, Any]) -> None:
    out.write(json.dumps(doc) + "\n")
    out.flush()


def _log(err_out: IO[str], msg: str) -> None:
    try:
        err_out.write(f"ambit-cni: {msg}\n")
        err_out.flush()
    except OSError:
        pass  # nobody reads our stderr; the exit status and stdout still tell the story


def _parse_invocation(env: Mapping[str, str], stdin: bytes) -> Invocation:
    # json.loads raises RecursionError (not a ValueError) on deeply nested input: that is a
    # config that cannot be decoded, not a bug of ours.
    try:
        return spec.parse_invocation(env, stdin)
    except RecursionError as e:
        raise CniSpecError(
            spec.ERR_INVALID_NETWORK_CONFIG,
            f"network config on stdin is not valid JSON ({e}); the runtime must pass the "
            "plugin's entry of the conflist as one JSON object",
        ) from None


def _cni_version_of(stdin: bytes) -> str:
    try:
        return spec.cni_version_of(stdin)
    except RecursionError:
        return spec.LATEST_VERSION


def _run(
    env: Mapping[str, str], stdin: bytes, ask_agent: AskAgent, out: IO[str], err_out: IO[str]
) -> int:
    version = _cni_version_of(stdin)
    command: Command | None = None
    try:
        command = spec.parse_command(env)
        if command is Command.VERSION:
            _emit(out, spec.version_result())
            return 0
        if command is Command.DEL:
            _delete(env, stdin, ask_agent, err_out)
            return 0
        inv = _parse_invocation(env, stdin)
        if command is Command.ADD:
            _add(inv, ask_agent, out, err_out)
        else:
            _check(inv, ask_agent, err_out)
        return 0
    except CniSpecError as e:
        _emit(out, e.result(version))
        return 1
    except Exception as e:  # a bug: still answer in CNI terms, never with a traceback
        _log(err_out, f"internal error: {type(e).__name__}: {e}")
        if command is Command.DEL:
            return 0
        err = CniSpecError(
            spec.ERR_INTERNAL,
            f"ambit-cni failed unexpectedly ({type(e).__name__}: {e}); please report it with "
            "the network config and this message",
        )
        _emit(out, err.result(version))
        return 1


def handle(
    env: Mapping[str, str],
    stdin: bytes,
    ask_agent: AskAgent,
    err_out: IO[str] | None = None,
) -> tuple[bytes, int]:
    """The whole plugin as a function: CNI variables and stdin in, stdout and exit status out.

    ``env`` needs only the ``CNI_*`` variables. ``ask_agent`` is how the node agent is asked
    (``socket_ask``, or the agent's own in-process call when it runs a request of the host
    binary). Diagnostics go to ``err_out`` (dropped if ``None``). Never raises.
    """
    out = io.StringIO()
    code = _run(env, stdin, ask_agent, out, err_out if err_out is not None else io.StringIO())
    return out.getvalue().encode(), code


def run(env: Mapping[str, str], stdin: bytes, out: IO[str], err_out: IO[str]) -> int:
    """One plugin invocation with explicit inputs and outputs; returns the exit status."""
    stdout, code = handle(env, stdin, socket_ask, err_out)
    if stdout:
        out.write(stdout.decode())
        out.flush()
    return code


def _read_stdin() -> bytes:
    # VERSION may be run by hand from a terminal; do not wait for input that never comes.
    if sys.stdin is None or sys.stdin.isatty():
        return b""
    return sys.stdin.buffer.read()


def main() -> int:
    """Entry point of the ``ambit-cni`` executable (CNI calls it by its ``type``)."""
    try:
        return run(os.environ, _read_stdin(), sys.stdout, sys.stderr)
    except KeyboardInterrupt:
        _log(sys.stderr, "interrupted")
        return 1
    except OSError as e:  # stdin or stdout is gone: nothing more can be said
        _log(sys.stderr, f"cannot talk to the container runtime: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
