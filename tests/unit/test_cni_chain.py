"""agent.cni.chain: which config file the runtime uses, chaining ambit-cni into it, undoing it."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from agent.cni import chain
from agent.cni.chain import CONVERTED_KEY, ChainError
from agent.cni.spec import FailurePolicy

ENTRY = chain.plugin_entry()

# What kube-flannel.yml writes as /etc/cni/net.d/10-flannel.conflist.
FLANNEL: dict[str, Any] = {
    "name": "cbr0",
    "cniVersion": "0.3.1",
    "plugins": [
        {"type": "flannel", "delegate": {"hairpinMode": True, "isDefaultGateway": True}},
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ],
}

# Calico's 10-calico.conflist (manifest install, Kubernetes datastore).
CALICO: dict[str, Any] = {
    "name": "k8s-pod-network",
    "cniVersion": "0.3.1",
    "plugins": [
        {"type": "calico", "log_level": "info", "datastore_type": "kubernetes",
         "nodename": "node-1", "mtu": 0, "ipam": {"type": "calico-ipam"},
         "policy": {"type": "k8s"},
         "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}},
        {"type": "portmap", "snat": True, "capabilities": {"portMappings": True}},
        {"type": "bandwidth", "capabilities": {"bandwidth": True}},
    ],
}

# A single-plugin bridge config (containerd's and podman's classic 10-bridge.conf).
BRIDGE: dict[str, Any] = {
    "cniVersion": "1.0.0",
    "name": "bridge",
    "type": "bridge",
    "bridge": "cni0",
    "isGateway": True,
    "ipMasq": True,
    "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.22.0.0/16"}]],
             "routes": [{"dst": "0.0.0.0/0"}]},
}

STALE = {"type": "ambit-cni", "agentSocket": "/old/run/cni.sock", "failurePolicy": "fail-open"}


def with_plugins(doc: dict[str, Any], plugins: list[dict[str, Any]]) -> dict[str, Any]:
    return {**copy.deepcopy(doc), "plugins": copy.deepcopy(plugins)}


# --- which file --------------------------------------------------------------------------------


@pytest.mark.parametrize(("listing", "primary"), [
    (["10-flannel.conflist", "99-loopback.conf"], "10-flannel.conflist"),
    (["calico-kubeconfig", "10-calico.conflist", "calico-tls"], "10-calico.conflist"),
    (["10-flannel.conflist", "05-cilium.conf"], "05-cilium.conf"),  # by name, any extension
    (["87-podman.conflist", "10-containerd-net.json"], "10-containerd-net.json"),
    (["10-bridge.conflist", "10-bridge.conf"], "10-bridge.conf"),  # .conf sorts first
    ([".10-flannel.conflist.ambit-tmp", "20-b.conflist"], "20-b.conflist"),  # our temp files
    (["README", "10-x.conf.bak", "10-x.conflist~", "conf"], None),
    ([], None),
])  # fmt: skip
def test_primary_config_is_the_first_by_name(listing: list[str], primary: str | None) -> None:
    assert chain.primary_config(listing) == primary


def test_config_files_are_sorted_and_filtered() -> None:
    assert chain.config_files(["b.json", "a.conflist", "x.yaml", "c.conf"]) == [
        "a.conflist", "b.json", "c.conf"]


# --- chaining ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "before", "after", "note"), [
    ("10-flannel.conflist", FLANNEL,
     with_plugins(FLANNEL, [*FLANNEL["plugins"], ENTRY]), "chained ambit-cni into"),
    ("10-calico.conflist", CALICO,
     with_plugins(CALICO, [*CALICO["plugins"], ENTRY]), "chained ambit-cni into"),
    # A stale entry (another socket, another policy) is replaced where it is.
    ("10-flannel.conflist", with_plugins(FLANNEL, [FLANNEL["plugins"][0], STALE,
                                                   FLANNEL["plugins"][1]]),
     with_plugins(FLANNEL, [FLANNEL["plugins"][0], ENTRY, FLANNEL["plugins"][1]]),
     "replaced the stale ambit-cni entry"),
    # Duplicates collapse into one, at the first one's place.
    ("10-flannel.conflist", with_plugins(FLANNEL, [FLANNEL["plugins"][0], ENTRY,
                                                   FLANNEL["plugins"][1], STALE]),
     with_plugins(FLANNEL, [FLANNEL["plugins"][0], ENTRY, FLANNEL["plugins"][1]]),
     "collapsed 2 ambit-cni entries"),
    # An entry before the main plugin would get no prevResult: it moves to the end.
    ("10-flannel.conflist", with_plugins(FLANNEL, [ENTRY, *FLANNEL["plugins"]]),
     with_plugins(FLANNEL, [*FLANNEL["plugins"], ENTRY]), "replaced the stale"),
])  # fmt: skip
def test_chain_into_a_list(name: str, before: dict[str, Any], after: dict[str, Any],
                           note: str) -> None:
    snapshot = copy.deepcopy(before)
    edit = chain.chain(name, before, ENTRY, ("0.3.1", "0.4.0", "1.0.0"))
    assert (edit.write, edit.doc, edit.remove) == (name, after, None)
    assert note in edit.note
    assert before == snapshot  # the input is not modified
    # Chaining the result again changes nothing; it is what is_chained checks.
    assert not chain.chain(name, after, ENTRY).changed
    assert chain.is_chained(name, after, ENTRY) and not chain.is_chained(name, before, ENTRY)


def test_already_chained_list_is_left_alone() -> None:
    chained = with_plugins(FLANNEL, [*FLANNEL["plugins"], ENTRY])
    edit = chain.chain("10-flannel.conflist", chained, ENTRY)
    assert not edit.changed and edit.write is None and edit.remove is None
    # Another chained plugin after ours (Istio's, say) is no reason to move: no rewrite war.
    istio = {"type": "istio-cni", "kubernetes": {}}
    both = with_plugins(FLANNEL, [*FLANNEL["plugins"], ENTRY, istio])
    assert not chain.chain("10-flannel.conflist", both, ENTRY).changed


def test_a_different_entry_is_not_chained() -> None:
    chained = with_plugins(FLANNEL, [*FLANNEL["plugins"], ENTRY])
    other = chain.plugin_entry("/run/ambit/cni.sock", FailurePolicy.FAIL_OPEN)
    edit = chain.chain("10-flannel.conflist", chained, other)
    assert edit.doc is not None and edit.doc["plugins"][-1] == other
    assert len(edit.doc["plugins"]) == 3


def test_single_plugin_conf_becomes_a_conflist() -> None:
    edit = chain.chain("10-bridge.conf", BRIDGE, ENTRY, ("1.0.0",))
    assert (edit.write, edit.remove) == ("10-bridge.conflist", "10-bridge.conf")
    assert edit.doc == {
        "cniVersion": "1.0.0",
        "name": "bridge",  # the network keeps its name (Istio would rename it)
        "plugins": [BRIDGE, ENTRY],
        CONVERTED_KEY: "10-bridge.conf",
    }
    assert "converted 10-bridge.conf into 10-bridge.conflist" in edit.note
    # The converted list is chained; a .json single config converts the same way.
    assert chain.is_chained("10-bridge.conflist", edit.doc, ENTRY)
    json_edit = chain.chain("10-containerd-net.json", BRIDGE, ENTRY)
    assert (json_edit.write, json_edit.remove) == ("10-containerd-net.conflist",
                                                   "10-containerd-net.json")
    assert not chain.is_chained("10-bridge.conf", BRIDGE, ENTRY)


@pytest.mark.parametrize(("name", "doc", "needle"), [
    ("10-flannel.conflist", FLANNEL, "cniVersion '0.3.1' is not one ambit-cni speaks"),
    ("10-bridge.conf", {**BRIDGE, "cniVersion": "0.2.0"}, "cniVersion '0.2.0'"),
    ("10-x.conflist", {"name": "x", "plugins": [{"type": "ptp"}]}, "cniVersion None"),
    ("10-x.conflist", {"name": "x", "cniVersion": "1.0.0", "plugins": [ENTRY]},
     "holds only ambit-cni"),
    ("10-x.conf", {"name": "x", "cniVersion": "1.0.0", **ENTRY}, "ambit-cni config on its own"),
])  # fmt: skip
def test_chain_refuses(name: str, doc: dict[str, Any], needle: str) -> None:
    with pytest.raises(ChainError, match=needle) as info:
        chain.chain(name, doc, ENTRY, ("0.4.0", "1.0.0"))
    assert str(info.value).startswith(f"{name}: ") and not info.value.transient


def test_version_is_not_checked_without_a_list_of_versions() -> None:
    assert chain.chain("10-flannel.conflist", FLANNEL, ENTRY).changed


# --- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "text", "needle", "transient"), [
    ("10-flannel.conflist", '{"name": "cbr0", "plugins": [', "not valid JSON", True),
    ("10-flannel.conflist", "", "not valid JSON", True),
    ("10-flannel.conflist", "[1, 2]", "must be a JSON object, not list", False),
    ("10-flannel.conflist", '{"name": "cbr0"}', 'non-empty "plugins"', False),
    ("10-flannel.conflist", '{"plugins": [{"name": "x"}]}', 'plugins[0] must be', False),
    ("10-flannel.conf", json.dumps(FLANNEL), "rename it to 10-flannel.conflist", False),
    ("10-bridge.conf", '{"name": "x"}', 'needs a "type"', False),
])  # fmt: skip
def test_parse_config_errors_name_the_file(name: str, text: str, needle: str,
                                           transient: bool) -> None:
    with pytest.raises(ChainError) as info:
        chain.parse_config(name, text)
    assert str(info.value).startswith(f"{name}: ") and needle in str(info.value)
    assert info.value.transient is transient


def test_parse_and_render_round_trip() -> None:
    for name, doc in (("10-flannel.conflist", FLANNEL), ("10-calico.conflist", CALICO),
                      ("10-bridge.conf", BRIDGE)):
        text = chain.render(doc)
        assert text.endswith("}\n") and chain.parse_config(name, text) == doc


# --- removing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "original"), [
    ("10-flannel.conflist", FLANNEL),
    ("10-calico.conflist", CALICO),
])
def test_unchain_restores_a_list(name: str, original: dict[str, Any]) -> None:
    chained = chain.chain(name, original, ENTRY).doc
    assert chained is not None
    edit = chain.unchain(name, chained)
    assert (edit.write, edit.doc, edit.remove) == (name, original, None)
    assert "removed ambit-cni from" in edit.note
    assert not chain.unchain(name, original).changed  # nothing of ours: nothing to do


def test_unchain_removes_every_entry_and_keeps_the_rest() -> None:
    istio = {"type": "istio-cni"}
    doc = with_plugins(CALICO, [STALE, *CALICO["plugins"], ENTRY, istio])
    edit = chain.unchain("10-calico.conflist", doc)
    assert edit.doc == with_plugins(CALICO, [*CALICO["plugins"], istio])


def test_unchain_restores_the_conf_it_was_converted_from() -> None:
    converted = chain.chain("10-bridge.conf", BRIDGE, ENTRY)
    assert converted.doc is not None
    edit = chain.unchain("10-bridge.conflist", converted.doc)
    assert (edit.write, edit.doc, edit.remove) == ("10-bridge.conf", BRIDGE,
                                                   "10-bridge.conflist")
    assert "restored 10-bridge.conf" in edit.note


def test_unchain_keeps_a_converted_list_someone_else_chained_into() -> None:
    converted = chain.chain("10-bridge.conf", BRIDGE, ENTRY).doc
    assert converted is not None
    converted["plugins"].append({"type": "istio-cni"})
    edit = chain.unchain("10-bridge.conflist", converted)
    assert (edit.write, edit.remove) == ("10-bridge.conflist", None)
    assert edit.doc == {"cniVersion": "1.0.0", "name": "bridge",
                        "plugins": [BRIDGE, {"type": "istio-cni"}]}


@pytest.mark.parametrize("origin", ["../../etc/passwd.conf", "x.conflist", "x.txt", 7])
def test_unchain_ignores_a_bad_origin(origin: object) -> None:
    doc = with_plugins(FLANNEL, [FLANNEL["plugins"][0], ENTRY])
    doc[CONVERTED_KEY] = origin
    edit = chain.unchain("10-flannel.conflist", doc)
    assert (edit.write, edit.remove) == ("10-flannel.conflist", None)
    assert edit.doc is not None and CONVERTED_KEY not in edit.doc


def test_unchain_of_a_list_that_held_only_ours_removes_it() -> None:
    doc = {"name": "x", "cniVersion": "1.0.0", "plugins": [ENTRY]}
    edit = chain.unchain("10-x.conflist", doc)
    assert (edit.write, edit.remove) == (None, "10-x.conflist")


def test_unchain_ignores_single_plugin_files() -> None:
    assert not chain.unchain("10-bridge.conf", BRIDGE).changed
