"""Config-push scale benchmark: how long one pod change takes to reach 100 ztunnels when the
registry holds 10,000 workloads.

Real parts: the embedded SQLite registry, the controller's process core (registry watch at the
production poll interval, ``EmbeddedFeed``'s default 0.1 s; translation; delta; the gRPC
``StateService`` over TLS on loopback, with the serving certificate the controller issues
itself from the mesh CA, exactly as ``ambit controller`` serves it), and, in a second process,
``subscribers - 1`` plain gRPC subscribers plus one real ztunnel ``ControllerSource``, all
connecting with the mesh root as trust anchor and each presenting its node's token.

The clock starts when the registry write has committed (the change exists; everything after is
the push). Reported per change: the time until the new version has been delivered to every
subscriber, plus the time the one real ``ControllerSource`` took to apply it (decode, validate,
rebuild the indexed snapshot). On real nodes every ztunnel applies in parallel on its own CPU,
so delivery-to-all plus one apply is the end-to-end time; applying 100 copies in one process
on a small machine would measure that machine, not the push. Both processes read the same
monotonic clock. ``--insecure`` and ``--poll-interval`` exist to compare with the plaintext,
fast-poll numbers of earlier runs. Run:
``python -m bench.push [--workloads 10000] [--subscribers 100] [--changes 5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET_SECONDS = 1.0


def _workload_doc(i: int, node_count: int, label: str = "a") -> dict[str, Any]:
    return {
        "apiVersion": "ambit.dev/v1", "kind": "Workload",
        "metadata": {"name": f"pod-{i}", "namespace": f"ns-{i % 50}",
                     "labels": {"app": f"app-{i % 500}", "rev": label}},
        "spec": {"serviceAccount": f"sa-{i % 500}", "node": f"node-{i % node_count}",
                 "addresses": [f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"]},
    }


def _subscribers(port: int, tokens: list[str], token_file: Path, root_pem: bytes | None,
                 ready: Any, results: Any, stop: Any) -> None:
    """Child process. ``len(tokens) - 1`` plain gRPC subscribers record when each version has
    reached all of them (delivery), and one real ztunnel ``ControllerSource`` records how long
    applying it takes (receive -> new indexed snapshot swapped in). On real nodes every ztunnel
    applies in parallel on its own CPU, so delivery-to-all plus one apply is the end-to-end
    time; here 100 applies would queue on one core and measure this machine, not the push. Each
    subscriber is node ``node-<i>`` and presents that node's token (``tokens[i]``; the real
    ``ControllerSource`` reads it from ``token_file``), as the controller requires. With
    ``root_pem`` every channel is TLS checked against that root (None: plaintext)."""
    import grpc
    import uvloop

    from mesh.api.ambit.v1 import state_pb2, state_pb2_grpc
    from mesh.state.controller_source import ControllerSource
    from mesh.state.store import StateStore

    count = len(tokens)
    target = f"127.0.0.1:{port}"

    def channel_for() -> grpc.aio.Channel:
        if root_pem is None:
            return grpc.aio.insecure_channel(target)
        return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_pem))

    async def receiver(i: int, seen: dict[str, int]) -> None:
        async with channel_for() as channel:
            stub = state_pb2_grpc.StateServiceStub(channel)
            async for update in stub.Subscribe(
                    state_pb2.SubscribeRequest(node=f"node-{i}"),
                    metadata=(("authorization", f"Bearer {tokens[i]}"),)):
                seen[update.version] = seen.get(update.version, 0) + 1
                if seen[update.version] == count - 1:
                    results.put(("delivered", update.version, time.monotonic()))

    async def main() -> None:
        seen: dict[str, int] = {}
        store = StateStore()
        credentials = None if root_pem is None else grpc.ssl_channel_credentials(root_pem)
        source = ControllerSource(target, "node-0", store, credentials=credentials,
                                  token_file=token_file, backoff_initial=0.05)
        store.subscribe(lambda _old, new: results.put(
            ("applied", new.version, time.monotonic() - source.last_received)))
        tasks = [asyncio.create_task(receiver(i, seen)) for i in range(1, count)]
        tasks.append(asyncio.create_task(source.run()))
        ready.set()
        await asyncio.to_thread(stop.wait)
        for t in tasks:
            t.cancel()

    uvloop.run(main())


async def _wait_version(results: Any, want: str) -> tuple[float, float]:
    """(monotonic time delivered to all, apply duration on a real ztunnel) for ``want``."""
    delivered = applied = None
    while delivered is None or applied is None:
        kind, version, value = await asyncio.to_thread(results.get, True, 60)
        if version != want:
            continue
        if kind == "delivered":
            delivered = value
        else:
            applied = value
    return delivered, applied


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    from controller.app import Controller, ControllerConfig
    from controller.ca import CertificateAuthority
    from controller.embedded import EmbeddedFeed
    from controller.registry.sqlite import EmbeddedRegistry

    tmp = Path(tempfile.mkdtemp(prefix="ambit-pushbench-"))
    registry = EmbeddedRegistry(tmp / "registry.db")
    t0 = time.monotonic()
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": f"ns-{n}", "labels": {"ambit.dev/dataplane-mode": "ambient"}}}
        for n in range(50)]
    docs += [_workload_doc(i, args.subscribers) for i in range(args.workloads)]
    registry.apply(docs)
    print(f"registry: {args.workloads} workloads written in {time.monotonic() - t0:.1f}s",
          flush=True)
    # Subscribers are nodes: each gets its token, as `ambit node join` would give it.
    tokens = [registry.issue_node_token(f"node-{i}") for i in range(args.subscribers)]
    token_file = tmp / "node-0.token"
    token_file.write_text(tokens[0])
    # The poll interval `ambit controller` runs with unless told otherwise (EmbeddedFeed's).
    feed = (EmbeddedFeed(registry, "cluster.local") if args.poll_interval is None
            else EmbeddedFeed(registry, "cluster.local", interval=args.poll_interval))
    ca = CertificateAuthority.generate("cluster.local")
    controller = Controller(
        ControllerConfig(listen_host="127.0.0.1", grpc_port=0, monitoring_port=0,
                         insecure=args.insecure),
        feed, ca, authenticator=feed)
    await controller.start()
    print(f"controller: gRPC {'plaintext' if args.insecure else 'TLS'} on 127.0.0.1:"
          f"{controller.grpc_port}, registry poll interval {feed.interval:g}s", flush=True)
    ctx = multiprocessing.get_context("spawn")
    ready, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
    root_pem = None if args.insecure else ca.root_pem
    child = ctx.Process(target=_subscribers,
                        args=(controller.grpc_port, tokens, token_file, root_pem, ready,
                              results, stop))
    child.start()
    latencies: list[float] = []
    try:
        await asyncio.to_thread(ready.wait, 60)
        delivered, apply_s = await _wait_version(results, str(registry.revision))
        print(f"{args.subscribers} subscribers hold the snapshot (applying it took "
              f"{1000 * apply_s:.0f} ms)", flush=True)
        for change in range(args.changes):
            doc = _workload_doc(7, args.subscribers, label=f"change-{change}")
            await asyncio.to_thread(registry.apply, [doc])
            start = time.monotonic()  # the change is committed: the push starts here
            want = str(registry.revision)
            delivered, apply_s = await _wait_version(results, want)
            total = delivered - start + apply_s
            latencies.append(total)
            print(f"change {change + 1}: version {want} delivered to all {args.subscribers} "
                  f"after {1000 * (delivered - start):.0f} ms, applied in "
                  f"{1000 * apply_s:.0f} ms: {1000 * total:.0f} ms end to end", flush=True)
    finally:
        stop.set()
        child.join(10)
        if child.is_alive():
            child.kill()
        await controller.stop()
        registry.close()
    return {"workloads": args.workloads, "subscribers": args.subscribers,
            "tls": not args.insecure, "poll_interval_s": feed.interval,
            "latencies_s": latencies}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.push", description=__doc__)
    p.add_argument("--workloads", type=int, default=10_000)
    p.add_argument("--subscribers", type=int, default=100)
    p.add_argument("--changes", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--insecure", action="store_true",
                   help="plaintext gRPC instead of TLS (what runs before 2026-12-07 measured)")
    p.add_argument("--poll-interval", type=float, default=None, metavar="SECONDS",
                   help="registry poll interval (default: the controller's own, 0.1 s)")
    args = p.parse_args(argv)
    import uvloop

    result = uvloop.run(_run(args))
    lat = result["latencies_s"]
    if not lat:
        print("no change was measured", file=sys.stderr)
        return 1
    worst, median = max(lat), statistics.median(lat)
    verdict = "meets" if worst < TARGET_SECONDS else "MISSES"
    table = (
        f"\nconfig push: {args.workloads} workloads, {args.subscribers} ztunnels, one pod "
        f"changed {len(lat)} times; gRPC {'plaintext' if args.insecure else 'TLS'}, registry "
        f"poll every {result['poll_interval_s']:g}s\n"
        f"  median {1000 * median:.0f} ms, worst {1000 * worst:.0f} ms  "
        f"({verdict} the {TARGET_SECONDS:.0f} s target)\n"
    )
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "push.json").write_text(json.dumps(result, indent=2))
    (args.out / "push.txt").write_text(table)
    return 0 if worst < TARGET_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())
