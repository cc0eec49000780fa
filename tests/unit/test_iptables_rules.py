"""The TPROXY rule set, checked line by line: order matters as much as content."""

from __future__ import annotations

import pytest

from agent.capture.iptables import CaptureConfigError, render_capture, render_update


def _rules(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("-A ")]


def test_full_rule_set_in_order() -> None:
    r = render_capture(["veth-a", "veth-b"], ["10.244.1.2", "10.244.1.3"])
    assert r.jump == ("PREROUTING", "-p", "tcp", "-j", "AMBIT_PREROUTING")
    assert _rules(r.iptables_restore) == [
        "-A AMBIT_DIVERT -j MARK --set-xmark 0x111/0xfff",
        "-A AMBIT_DIVERT -j ACCEPT",
        "-A AMBIT_PREROUTING -m mark --mark 0x539/0xfff -j RETURN",
        "-A AMBIT_PREROUTING -p tcp -m socket -j AMBIT_DIVERT",
        "-A AMBIT_PREROUTING -i veth-a -p tcp -j TPROXY --on-port 15001 --tproxy-mark 0x111/0xfff",
        "-A AMBIT_PREROUTING -i veth-b -p tcp -j TPROXY --on-port 15001 --tproxy-mark 0x111/0xfff",
        "-A AMBIT_PREROUTING -d 10.244.1.2/32 -p tcp -m tcp --dport 15008 "
        "-j TPROXY --on-port 15008 --tproxy-mark 0x111/0xfff",
        "-A AMBIT_PREROUTING -d 10.244.1.2/32 -p tcp -j TPROXY --on-port 15006 "
        "--tproxy-mark 0x111/0xfff",
        "-A AMBIT_PREROUTING -d 10.244.1.3/32 -p tcp -m tcp --dport 15008 "
        "-j TPROXY --on-port 15008 --tproxy-mark 0x111/0xfff",
        "-A AMBIT_PREROUTING -d 10.244.1.3/32 -p tcp -j TPROXY --on-port 15006 "
        "--tproxy-mark 0x111/0xfff",
    ]
    assert r.ip_commands == (
        ("rule", "add", "priority", "100", "fwmark", "0x111/0xfff", "lookup", "100"),
        ("route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", "100"),
    )


def test_touches_only_its_own_chains() -> None:
    text = render_capture([], []).iptables_restore
    lines = text.splitlines()
    # Applied with --noflush: declaring our chains flushes only them; built-in chains are not
    # declared, so the node's other mangle rules survive.
    assert "*mangle" in lines and lines[-1] == "COMMIT"
    for chain in ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"):
        assert not [ln for ln in lines if ln.startswith(f":{chain} ")]
    assert not [ln for ln in _rules(text) if not ln.startswith(("-A AMBIT_PREROUTING ",
                                                                  "-A AMBIT_DIVERT "))]
    assert ":AMBIT_PREROUTING - [0:0]" in lines and ":AMBIT_DIVERT - [0:0]" in lines
    assert not [ln for ln in _rules(text) if "TPROXY" in ln]
    assert "*nat" not in text and "*filter" not in text


def test_mark_and_socket_rules_come_before_any_capture() -> None:
    rules = [ln for ln in _rules(render_capture(["p0"], ["10.0.0.5"]).iptables_restore)]
    chain = [ln for ln in rules if ln.startswith("-A AMBIT_PREROUTING")]
    assert "--mark 0x539/0xfff -j RETURN" in chain[0]
    assert "-m socket" in chain[1]
    assert all("TPROXY" in ln for ln in chain[2:])
    # HBONE must be matched before the catch-all plaintext rule of the same pod.
    assert "--dport 15008" in chain[3] and "--on-port 15006" in chain[4]


def test_custom_ports_marks_and_table() -> None:
    r = render_capture(
        ["p0"],
        ["10.0.0.5"],
        outbound_port=25001,
        inbound_plaintext_port=25006,
        inbound_port=25008,
        socket_mark=0x43,
        tproxy_mark=0x2,
        mark_mask=0xF,
        table=7,
        rule_priority=50,
    )
    text = r.iptables_restore
    assert "--on-port 25001 --tproxy-mark 0x2/0xf" in text
    assert "--dport 25008 -j TPROXY --on-port 25008" in text
    assert "--on-port 25006" in text
    assert "-m mark --mark 0x43/0xf -j RETURN" in text
    assert r.ip_commands[0] == ("rule", "add", "priority", "50", "fwmark", "0x2/0xf", "lookup", "7")
    assert r.ip_commands[1][-1] == "7"


def test_duplicates_are_dropped_and_order_kept() -> None:
    r = render_capture(["b", "a", "b"], ["10.0.0.2", "10.0.0.1", "10.0.0.2"])
    rules = _rules(r.iptables_restore)
    assert [ln.split()[3] for ln in rules if "-i " in ln] == ["b", "a"]
    assert [ln.split()[3] for ln in rules if "--on-port 15006" in ln] == [
        "10.0.0.2/32",
        "10.0.0.1/32",
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pod_ips": ["10.0.0.300"]}, "not an IP address"),
        ({"pod_ips": ["fd00::1"]}, "only IPv4"),
        ({"pod_ifaces": ["veth-much-too-long"]}, "not an interface name"),
        ({"pod_ifaces": ["bad/name"]}, "not an interface name"),
        ({"outbound_port": 0}, "outbound_port"),
        ({"inbound_port": 70000}, "inbound_port"),
        ({"inbound_plaintext_port": 15001}, "must differ"),
        ({"tproxy_mark": 0}, "tproxy_mark"),
        ({"tproxy_mark": 0x1000}, "inside mark_mask"),
        ({"socket_mark": 0x111}, "socket_mark"),
        ({"socket_mark": 0x1111}, "socket_mark"),  # equal to the tproxy mark under the mask
        ({"mark_mask": 0}, "mark_mask"),
        ({"table": 254}, "table"),
        ({"table": 0}, "table"),
        ({"rule_priority": 32766}, "rule_priority"),
    ],
)
def test_bad_input_is_rejected_with_a_reason(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"pod_ifaces": ["p0"], "pod_ips": ["10.0.0.5"], **kwargs}
    with pytest.raises(CaptureConfigError, match=message):
        render_capture(**args)  # type: ignore[arg-type]


# --- incremental changes (issue 19 item 4): one pod's rules, whatever the node holds -----------

OUT = "-p tcp -j TPROXY --on-port 15001 --tproxy-mark 0x111/0xfff"
HB = "-p tcp -m tcp --dport 15008 -j TPROXY --on-port 15008 --tproxy-mark 0x111/0xfff"
PLAIN = "-p tcp -j TPROXY --on-port 15006 --tproxy-mark 0x111/0xfff"


@pytest.mark.parametrize(("change", "expected"), [
    # adding pod N: only pod N's lines, its outbound rule right after the two base rules
    ({"add_ifaces": ["veth-n"], "add_ips": ["10.244.1.9"]},
     [f"-I AMBIT_PREROUTING 3 -i veth-n {OUT}",
      f"-A AMBIT_PREROUTING -d 10.244.1.9/32 {HB}",
      f"-A AMBIT_PREROUTING -d 10.244.1.9/32 {PLAIN}"]),
    # removing it: only its deletions
    ({"del_ifaces": ["veth-n"], "del_ips": ["10.244.1.9"]},
     [f"-D AMBIT_PREROUTING -i veth-n {OUT}",
      f"-D AMBIT_PREROUTING -d 10.244.1.9/32 {HB}",
      f"-D AMBIT_PREROUTING -d 10.244.1.9/32 {PLAIN}"]),
    # a pod reusing an old pod's address on a new veth: the old veth's rule goes first
    ({"add_ifaces": ["veth-new"], "del_ifaces": ["veth-old"]},
     [f"-D AMBIT_PREROUTING -i veth-old {OUT}",
      f"-I AMBIT_PREROUTING 3 -i veth-new {OUT}"]),
    # two addresses, duplicates once
    ({"add_ips": ["10.0.0.2", "10.0.0.3", "10.0.0.2"]},
     [f"-A AMBIT_PREROUTING -d 10.0.0.2/32 {HB}", f"-A AMBIT_PREROUTING -d 10.0.0.2/32 {PLAIN}",
      f"-A AMBIT_PREROUTING -d 10.0.0.3/32 {HB}", f"-A AMBIT_PREROUTING -d 10.0.0.3/32 {PLAIN}"]),
])
def test_update_renders_only_the_changed_pods(change: dict[str, list[str]],
                                              expected: list[str]) -> None:
    text = render_update(**change)  # type: ignore[arg-type]
    lines = text.splitlines()
    assert lines[0] == "*mangle" and lines[-1] == "COMMIT" and lines[1:-1] == expected
    # no chain is declared (that would flush it) and no other chain is touched
    assert not [ln for ln in lines if ln.startswith(":")]


def test_nothing_to_change_renders_nothing() -> None:
    assert render_update() == ""


def test_update_lines_are_the_full_render_lines() -> None:
    """The same rule text as the full render, so -D finds what either rendered."""
    full = set(_rules(render_capture(["veth-n"], ["10.244.1.9"]).iptables_restore))
    added = render_update(["veth-n"], ["10.244.1.9"]).splitlines()[1:-1]
    as_appends = {"-A AMBIT_PREROUTING " + ln.split(" ", 3)[3] if ln.startswith("-I ") else ln
                  for ln in added}
    assert as_appends <= full and len(as_appends) == 3


def test_update_size_does_not_depend_on_the_node() -> None:
    # rendering knows nothing of the other pods: pod N's text is the same for any N
    assert render_update(["veth-a"], ["10.0.0.2"]) == render_update(["veth-a"], ["10.0.0.2"])
    assert len(render_update(["veth-a"], ["10.0.0.2"]).splitlines()) == 5


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"add_ips": ["fd00::1"]}, "only IPv4"),
    ({"del_ifaces": ["bad/name"]}, "not an interface name"),
    ({"add_ifaces": ["p0"], "outbound_port": 15006}, "must differ"),
])
def test_update_rejects_bad_input(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(CaptureConfigError, match=message):
        render_update(**kwargs)  # type: ignore[arg-type]
