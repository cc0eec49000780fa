"""The iptables backend's incremental changes never drift from the full render (issue 19
item 4).

``IptablesCapture`` applies only the enrolled or removed pod's rules (``render_update``); after
any sequence of enrolments, removals, address reuses, releases of unknown addresses, agent
restarts and a chain changed behind its back, the chain in the kernel must be what the full
render (``render_capture``) of the pods that should be captured gives. A driver runs the
backend inside one private namespace and after every step compares its ``iptables -S`` with the
full render applied in a second namespace: the base rules in order, then every outbound rule
before every inbound one, each address's HBONE rule right before its plaintext rule, and the
same rules (the order among pods in a block is free: they never overlap). Nothing runs in the
machine's own namespace.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ambit.dev import netns

pytestmark = [pytest.mark.netns, pytest.mark.timeout(180)]

NS, REF = "ambit-iptinc-a", "ambit-iptinc-b"
ROOT = Path(__file__).resolve().parents[2]

DRIVER = r'''
import json, random, subprocess, sys
from agent.capture.base import PodCapture
from agent.capture.iptables import render_capture
from agent.capture.iptables_backend import IptablesCapture

REF = sys.argv[1]
seed = int(sys.argv[2])
rng = random.Random(seed)

def rules(prefix):
    out = subprocess.run([*prefix, "iptables", "-t", "mangle", "-S", "AMBIT_PREROUTING"],
                         capture_output=True, text=True, check=True).stdout
    return [ln for ln in out.splitlines() if ln.startswith("-A ")]

def shape(lines):
    base, out, inb = lines[:2], [], []
    rest = lines[2:]
    i = 0
    while i < len(rest) and " -i " in rest[i]:
        out.append(rest[i]); i += 1
    pairs = rest[i:]
    assert all(" -i " not in ln for ln in pairs), ("outbound after inbound", lines)
    assert len(pairs) % 2 == 0, lines
    for a, b in zip(pairs[::2], pairs[1::2]):
        assert "--dport" in a and "--dport" not in b and a.split()[3] == b.split()[3], (a, b)
        inb.append((a, b))
    return base, sorted(out), sorted(inb)

expected = {}  # uid -> pod: what the full render must capture

def want_enroll(pod):
    for uid in [u for u, p in expected.items() if u == pod.uid or set(p.ips) & set(pod.ips)]:
        del expected[uid]
    expected[pod.uid] = pod

def want_unenroll(pod):
    for uid in [u for u, p in expected.items() if u == pod.uid or set(p.ips) & set(pod.ips)]:
        del expected[uid]

def check(step):
    pods = sorted(expected.values(), key=lambda p: p.uid)
    full = render_capture([p.host_iface for p in pods], [ip for p in pods for ip in p.ips])
    subprocess.run(["ip", "netns", "exec", REF, "iptables-restore", "--noflush"],
                   input=full.iptables_restore, text=True, check=True)
    got, ref = shape(rules([])), shape(rules(["ip", "netns", "exec", REF]))
    assert got == ref, (step, got, ref)
    assert cap.enrolled() == {ip for p in pods for ip in p.ips}, step

cap = IptablesCapture()
cap.setup()
steps = 0
for n in range(70):
    op = rng.random()
    i = rng.randrange(10)
    ip = f"10.244.1.{rng.randrange(2, 14)}"
    if op < 0.5:
        pod = PodCapture(f"ns/p{i}", (ip,) if rng.random() < 0.8 else (ip, f"10.244.2.{i}"),
                         f"veth{i}{rng.choice('ab')}")
        cap.enroll(pod); want_enroll(pod); what = f"enroll {pod}"
    elif op < 0.75:
        pod = next((p for p in expected.values() if p.uid == f"ns/p{i}"),
                   PodCapture(f"ns/p{i}", (ip,), f"veth{i}a"))
        if rng.random() < 0.5:
            cap.unenroll(pod); what = f"unenroll {pod}"
        else:
            cap.forget_interface(pod); what = f"forget {pod}"
        want_unenroll(pod)
    elif op < 0.85:
        pod = PodCapture("unknown", (ip,), "")  # reconcile releasing an address
        cap.unenroll(pod); want_unenroll(pod); what = f"release {ip}"
    elif op < 0.95:
        # the agent restarts: a new backend, set up over what is there, adopting its records
        cap = IptablesCapture(); cap.setup(); cap.adopt(dict(expected)); what = "restart"
    else:
        # someone flushes our chain's pod rules behind our back: the next change notices
        subprocess.run(["iptables", "-t", "mangle", "-F", "AMBIT_PREROUTING"], check=True)
        cap.enrolled()  # a reconcile pass reads the kernel back
        pods = sorted(expected.values(), key=lambda p: p.uid)
        if pods:
            cap.enroll(pods[0])
        cap._apply()  # what a pass that finds the base rules gone ends with  # noqa: SLF001
        what = "flushed behind our back"
    check(f"seed {seed} step {n}: {what}")
    steps += 1
cap.uninstall()
print(json.dumps({"steps": steps, "pods_at_end": len(expected)}))
'''


@pytest.fixture
def namespaces() -> Iterator[None]:
    for ns in (NS, REF):
        netns.delete_netns(ns)
        netns.create_netns(ns)
    try:
        yield
    finally:
        for ns in (NS, REF):
            netns.delete_netns(ns)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_any_order_of_changes_equals_the_full_render(namespaces: None, seed: int) -> None:
    res = subprocess.run(netns.ns_argv(NS, [sys.executable, "-c", DRIVER, REF, str(seed)]),
                         capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["steps"] == 70


def test_a_change_runs_one_small_restore_whatever_the_node_holds(namespaces: None) -> None:
    """With 200 pods captured, enrolling and removing one more pipes only its lines to
    iptables-restore, and never reads the ruleset back."""
    script = r'''
import json
from agent.capture import iptables_backend as b
from agent.capture.base import PodCapture
calls = []
real = b._run
def spy(argv, input=None):
    calls.append((argv[0], len((input or "").splitlines())))
    return real(argv, input)
b._run = spy
cap = b.IptablesCapture(); cap.setup()
for i in range(200):
    cap.enroll(PodCapture(f"ns/p{i}", (f"10.244.{i // 200}.{i % 200 + 2}",), f"veth{i}"))
calls.clear()
extra = PodCapture("ns/extra", ("10.244.3.9",), "vethx")
cap.enroll(extra); cap.unenroll(extra); cap.forget_interface(extra)
print(json.dumps({"calls": calls, "enrolled": len(cap.enrolled())}))
cap.uninstall()
'''
    res = subprocess.run(netns.ns_argv(NS, [sys.executable, "-c", script]),
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    # one restore of 5 lines to add (*mangle, 3 rules, COMMIT), one to remove; the second
    # removal finds nothing to do; then the read-back of enrolled()
    assert report["calls"] == [["iptables-restore", 5], ["iptables-restore", 5],
                               ["iptables-save", 0]]
    assert report["enrolled"] == 200
