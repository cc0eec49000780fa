"""The ``ambit`` commands that manage the embedded registry (namespace, workload, service,
policy, apply, delete, node, get).

Why here and not in ``ambit/cli.py``: the command line is one more client of
``EmbeddedRegistry``; keeping argument handling next to it keeps ``cli.py`` a thin dispatcher
and lets the messages speak in the registry's terms. Each command's parser names its handler
(``set_defaults``: ``func`` is ``run``, which opens the registry, and ``registry_handler`` the
function that does the command). Every failure raises ``CommandError``, a
``mesh.cli.UsageError``, which ``ambit`` prints as ``ambit: error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import yaml

from controller.registry.documents import (
    DEFAULT_NAMESPACE,
    KINDS,
    DocumentError,
    load_documents,
    to_document,
)
from controller.registry.model import (
    DATAPLANE_MODE_LABEL,
    Pod,
    Record,
    RegistrySnapshot,
)
from controller.registry.sqlite import Change, EmbeddedRegistry, RegistryError
from controller.registry.translate import in_mesh, waypoint_binding, waypoint_of
from controller.waypoint.model import ParentRef
from controller.waypoint.parse import format_duration, has_target_refs
from mesh.cli import UsageError
from mesh.ports import GATEWAY_NAME_LABEL

if TYPE_CHECKING:
    from mesh.cli import SubParsers

DB_ENV = "AMBIT_DB"
DEFAULT_DB = Path("/var/lib/ambit/registry.db")

# What each command line word means, kubectl-style (singular, plural, short).
_KIND_ALIASES: dict[str, str] = {
    alias: kind
    for kind, short in (("Namespace", "ns"), ("Workload", "wl"), ("Service", "svc"),
                        ("AuthorizationPolicy", "ap"), ("PeerAuthentication", "pa"),
                        ("Gateway", "gtw"), ("HTTPRoute", "httproute"),
                        ("GRPCRoute", "grpcroute"), ("TCPRoute", "tcproute"),
                        ("HTTPFault", "httpfault"))
    for alias in (kind.lower(), kind.lower() + "s", short)
} | {"authorizationpolicies": "AuthorizationPolicy"}
_KIND_WORDS = ("namespace, workload, service, authorizationpolicy, peerauthentication, "
               "gateway, httproute, grpcroute, tcproute, httpfault")


class CommandError(UsageError):
    """A registry command that cannot be done; the message says why and how to fix it."""


Handler = Callable[[EmbeddedRegistry, argparse.Namespace, TextIO], None]
"""Does one registry command on an open registry, writing its output to the stream."""


# --- argument parsers ----------------------------------------------------------------------


def add_commands(sub: SubParsers) -> None:
    """Add the registry commands to the ``ambit`` parser, each with its handler."""
    db = argparse.ArgumentParser(add_help=False)
    db.add_argument("--db", type=Path, metavar="PATH",
                    help=f"registry database (default: ${DB_ENV}, else {DEFAULT_DB})")

    ns = sub.add_parser("namespace", help="put a namespace's pods in the mesh, or take them out",
                        description="Label a namespace ambit.dev/dataplane-mode=ambient "
                        "(enable, creating it if new) or remove the label (disable).")
    nsub = ns.add_subparsers(dest="registry_action", metavar="ACTION", required=True)
    for action, text in (("enable", "enrol the namespace's workloads in the mesh"),
                         ("disable", "take the namespace's workloads out of the mesh")):
        p = nsub.add_parser(action, parents=[db], help=text, description=text + ".")
        _handles(p, _namespace)
        p.add_argument("name", metavar="NAME")

    wl = sub.add_parser("workload", help="register or remove a workload (a pod's addresses)",
                        description="Register workloads (what a pod is in Kubernetes).")
    wsub = wl.add_subparsers(dest="registry_action", metavar="ACTION", required=True)
    add = wsub.add_parser("add", parents=[db], help="register a workload, or replace it",
                          description="Register a workload, or replace the one with this "
                          "name. It is in the mesh when its namespace is enabled and it has no "
                          f"label {DATAPLANE_MODE_LABEL}=none.")
    _handles(add, _workload_add)
    add.add_argument("--name", required=True)
    add.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    add.add_argument("--node", required=True, help="the node (ztunnel) that serves it")
    add.add_argument("--ip", action="append", default=[], metavar="IP",
                     help="an address of the workload (repeatable; none yet = scheduled, "
                     "not started)")
    add.add_argument("--service-account", default="default",
                     help="its identity: spiffe://<trust domain>/ns/<namespace>/sa/<this>")
    add.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                     help="a label for service and policy selectors (repeatable)")
    add.add_argument("--workload-name", help="owning deployment etc., for metrics")
    add.add_argument("--not-ready", action="store_true",
                     help="register it as not ready: no service traffic until it is")
    rm = wsub.add_parser("remove", parents=[db], help="remove a workload",
                         description="Remove a registered workload.")
    _handles(rm, _workload_remove)
    rm.add_argument("ref", metavar="NAMESPACE/NAME")

    svc = sub.add_parser("service", help="register services (virtual IPs)",
                         description="Register services: virtual IPs spread over workloads.")
    ssub = svc.add_subparsers(dest="registry_action", metavar="ACTION", required=True)
    sap = ssub.add_parser("apply", parents=[db], help="create or replace services",
                          description="Create or replace services, from Service documents "
                          "(-f) or from flags.")
    _handles(sap, _service_apply)
    sap.add_argument("-f", "--filename", action="append", default=[], metavar="FILE",
                     help="YAML file of Service documents, '-' for stdin (repeatable)")
    sap.add_argument("--name")
    sap.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    sap.add_argument("--vip", action="append", default=[], metavar="IP",
                     help="a virtual (cluster) IP (repeatable)")
    sap.add_argument("--port", action="append", default=[], metavar="PORT[:TARGET]",
                     help="a service port and the workload port it goes to (repeatable)")
    sap.add_argument("--selector", action="append", default=[], metavar="KEY=VALUE",
                     help="workload label the service selects (repeatable)")

    pol = sub.add_parser("policy", help="apply AuthorizationPolicy and PeerAuthentication",
                         description="Policies in the CRDs' YAML (security.ambit.dev/v1).")
    psub = pol.add_subparsers(dest="registry_action", metavar="ACTION", required=True)
    pap = psub.add_parser("apply", parents=[db], help="create or replace policies",
                          description="Create or replace AuthorizationPolicy and "
                          "PeerAuthentication documents, all or none.")
    _handles(pap, _policy_apply)
    pap.add_argument("-f", "--filename", action="append", required=True, metavar="FILE",
                     help="YAML file, '-' for stdin (repeatable)")

    ap = sub.add_parser("apply", parents=[db], help="create or replace objects from YAML",
                        description="Create or replace objects of any registry kind "
                        f"({', '.join(KINDS)}) from YAML files, in one transaction: a bad "
                        "document rejects the whole batch.")
    _handles(ap, _apply)
    ap.add_argument("-f", "--filename", action="append", required=True, metavar="FILE",
                    help="YAML file, '-' for stdin (repeatable)")

    de = sub.add_parser("delete", parents=[db], help="delete an object",
                        description="Delete an object. Deleting a namespace deletes "
                        "everything in it.")
    _handles(de, _delete)
    de.add_argument("kind", metavar="KIND", help=f"{_KIND_WORDS} (or ns, wl, svc, ap, pa, "
                    "gtw)")
    de.add_argument("ref", metavar="NAMESPACE/NAME", help="NAME alone for a namespace; "
                    f"otherwise NAME means {DEFAULT_NAMESPACE}/NAME")

    node = sub.add_parser("node", help="node credentials for embedded mode",
                          description="Tokens that ztunnels present to the controller.")
    nosub = node.add_subparsers(dest="registry_action", metavar="ACTION", required=True)
    join = nosub.add_parser("join", parents=[db], help="issue a token for a node",
                            description="Issue a token for NODE and print it (once; only its "
                            "hash is stored). The node's ztunnel authenticates with it.")
    _handles(join, _node_join)
    join.add_argument("node", metavar="NODE")
    revoke = nosub.add_parser("revoke", parents=[db], help="revoke a node's tokens",
                              description="Revoke every token issued to NODE, or only one.")
    _handles(revoke, _node_revoke)
    revoke.add_argument("node", metavar="NODE")
    revoke.add_argument("--token-id", metavar="ID", help="revoke only this token: the part "
                        "before the dot (listed by `ambit get nodes`)")

    get = sub.add_parser("get", parents=[db], help="list what is registered",
                         description="List registered objects and whether each workload is "
                         "in the mesh.")
    _handles(get, _get)
    get.add_argument("kind", metavar="KIND", nargs="?", default="all",
                     help="namespaces, workloads, services, authorizationpolicies, "
                     "peerauthentications, gateways, httproutes, grpcroutes, tcproutes, "
                     "httpfaults, nodes or all (default)")
    get.add_argument("-o", "--output", choices=["table", "yaml"], default="table",
                     help="yaml prints documents `ambit apply -f` takes back")


def _handles(p: argparse.ArgumentParser, handler: Handler) -> None:
    """``p``'s command is done by ``handler``, inside ``run`` (which opens the registry)."""
    p.set_defaults(func=run, registry_handler=handler)


# --- running -------------------------------------------------------------------------------


def db_path(arg: Path | None) -> Path:
    if arg is not None:
        return arg
    env = os.environ.get(DB_ENV)
    return Path(env) if env else DEFAULT_DB


@contextmanager
def _open(arg: Path | None) -> Iterator[EmbeddedRegistry]:
    path = db_path(arg)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CommandError(f"cannot create {path.parent} for the registry ({e.strerror}); "
                           f"run as a user who can, or choose another file with --db PATH or "
                           f"${DB_ENV}") from None
    try:
        registry = EmbeddedRegistry(path)
    except RegistryError as e:
        raise CommandError(f"{e} (choose another file with --db PATH or ${DB_ENV})") from None
    with registry:
        yield registry


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run one registry command; ``CommandError`` for anything the user must fix."""
    handler: Handler = args.registry_handler
    out = out or sys.stdout
    with _open(args.db) as registry:
        try:
            handler(registry, args, out)
        except (RegistryError, DocumentError) as e:
            raise CommandError(str(e)) from None
    return 0


def _print_changes(changes: Sequence[Change], out: TextIO) -> None:
    for c in changes:
        print(c, file=out)


def _warn_outside_mesh(registry: EmbeddedRegistry, changes: Sequence[Change]) -> None:
    """Say so when a workload just registered is not in the mesh, and how to change that:
    the usual surprise is forgetting to enable its namespace."""
    snapshot = registry.snapshot()
    for c in changes:
        if c.kind != "Workload" or c.action == "deleted":
            continue
        pod = next(p for p in snapshot.pods if p.key == f"{c.namespace}/{c.name}")
        reason = _outside_reason(pod, snapshot)
        if reason:
            print(f"note: Workload {pod.key} is not in the mesh ({reason})", file=sys.stderr)


def _outside_reason(pod: Pod, snapshot: RegistrySnapshot) -> str:
    if in_mesh(pod, snapshot):
        return ""
    gateway = waypoint_of(pod)
    if gateway is not None:
        return f"it is an instance of waypoint {gateway}, which terminates HBONE itself"
    if pod.opted_out:
        return f"it is labelled {DATAPLANE_MODE_LABEL}=none"
    return (f"namespace {pod.namespace} is not enabled; run `ambit namespace enable "
            f"{pod.namespace}`")


def _split_ref(ref: str, kind: str) -> tuple[str, str]:
    if kind == "Namespace":
        if "/" in ref:
            raise CommandError(f"{ref!r}: a namespace is named by NAME alone")
        return "", ref
    namespace, sep, name = ref.partition("/")
    if not sep:
        return DEFAULT_NAMESPACE, ref
    if not namespace or not name or "/" in name:
        raise CommandError(f"{ref!r}: expected NAMESPACE/NAME")
    return namespace, name


def _kind(word: str) -> str:
    kind = _KIND_ALIASES.get(word.lower())
    if kind is None:
        raise CommandError(f"{word!r} is not a kind; use one of: {_KIND_WORDS}")
    return kind


def _pairs(values: Sequence[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or not key:
            raise CommandError(f"{flag} {v!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _read_files(names: Sequence[str]) -> list[Any]:
    docs: list[Any] = []
    for name in names:
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text()
        except OSError as e:
            raise CommandError(f"cannot read {name}: {e.strerror}") from None
        try:
            docs += load_documents(text, "stdin" if name == "-" else name)
        except ValueError as e:
            raise CommandError(str(e)) from None
    if not docs:
        raise CommandError(f"{', '.join(names)}: no documents to apply")
    return docs


def _only(docs: Sequence[Any], kinds: Sequence[str], command: str) -> None:
    for i, doc in enumerate(docs):
        kind = doc.get("kind") if isinstance(doc, dict) else None
        if kind not in kinds:
            raise CommandError(f"document {i + 1} is a {kind or 'document without kind'}; "
                               f"`{command}` takes {' and '.join(kinds)} documents only "
                               "(use `ambit apply -f` for any kind)")


def _apply_flag_document(registry: EmbeddedRegistry, doc: dict[str, Any],
                         flags: dict[str, str]) -> list[Change]:
    """Apply a document built from flags, reporting a problem by the flag that caused it."""
    try:
        return registry.apply([doc])
    except DocumentError as e:
        path = e.path
        for prefix, flag in flags.items():
            if path == prefix or path.startswith((prefix + ".", prefix + "[")):
                # spec.addresses[1] -> --ip; metadata.labels.app -> --label app
                rest = path[len(prefix):]
                path = flag + (" " + rest[1:] if rest.startswith(".") else "")
                break
        raise CommandError(f"{path}: {e.problem}") from None


# --- handlers ------------------------------------------------------------------------------


def _namespace(registry: EmbeddedRegistry, args: argparse.Namespace, out: TextIO) -> None:
    enable = args.registry_action == "enable"
    change = registry.set_namespace_mode(args.name, ambient=enable)
    snapshot = registry.snapshot()
    count = sum(1 for p in snapshot.pods if p.namespace == args.name and in_mesh(p, snapshot))
    state = "enabled" if enable else "disabled"
    print(f"namespace {args.name} {state} ({change.action}); {count} workload(s) in the mesh",
          file=out)


def _workload_add(registry: EmbeddedRegistry, args: argparse.Namespace, out: TextIO) -> None:
    spec: dict[str, Any] = {"serviceAccount": args.service_account, "node": args.node,
                            "addresses": args.ip, "ready": not args.not_ready}
    if args.workload_name:
        spec["workloadName"] = args.workload_name
    doc = {"apiVersion": "ambit.dev/v1", "kind": "Workload",
           "metadata": {"name": args.name, "namespace": args.namespace,
                        "labels": _pairs(args.label, "--label")},
           "spec": spec}
    changes = _apply_flag_document(registry, doc, {
        "metadata.name": "--name", "metadata.namespace": "--namespace",
        "metadata.labels": "--label", "spec.node": "--node", "spec.addresses": "--ip",
        "spec.serviceAccount": "--service-account", "spec.workloadName": "--workload-name"})
    _print_changes(changes, out)
    _warn_outside_mesh(registry, changes)


def _workload_remove(registry: EmbeddedRegistry, args: argparse.Namespace, out: TextIO) -> None:
    _print_changes(registry.delete("Workload", *_split_ref(args.ref, "Workload")), out)


def _service_apply(registry: EmbeddedRegistry, args: argparse.Namespace, out: TextIO) -> None:
    flags = bool(args.name or args.vip or args.port or args.selector)
    if args.filename and flags:
        raise CommandError("give either -f FILE or --name/--vip/--port/--selector, not both")
    if args.filename:
        docs = _read_files(args.filename)
        _only(docs, ["Service"], "ambit service apply")
        _print_changes(registry.apply(docs), out)
        return
    if not (args.name and args.vip and args.port):
        raise CommandError("`ambit service apply` needs -f FILE, or --name, --vip and --port "
                           "(e.g. --name echo --vip 10.96.0.10 --port 80:8080 --selector "
                           "app=echo)")
    ports: list[dict[str, Any]] = []
    for text in args.port:
        port, _, target = text.partition(":")
        ports.append({"port": port, "targetPort": target or port})
    doc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": args.name, "namespace": args.namespace},
           "spec": {"clusterIPs": args.vip, "ports": ports,
                    "selector": _pairs(args.selector, "--selector")}}
    _print_changes(_apply_flag_document(registry, doc, {
        "metadata.name": "--name", "metadata.namespace": "--namespace",
        "spec.clusterIPs": "--vip", "spec.ports": "--port", "spec.selector": "--selector"}), out)


def _policy_apply(registry: EmbeddedRegistry, args: argparse.Namespace, out: TextIO) -> None:
    docs = _read_files(args.filename)
    _only(docs, ["AuthorizationPolicy", "PeerAuthentication"], "ambit policy apply")
    _print_changes(registry.apply(docs), out)


def _apply(registry: EmbeddedRegistry, args: argparse.Namespace, out: TextIO) -> None:
    changes = registry.apply(_read_files(args.filename))
    _print_changes(changes, out)
    _warn_outside_mesh(registry, changes)


def _delete(registry: EmbeddedRegistry, args: argparse.Namespace, out: TextIO) -> None:
    kind = _kind(args.kind)
    _print_changes(registry.delete(kind, *_split_ref(args.ref, kind)), out)


def _node_join(registry: EmbeddedRegistry, args: argparse.Namespace, out: TextIO) -> None:
    token = registry.issue_node_token(args.node)
    # The token alone on stdout, so `TOKEN=$(ambit node join n1)` works.
    print(token, file=out)
    print(f"token for node {args.node}: shown once, only its hash is stored; keep it on the "
          "node, readable by the ztunnel only", file=sys.stderr)


def _node_revoke(registry: EmbeddedRegistry, args: argparse.Namespace, out: TextIO) -> None:
    count = registry.revoke_node_tokens(args.node, args.token_id)
    if not count:
        which = f"no token {args.token_id}" if args.token_id else "no tokens"
        raise CommandError(f"node {args.node} has {which} (list tokens with `ambit get "
                           "nodes`)")
    print(f"revoked {count} token(s) of node {args.node}", file=out)


def _get(registry: EmbeddedRegistry, args: argparse.Namespace, out: TextIO) -> None:
    word = args.kind.lower()
    if word in ("all", "node", "nodes"):
        kinds = list(KINDS) if word == "all" else []
    elif word in _KIND_ALIASES:
        kinds = [_KIND_ALIASES[word]]
    else:
        raise CommandError(f"{args.kind!r} is not something to get; use one of: namespaces, "
                           "workloads, services, authorizationpolicies, peerauthentications, "
                           "gateways, httproutes, grpcroutes, tcproutes, httpfaults, nodes, "
                           "all")
    snapshot = registry.snapshot()
    records: dict[str, Sequence[Record]] = {
        "Namespace": snapshot.namespaces, "Workload": snapshot.pods,
        "Service": snapshot.services, "AuthorizationPolicy": snapshot.authorization_policies,
        "PeerAuthentication": snapshot.peer_authentications, "Gateway": snapshot.gateways,
        "HTTPRoute": [r for r in snapshot.http_routes if r.kind == "HTTPRoute"],
        "GRPCRoute": [r for r in snapshot.http_routes if r.kind == "GRPCRoute"],
        "TCPRoute": snapshot.tcp_routes, "HTTPFault": snapshot.http_faults}
    if args.output == "yaml":
        if not kinds:
            raise CommandError("nodes have no documents; use `ambit get nodes` without -o yaml")
        docs = [to_document(r) for k in kinds for r in records[k]]
        yaml.safe_dump_all(docs, out, sort_keys=False)
        return
    tables = [_rows(kind, records[kind], snapshot) for kind in kinds]
    if word in ("all", "node", "nodes"):
        tables.append(_node_rows(registry, snapshot))
    print(f"registry {registry.path}, revision {snapshot.revision}", file=out)
    for rows in tables:
        if word == "all" and len(rows) == 1:
            continue  # only the header: nothing of this kind
        print(file=out)
        _table(rows, out)
    if word == "all" and all(len(rows) == 1 for rows in tables):
        print("(empty; start with `ambit namespace enable NAME` and `ambit workload add`)",
              file=out)


def _parents(parents: Iterable[ParentRef]) -> str:
    return ",".join(f"{p.kind}/{p.namespace}/{p.name}" + (f":{p.port}" if p.port else "")
                    for p in parents)


def _rows(kind: str, records: Sequence[Any], snapshot: RegistrySnapshot) -> list[list[str]]:
    if kind == "Namespace":
        rows = [["NAMESPACE", "MESH", "WORKLOADS", "LABELS"]]
        for ns in records:
            count = sum(1 for p in snapshot.pods if p.namespace == ns.name)
            rows.append([ns.name, "ambient" if ns.ambient else "-", str(count),
                         _labels(ns.labels)])
        return rows
    if kind == "Workload":
        rows = [["WORKLOAD", "NODE", "ADDRESSES", "SERVICE-ACCOUNT", "READY", "MESH"]]
        for p in records:
            reason = _outside_reason(p, snapshot)
            rows.append([p.key, p.node, ",".join(map(str, p.ips)), p.service_account,
                         "yes" if p.ready else "no",
                         "HBONE" if not reason else "TCP (" + reason.split(";")[0] + ")"])
        return rows
    if kind == "Service":
        rows = [["SERVICE", "CLUSTER-IPS", "PORTS", "SELECTOR", "ENDPOINTS", "WAYPOINT"]]
        for s in records:
            selected = [p for p in snapshot.pods if p.namespace == s.namespace and s.selector
                        and all(dict(p.labels).get(k) == v for k, v in s.selector)]
            waypoint, _ = waypoint_binding(snapshot, s)
            rows.append([s.key, ",".join(map(str, s.cluster_ips)),
                         ",".join(f"{p.port}:{p.target_port}" for p in s.ports),
                         _labels(s.selector),
                         f"{sum(p.ready for p in selected)}/{len(selected)} ready",
                         waypoint.key if waypoint is not None else "-"])
        return rows
    if kind == "Gateway":
        rows = [["GATEWAY", "FOR", "INSTANCES", "SERVICES"]]
        for g in records:
            pods = [p for p in snapshot.pods if p.namespace == g.namespace
                    and dict(p.labels).get(GATEWAY_NAME_LABEL) == g.name]
            bound = [s for s in snapshot.services
                     if (ref := waypoint_binding(snapshot, s)[0]) is not None
                     and ref.key == g.key]
            rows.append([g.key, g.waypoint_for,
                         f"{sum(p.ready for p in pods)}/{len(pods)} ready", str(len(bound))])
        return rows
    if kind == "TCPRoute":
        rows = [["TCPROUTE", "PARENTS", "BACKENDS"]]
        for r in records:
            rows.append([r.key, _parents(r.parents), ",".join(
                f"{b.namespace}/{b.name}:{b.port}@{b.weight}" for b in r.backends)])
        return rows
    if kind in ("HTTPRoute", "GRPCRoute"):
        rows = [[kind.upper(), "PARENTS", "RULES", "BACKENDS"]]
        for r in records:
            parents = _parents(r.parents)
            backends = sorted({f"{b.namespace}/{b.name}:{b.port}" for rule in r.rules
                               for b in rule.backends})
            rows.append([r.key, parents, str(len(r.rules)), ",".join(backends) or "-"])
        return rows
    if kind == "HTTPFault":
        rows = [["HTTPFAULT", "DELAY", "ABORT"]]
        for f in records:
            fault = f.fault
            delay = (f"{format_duration(fault.delay_ms)}@{fault.delay_percent:g}%"
                     if fault.delay_ms is not None else "-")
            abort = (f"{fault.abort_status}@{fault.abort_percent:g}%"
                     if fault.abort_status is not None else "-")
            rows.append([f.key, delay, abort])
        return rows
    if kind == "AuthorizationPolicy":
        rows = [["AUTHORIZATIONPOLICY", "ACTION", "SELECTOR", "RULES"]]
        for p in records:
            rows.append([p.key, str(p.spec.get("action", "ALLOW")), _selector(p.spec),
                         str(len(p.spec.get("rules") or []))])
        return rows
    rows = [["PEERAUTHENTICATION", "MODE", "SELECTOR"]]
    for p in records:
        mtls = p.spec.get("mtls") or {}
        rows.append([p.key, str(mtls.get("mode", "UNSET")), _selector(p.spec)])
    return rows


def _node_rows(registry: EmbeddedRegistry, snapshot: RegistrySnapshot) -> list[list[str]]:
    tokens: dict[str, list[str]] = {}
    for t in registry.node_tokens():
        tokens.setdefault(t.node, []).append(t.token_id)
    pods: dict[str, int] = {}
    for p in snapshot.pods:
        pods[p.node] = pods.get(p.node, 0) + 1
    rows = [["NODE", "WORKLOADS", "TOKEN-IDS"]]
    for node in sorted(tokens.keys() | pods.keys()):
        rows.append([node, str(pods.get(node, 0)), ",".join(tokens.get(node, [])) or "-"])
    return rows


def _labels(labels: Sequence[tuple[str, str]]) -> str:
    return ",".join(f"{k}={v}" for k, v in labels) or "-"


def _selector(spec: Any) -> str:
    if has_target_refs(spec):
        refs = spec.get("targetRefs") or [spec.get("targetRef")]
        return "targets:" + ",".join(f"{r.get('kind')}/{r.get('name')}" for r in refs
                                     if isinstance(r, dict))
    selector = spec.get("selector") or {}
    match = selector.get("matchLabels") if isinstance(selector, dict) else None
    if not isinstance(match, dict):
        return "(namespace)"
    return ",".join(f"{k}={v}" for k, v in sorted(match.items()))


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=out)

