"""Write the seed corpora under ``fuzz/corpus/<target>/`` (``python -m fuzz.make_seeds``).

Small, meaningful inputs: valid messages, and the known-bad ones earlier reviews and probes
found (non-ASCII digits in ports, non-UTF-8 header bytes, an oversized frame header, deep
nesting). Rewrites the ``seed-*`` files only; ``crash-*`` files (inputs of fixed findings,
among them the deeply nested documents that used to be seeds here) are kept.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import hpack

from mesh.api.ambit.v1 import state_pb2
from mesh.state.parse import load_state_text
from mesh.state.wire import delta_update, full_update
from ztunnel.hbone.core import HboneConnection

CORPUS = Path(__file__).resolve().parent / "corpus"
DEEP = 5000  # past Python's default recursion limit (1000)


def _frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack("!I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack("!I", sid) \
        + payload


def _headers(sid: int, headers: list[tuple[bytes, bytes]], end: bool = False) -> bytes:
    return _frame(1, 4 | (1 if end else 0), sid, hpack.Encoder().encode(headers))


def _connect(authority: bytes, *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"CONNECT"), (b":authority", authority), *extra]


def _client_stream() -> bytes:
    """What a real HBONE client sends after its preface: a CONNECT, data, FIN."""
    c = HboneConnection(client_side=True)
    c.initiate()
    c.data_to_send()
    sid = c.open_stream("10.0.0.1:8080")
    c.data_to_send()
    out = _headers(sid, _connect(b"10.0.0.1:8080"))
    out += _frame(0, 0, sid, b"hello") + _frame(0, 1, sid, b"bye")
    return out


def hbone() -> dict[str, bytes]:
    def seed(stream: bytes, policy: int = 0b1111, cuts: tuple[int, ...] = ()) -> bytes:
        return bytes([policy, len(cuts)]) + b"".join(struct.pack("!H", c) for c in cuts) + stream

    ok = _client_stream()
    ping = _frame(6, 0, 0, b"12345678")
    return {
        "connect-data-fin": seed(ok),
        "connect-data-fin-split": seed(ok, cuts=(3, 10, 11, 40)),
        "connect-rejected": seed(ok, policy=0),
        "connect-then-reset": seed(ok + _frame(3, 0, 1, struct.pack("!I", 8))),
        "connect-draining": seed(ok + _headers(3, _connect(b"10.0.0.2:80")), policy=0b10001),
        "two-streams-window-update": seed(
            _headers(1, _connect(b"[fd00::1]:443")) + _headers(3, _connect(b"10.0.0.3:80"))
            + _frame(8, 0, 0, struct.pack("!I", 1 << 20)) + _frame(8, 0, 1, struct.pack("!I", 5))
            + _frame(0, 0, 3, b"x" * 100)),
        "authority-arabic-indic-digits": seed(
            _headers(1, _connect("10.0.0.1:٨٠٨٠".encode()))),
        "authority-ipv6-zone": seed(_headers(1, _connect(b"[fe80::1%eth0]:80"))),
        "authority-unbracketed-ipv6": seed(_headers(1, _connect(b"fd00::1:80"))),
        "header-value-not-utf8": seed(_headers(1, _connect(b"10.0.0.1:80", (b"x-b", b"\xff\xfe")))),
        "authority-not-utf8": seed(_headers(1, _connect(b"10.0.0.1:\xff80"))),
        "content-length-not-digits": seed(
            _headers(1, _connect(b"10.0.0.1:80", (b"content-length", b"\xd9\xa1")))
            + _frame(0, 0, 1, b"abc")),
        "get-not-connect": seed(_headers(1, [(b":method", b"GET"), (b":path", b"/"),
                                             (b":scheme", b"http"), (b":authority", b"a")])),
        "extended-connect": seed(_headers(1, _connect(b"10.0.0.1:80", (b":protocol", b"ws")))),
        "frame-16mib-header": seed(b"\xff\xff\xff\x00\x00\x00\x00\x00\x01"),
        "ping-flood": seed(ping * 50),
        "settings-and-goaway": seed(
            _frame(4, 0, 0, struct.pack("!HI", 4, 1 << 30)) + _frame(4, 1, 0, b"")
            + _frame(7, 0, 0, struct.pack("!II", 1, 0) + b"bye")),
        "continuation": seed(
            _frame(1, 0, 1, hpack.Encoder().encode(_connect(b"10.0.0.1:80"))[:3])
            + _frame(9, 4, 1, hpack.Encoder().encode(_connect(b"10.0.0.1:80"))[3:])),
        "data-on-idle-stream": seed(_frame(0, 0, 7, b"zz")),
    }


def socks5() -> dict[str, bytes]:
    def req(atyp: int, addr: bytes, port: int = 80, cmd: int = 1) -> bytes:
        return b"\x01" + bytes([5, cmd, 0, atyp]) + addr + struct.pack("!H", port)

    return {
        "greeting": b"\x00\x05\x01\x00",
        "greeting-many-methods": b"\x00\x05\x03\x00\x01\x02",
        "greeting-socks4": b"\x00\x04\x01\x00\x50",
        "greeting-no-method": b"\x00\x05\x00",
        "greeting-short": b"\x00\x05\x05\x00",
        "request-ipv4": req(1, bytes([10, 0, 0, 1])),
        "request-ipv6": req(4, bytes(15) + b"\x01", 443),
        "request-domain": req(3, b"\x0eecho.default.x", 8080),
        "request-domain-nul": req(3, b"\x05ab\x00cd"),
        "request-domain-not-ascii": req(3, b"\x04\xd9\xa8\xd9\xa0"),
        "request-domain-empty": req(3, b"\x00"),
        "request-port-0": req(1, bytes(4), 0),
        "request-bind": req(1, bytes(4), 80, 2),
        "request-atyp-2": req(2, bytes(4)),
        "request-short": b"\x01\x05\x01\x00\x01",
    }


def authority() -> dict[str, bytes]:
    ports = ["80", "65535", "1", "00080", "0", "65536", "٨٠", "٨٠٨٠", "\uff18\uff10", "+80",
             " 80", "8_0", "", "123456", "0x50", "-1"]
    auths = ["10.0.0.1:8080", "[fd00::1]:80", "fd00::1:80", "10.0.0.1:٨٠٨٠", "[fe80::1%eth0]:80",
             "10.0.0.1:+80", "10.0.0.1: 80", "10.0.0.1", "[10.0.0.1]:80", "[::ffff:1.2.3.4]:1",
             "echo.default:80", "10.0.0.1:80:80", "[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255]"
             ":65535", ":80", "10.0.0.1:", "010.0.0.1:80"]
    out = {f"port-{i:02d}": b"\x00" + p.encode() for i, p in enumerate(ports)}
    out |= {f"authority-{i:02d}": b"\x01" + a.encode() for i, a in enumerate(auths)}
    out["authority-not-utf8"] = b"\x0110.0.0.1:\xff80"
    return out


STATE_DOC = """\
trustDomain: cluster.local
workloads:
  - {name: client, namespace: default, serviceAccount: client, node: node-a,
     addresses: [10.0.1.5], labels: {app: client}}
  - {name: echo-1, namespace: default, node: node-b, addresses: [10.0.2.5, "fd00::5"],
     labels: {app: echo}, protocol: HBONE, status: Healthy}
  - {name: wp-1, namespace: default, serviceAccount: echo-waypoint, node: node-b,
     addresses: [10.0.2.7], protocol: TCP,
     labels: {gateway.networking.k8s.io/gateway-name: echo-waypoint}}
services:
  - name: echo
    namespace: default
    vips: [10.96.0.10]
    selector: {app: echo}
    ports: [{port: 80, targetPort: 8080}, {port: 443}]
    waypoint: {name: echo-waypoint}
authorizationPolicies:
  - name: allow-client
    namespace: default
    spec:
      selector: {matchLabels: {app: echo}}
      action: ALLOW
      rules:
        - from: [{source: {principals: [cluster.local/ns/default/sa/client],
                           ipBlocks: [10.0.0.0/8]}}]
          to: [{operation: {ports: ["8080"]}}]
peerAuthentications:
  - name: default
    namespace: default
    spec: {mtls: {mode: STRICT}, portLevelMtls: {"9090": {mode: PERMISSIVE}}}
version: v1
"""


def state_text() -> dict[str, bytes]:
    return {
        "docs-example": STATE_DOC.encode(),
        "json": json.dumps({"workloads": [{"name": "a", "namespace": "n", "node": "x",
                                           "addresses": ["10.0.0.1"]}]}).encode(),
        "empty": b"",
        "port-arabic-indic": STATE_DOC.replace("targetPort: 8080", "targetPort: ٨٠٨٠").encode(),
        "port-string": STATE_DOC.replace("port: 80,", 'port: "80",').encode(),
        "duplicate-address": STATE_DOC.replace("10.0.2.7", "10.0.1.5").encode(),
        "vip-is-pod-ip": STATE_DOC.replace("10.96.0.10", "10.0.2.5").encode(),
        "bad-yaml": b"workloads: [\n  - {name: a\n",
        "not-utf8": b"workloads:\n  - name: \xff\xfe\n",
        "python-tag": b"!!python/object/apply:os.system ['true']\n",
        "anchors": b"a: &a [1, 2]\nb: &b [*a, *a]\nworkloads: [*b]\n",
        "list-top": b"- 1\n- 2\n",
        "bad-ip": STATE_DOC.replace("10.0.1.5", "10.0.1.256").encode(),
        "l7-attribute": STATE_DOC.replace("ports: [\"8080\"]", "paths: [/x]").encode(),
    }


def state_wire() -> dict[str, bytes]:
    config = load_state_text(STATE_DOC)
    other = load_state_text(STATE_DOC.replace("10.0.1.5", "10.0.1.6").replace("v1", "v2"))
    delta = delta_update(config, other)
    assert delta is not None
    bad_spec = state_pb2.StateUpdate(authorization_policies=[
        state_pb2.Policy(name="p", namespace="n", spec_json="{")])
    clash = state_pb2.StateUpdate(full=True, workloads=[
        state_pb2.Workload(name="a", namespace="n", node="x", addresses=["10.0.0.1"]),
        state_pb2.Workload(name="b", namespace="n", node="x", addresses=["10.0.0.1"])])
    bad_port = state_pb2.StateUpdate(services=[state_pb2.Service(
        name="s", namespace="n", vips=["10.96.0.1"], ports=[state_pb2.ServicePort(port=70000)])])
    full = full_update(config).SerializeToString()
    return {
        "full": full,
        "delta": delta.SerializeToString(),
        "removal-only": state_pb2.StateUpdate(removed_workloads=["default/client"])
        .SerializeToString(),
        "spec-not-json": bad_spec.SerializeToString(),
        "address-clash": clash.SerializeToString(),
        "port-too-big": bad_port.SerializeToString(),
        "truncated": full[: len(full) // 2],
        "string-not-utf8": b"\x0a\x02\xff\xfe",
        "empty": b"",
    }


def _invocation(mode: int, env: dict[str, str], answer: bytes, stdin: bytes) -> bytes:
    names = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")
    fields = [env.get(n, "").encode("utf-8", "surrogateescape") for n in names]
    return bytes([mode]) + b"\0".join([*fields, answer, stdin])


PREV = {"cniVersion": "1.0.0", "interfaces": [{"name": "veth1"}, {"name": "eth0", "sandbox":
        "/var/run/netns/x"}], "ips": [{"address": "10.244.1.5/24", "interface": 1}]}
CONF = {"cniVersion": "1.0.0", "name": "k8s", "type": "ambit-cni", "prevResult": PREV}
ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc123", "CNI_NETNS": "/var/run/netns/x",
       "CNI_IFNAME": "eth0", "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web",
       "CNI_PATH": "/opt/cni/bin"}


def _cni_common(mode: int, answer: bytes) -> dict[str, bytes]:
    conf = json.dumps(CONF).encode()
    return {
        "add": _invocation(mode, ENV, answer, conf),
        "del": _invocation(mode, ENV | {"CNI_COMMAND": "DEL"}, answer, b"{}"),
        "check": _invocation(mode, ENV | {"CNI_COMMAND": "CHECK"}, answer, conf),
        "version": _invocation(mode, {"CNI_COMMAND": "VERSION"}, answer, b""),
        "no-command": _invocation(mode, {}, answer, conf),
        "fail-open": _invocation(mode, ENV, answer, json.dumps(
            CONF | {"failurePolicy": "fail-open", "timeoutSeconds": 0.5}).encode()),
        "bad-ifname": _invocation(mode, ENV | {"CNI_IFNAME": "eth0/x"}, answer, conf),
        "bad-args": _invocation(mode, ENV | {"CNI_ARGS": "nokey;=v"}, answer, conf),
        "env-not-utf8": _invocation(mode, ENV | {"CNI_CONTAINERID": "ab\udcffc"}, answer, conf),
        "conf-bom-nan": _invocation(mode, ENV, answer, b"\xef\xbb\xbf" + json.dumps(
            CONF | {"timeoutSeconds": float("nan")}).encode()),
        "conf-deep-nesting": _invocation(mode, ENV, answer, b"[" * DEEP),
        "conf-big-int": _invocation(mode, ENV, answer, b'{"timeoutSeconds": 1' + b"0" * 5000
                                    + b"}"),
        "conf-relative-socket": _invocation(mode, ENV, answer, json.dumps(
            CONF | {"agentSocket": "cni.sock"}).encode()),
        "conf-not-utf8": _invocation(mode, ENV, answer, b'{"name": "\xff"}'),
    }


def cni_request() -> dict[str, bytes]:
    out = _cni_common(0, b'{"ok": true, "captured": true, "reason": "mesh"}')
    add = {"op": "add", "containerId": "abc", "netns": "/x", "ifname": "eth0", "podName": "web",
           "podNamespace": "default", "podUid": "u", "ips": ["10.244.1.5"], "hostIface": "veth1"}
    ex = {"op": "exec", "env": ENV, "stdin": json.dumps(CONF)}
    out |= {
        "server-add": b"\x01" + json.dumps(add).encode() + b"\n",
        "server-exec": b"\x01" + json.dumps(ex).encode() + b"\n",
        "server-exec-surrogates": b"\x01" + json.dumps(ex | {"stdin": "\udcff"}).encode(),
        "server-exec-lone-high-surrogate": b'\x01{"op": "exec", "env": {}, "stdin": "\\ud800"}',
        "server-bad-ips": b"\x01" + json.dumps(add | {"ips": [1]}).encode(),
        "server-not-utf8": b'\x01{"op": "\xff"}',
        "answer-ok": b'\x02{"ok": true, "captured": false, "reason": "not in mesh"}\n',
        "answer-error": b'\x02{"ok": false, "error": "boom"}',
        "answer-garbage": b"\x02HTTP/1.1 400 Bad Request\r\n",
    }
    return out


def cni_shim() -> dict[str, bytes]:
    answer = b'{"exit": 0, "stdout": "{}\\n", "stderr": "ok\\udcff"}'
    out = _cni_common(0, answer)
    out |= {f"unavailable-{k}": v for k, v in _cni_common(1, b"").items()}
    out["answer-garbage"] = _invocation(0, ENV, b"HTTP/1.1 400", json.dumps(CONF).encode())
    out["answer-bad-exit"] = _invocation(0, ENV, b'{"exit": 256, "stdout": ""}', b"{}")
    out["answer-deep-nesting"] = _invocation(0, ENV, b"[" * DEEP, json.dumps(CONF).encode())
    return out


def link_request() -> dict[str, bytes]:
    def line(doc: object) -> bytes:
        return json.dumps(doc).encode()

    wl = {"uid": "default/web-0", "name": "web-0", "namespace": "default",
          "serviceAccount": "web", "node": "node-1", "addresses": ["10.244.1.5"],
          "labels": {"app": "web"}, "workloadName": "web"}
    out = {
        "added": line({"op": "pod_added", "id": 1, "workload": wl}),
        "added-dual-stack": line({"op": "pod_added", "id": 2, "workload": {
            **wl, "addresses": ["10.244.1.5", "fd00:10:244:1::5"]}}),
        "deleted": line({"op": "pod_deleted", "id": 3, "uid": "default/web-0"}),
        "other-node": line({"op": "pod_added", "id": 4, "workload": {**wl, "node": "node-2"}}),
        "loopback-address": line({"op": "pod_added", "id": 5, "workload": {
            **wl, "addresses": ["127.0.0.1"]}}),
        "address-twice": line({"op": "pod_added", "id": 6, "workload": {
            **wl, "addresses": ["10.244.1.5", "10.244.1.5"]}}),
        "uid-mismatch": line({"op": "pod_added", "id": 7, "workload": {
            **wl, "uid": "default/other"}}),
        "extra-field": line({"op": "pod_deleted", "id": 8, "uid": "a/b", "x": 1}),
        "bool-id": line({"op": "pod_deleted", "id": True, "uid": "a/b"}),
        "huge-id": line({"op": "pod_deleted", "id": 2**60, "uid": "a/b"}),
        "unknown-op": line({"op": "pod_exploded", "id": 9}),
        "not-json": b"pod_added default/web-0",
        "not-utf8": b'{"op": "pod_deleted", "id": 1, "uid": "default/web-' + bytes([0xFF]) + b'"}',
        "deep-nesting": b"[" * DEEP + b"]" * DEEP,
        # issue 15: a restart's superseded ztunnel, in-pod namespaces
        "superseded": line({"op": "superseded", "id": 10, "by": 4242}),
        "pod-netns": line({"op": "pod_netns", "id": 11, "uid": "default/web-0",
                           "ips": ["10.244.1.5"], "listeners": [], "fds": 1}),
        "pod-netns-listeners": line({"op": "pod_netns", "id": 12, "uid": "default/web-0",
                                     "ips": ["10.244.1.5"], "listeners": [
                                         "outbound", "inbound_plaintext", "inbound"], "fds": 4}),
        "pod-netns-gone": line({"op": "pod_netns_gone", "id": 13, "uid": "default/web-0"}),
    }
    return out


TARGETS = {"hbone_core": hbone, "socks5": socks5, "authority": authority,
           "state_text": state_text, "state_wire": state_wire, "cni_request": cni_request,
           "cni_shim": cni_shim, "link_request": link_request}


def main() -> None:
    for target, make in TARGETS.items():
        d = CORPUS / target
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("seed-*"):
            old.unlink()
        seeds = make()
        for name, data in seeds.items():
            (d / f"seed-{name}").write_bytes(data)
        print(f"{target}: {len(seeds)} seeds, {sum(map(len, seeds.values()))} bytes")


if __name__ == "__main__":
    main()
