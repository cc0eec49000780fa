"""Rendering for ``ambit install``: where each override lands, the config hash, the dry-run
output, and the errors a user gets for bad input (ambit/install/render.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from agent.config import REDIRECT_MODES
from ambit import cli
from ambit.install import render
from ambit.install.images import ImageError, image_for, parse_image_flags
from ambit.install.names import CONFIG_HASH_ANNOTATION, DEFAULT_CONFIG, INSTALL_LABELS
from ambit.install.render import (
    Manifest,
    Overrides,
    RenderError,
    apply_order,
    config_hash,
    load_manifests,
    render_dir,
    to_json,
    to_yaml,
)
from tests.k8s_double.manifests import DEFAULT_IMAGE, REPO, write_manifests

NEW_PREFIX = "registry.example.com:5000/team/ambit-"
NEW_TAG = "0.2.0"
# One image per component (ambit/install/images.py), with --image-prefix NEW_PREFIX --tag NEW_TAG.
NEW = {c: f"{NEW_PREFIX}{c}:{NEW_TAG}" for c in ("ztunnel", "agent", "controller", "waypoint")}
MOVED = Overrides(image_prefix=NEW_PREFIX, tag=NEW_TAG)


@pytest.fixture
def manifests(tmp_path: Path) -> Path:
    return write_manifests(tmp_path / "manifests")


def find(r: render.Rendered, kind: str, name: str) -> dict[str, Any]:
    for m in r.manifests:
        if m.kind == kind and m.name == name:
            return m.obj
    raise AssertionError(f"no {kind} {name}")


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj["spec"]["template"]["spec"]
    return list(spec.get("initContainers") or []) + list(spec["containers"])


def template_hash(obj: dict[str, Any]) -> str | None:
    annotations = obj["spec"]["template"]["metadata"].get("annotations") or {}
    value = annotations.get(CONFIG_HASH_ANNOTATION)
    return str(value) if value is not None else None


# ----- loading -----

def test_loads_resources_in_kustomization_order_through_nested_directories(
        manifests: Path) -> None:
    loaded = load_manifests(manifests)
    assert [(m.kind, m.name) for m in loaded][:5] == [
        ("Namespace", "ambit-system"),
        ("CustomResourceDefinition", "authorizationpolicies.security.ambit.dev"),
        ("CustomResourceDefinition", "httpfaults.networking.ambit.dev"),
        ("CustomResourceDefinition", "peerauthentications.security.ambit.dev"),
        ("ServiceAccount", "ambit-controller"),
    ]
    assert [(m.kind, m.name) for m in loaded][-4:] == [
        ("Deployment", "ambit-controller"), ("Service", "ambit-controller"),
        ("PodDisruptionBudget", "ambit-controller"), ("DaemonSet", "ambit-node")]
    # rbac.yaml ends with an empty document: skipped, not an error
    assert sum(m.source.startswith("rbac.yaml") for m in loaded) == 6
    assert loaded[1].source == "crd-base/authorizationpolicies.yaml (document 1)"


def test_no_override_keeps_the_manifests_and_stamps_the_default_hash(manifests: Path) -> None:
    r = render_dir(manifests, Overrides())
    assert r.config == DEFAULT_CONFIG
    assert r.config_hash == config_hash(DEFAULT_CONFIG)
    assert len(r.config_hash) == 16 and int(r.config_hash, 16) >= 0
    for kind, name in (("Deployment", "ambit-controller"), ("DaemonSet", "ambit-node")):
        obj = find(r, kind, name)
        assert {c["image"] for c in containers(obj)} == {DEFAULT_IMAGE}
        assert template_hash(obj) == r.config_hash
    node = find(r, "DaemonSet", "ambit-node")
    # existing annotations are kept next to the hash
    assert node["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    for m in r.manifests:
        assert INSTALL_LABELS.items() <= m.obj["metadata"]["labels"].items(), m.describe()


def test_image_override_reaches_every_container_and_the_waypoint_image(
        manifests: Path) -> None:
    original = load_manifests(manifests)
    before = copy.deepcopy([m.obj for m in original])
    r = render.render(original, MOVED, manifests)
    assert [m.obj for m in original] == before  # inputs untouched
    node = find(r, "DaemonSet", "ambit-node")
    assert [(c["name"], c["image"]) for c in containers(node)] == [
        ("install-cni", NEW["agent"]), ("agent", NEW["agent"]), ("ztunnel", NEW["ztunnel"])]
    controller = find(r, "Deployment", "ambit-controller")
    (c,) = containers(controller)
    assert c["image"] == NEW["controller"]
    args = c["args"]
    assert args[args.index("--waypoint-image") + 1] == NEW["waypoint"]
    assert DEFAULT_IMAGE not in json.dumps([m.obj for m in r.manifests])
    # the image is not a setting: the ConfigMap and so the hash stay as they were
    assert r.config_hash == config_hash(DEFAULT_CONFIG)


def test_waypoint_image_flag_in_equals_form_and_in_command() -> None:
    argv: list[Any] = ["controller", "--waypoint-image=old:1", "--other", "x"]
    assert render._set_flag(argv, "--waypoint-image", "new:2")
    assert argv == ["controller", "--waypoint-image=new:2", "--other", "x"]
    assert not render._set_flag(["--waypoint-imagex=1"], "--waypoint-image", "n")
    assert not render._set_flag(["--waypoint-image"], "--waypoint-image", "n")  # no value


def test_settings_land_in_the_config_map_and_change_the_hash(manifests: Path) -> None:
    base = render_dir(manifests, Overrides())
    r = render_dir(manifests, Overrides(trust_domain="prod.example.com",
                                        redirect_mode="iptables", uplinks="eth0,eth1"))
    cm = find(r, "ConfigMap", "ambit-config")
    assert cm["data"] == {"trustDomain": "prod.example.com", "redirectMode": "iptables",
                          "uplinks": "eth0,eth1"}
    assert r.config == cm["data"]
    assert r.config_hash == config_hash(cm["data"]) != base.config_hash
    assert template_hash(find(r, "DaemonSet", "ambit-node")) == r.config_hash
    assert template_hash(find(r, "Deployment", "ambit-controller")) == r.config_hash
    # one setting alone changes the hash too, and the same settings give the same hash
    one = render_dir(manifests, Overrides(redirect_mode="ebpf"))
    assert one.config_hash not in (base.config_hash, r.config_hash)
    assert render_dir(manifests, Overrides(redirect_mode="ebpf")).config_hash == one.config_hash
    # the workloads read the settings through env vars only: their templates are unchanged
    # apart from the hash
    a, b = find(base, "DaemonSet", "ambit-node"), find(r, "DaemonSet", "ambit-node")
    a["spec"]["template"]["metadata"]["annotations"].pop(CONFIG_HASH_ANNOTATION)
    b["spec"]["template"]["metadata"]["annotations"].pop(CONFIG_HASH_ANNOTATION)
    assert a == b


def test_hash_is_stamped_only_on_workloads_that_read_the_config_map(manifests: Path) -> None:
    (manifests / "extra.yaml").write_text(yaml.safe_dump({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "helper", "namespace": "ambit-system"},
        "spec": {"selector": {"matchLabels": {"app": "helper"}},
                 "template": {"metadata": {"labels": {"app": "helper"}},
                              "spec": {"containers": [{"name": "c", "image": "x:1"}]}}}}))
    k = manifests / "kustomization.yaml"
    k.write_text(k.read_text() + "  - extra.yaml\n")
    r = render_dir(manifests, Overrides(trust_domain="a.example"))
    assert template_hash(find(r, "Deployment", "helper")) is None
    assert template_hash(find(r, "DaemonSet", "ambit-node")) == r.config_hash


def test_config_hash_is_order_independent_and_sensitive_to_values() -> None:
    assert config_hash({"a": "1", "b": "2"}) == config_hash({"b": "2", "a": "1"})
    assert config_hash({"a": "1"}) != config_hash({"a": "2"})
    assert config_hash({"a": "1"}) != config_hash({"a": "1", "b": ""})


# ----- output -----

def test_dry_run_yaml_parses_round_trips_and_is_valid_for_kubernetes(manifests: Path) -> None:
    r = render_dir(manifests, Overrides(image_prefix=NEW_PREFIX, tag=NEW_TAG,
                                        trust_domain="prod.example.com"))
    text = to_yaml(r)
    assert text.startswith("# Ambit ")
    assert "GatewayClass ambit-waypoint" in text.splitlines()[2]
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    assert docs == [m.obj for m in apply_order(r.manifests)]
    node = next(d for d in docs if d["kind"] == "DaemonSet")
    assert node["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "15022"
    for d in docs:
        kubernetes_validate.validate(d, str(kubernetes_validate.latest_version()), strict=True)
    as_json = json.loads(to_json(r))
    assert as_json["kind"] == "List" and as_json["items"] == docs


def test_apply_order_puts_namespaces_and_crds_first_and_keeps_the_rest_in_order() -> None:
    def m(kind: str, name: str, api: str = "v1") -> Manifest:
        return Manifest({"apiVersion": api, "kind": kind, "metadata": {"name": name}}, "x")
    crd = "apiextensions.k8s.io/v1"
    ordered = apply_order([m("ServiceAccount", "a"), m("CustomResourceDefinition", "c1", crd),
                           m("ConfigMap", "b"), m("Namespace", "ns"),
                           m("CustomResourceDefinition", "c2", crd), m("Secret", "d")])
    assert [x.name for x in ordered] == ["ns", "c1", "c2", "a", "b", "d"]


def test_the_repository_manifests_render_with_every_override() -> None:
    """deploy/daemonset as shipped: every contract-pinned place an override goes exists."""
    directory = REPO / "deploy" / "daemonset"
    if not (directory / "kustomization.yaml").is_file():
        pytest.skip("deploy/daemonset/kustomization.yaml is not written yet")
    r = render_dir(directory, Overrides(image_prefix=NEW_PREFIX, tag=NEW_TAG,
                                        trust_domain="prod.example.com",
                                        redirect_mode="iptables", uplinks="eth1"))
    assert r.config == {"trustDomain": "prod.example.com", "redirectMode": "iptables",
                        "uplinks": "eth1"}
    node, controller = find(r, "DaemonSet", "ambit-node"), find(r, "Deployment",
                                                                "ambit-controller")
    assert {c["image"] for c in containers(node)} == {NEW["agent"], NEW["ztunnel"]}
    assert {c["image"] for c in containers(controller)} == {NEW["controller"]}
    for obj in (node, controller):
        assert template_hash(obj) == r.config_hash
    args = next(c for c in containers(controller) if "--waypoint-image" in
                " ".join(c.get("args") or []))["args"]
    flat = " ".join(args)
    assert f"--waypoint-image {NEW['waypoint']}" in flat \
        or f"--waypoint-image={NEW['waypoint']}" in flat
    # The shipped references are the ones hack/images.sh tags: only the tag changes with --tag.
    r = render_dir(directory, Overrides(tag=NEW_TAG))
    assert {c["image"] for c in containers(find(r, "DaemonSet", "ambit-node"))} == {
        f"localhost/ambit-agent:{NEW_TAG}", f"localhost/ambit-ztunnel:{NEW_TAG}"}
    assert render.default_manifests_dirs()[0] == directory
    assert render.find_manifests_dir() == directory


# ----- errors -----

@pytest.mark.parametrize("value, fragment", [
    ("Cluster.Local", "lower case"),
    ("spiffe://cluster.local", "without spiffe://"),
    ("a..b", "not a trust domain"),
    ("-a.b", "not a trust domain"),
    ("has space", "not a trust domain"),
    ("", "not a trust domain"),
    ("a" * 64 + ".com", "not a trust domain"),
])
def test_bad_trust_domain_is_a_clear_error(manifests: Path, value: str, fragment: str) -> None:
    with pytest.raises(RenderError, match="--trust-domain") as e:
        render_dir(manifests, Overrides(trust_domain=value))
    assert fragment in str(e.value)


def test_good_trust_domains_pass(manifests: Path) -> None:
    for value in ("cluster.local", "prod.example.com", "td-1", "a" * 63):
        assert render_dir(manifests, Overrides(trust_domain=value)).config["trustDomain"] \
            == value


def test_bad_redirect_mode_names_the_choices(manifests: Path) -> None:
    with pytest.raises(RenderError, match=r"--redirect-mode 'bpf': not one of auto, ebpf, "
                                          "iptables"):
        render_dir(manifests, Overrides(redirect_mode="bpf"))
    for mode in REDIRECT_MODES:
        assert render_dir(manifests, Overrides(redirect_mode=mode)).config["redirectMode"] \
            == mode


@pytest.mark.parametrize("value", ["eth0,auto", "eth0,,eth1", "a-very-long-interface0",
                                   "eth0 eth1", "eth/0"])
def test_bad_uplinks_are_refused(manifests: Path, value: str) -> None:
    with pytest.raises(RenderError, match="--uplinks"):
        render_dir(manifests, Overrides(uplinks=value))


@pytest.mark.parametrize("overrides, flag", [
    (Overrides(images={"ztunnel": v}), "--image ztunnel=") for v in
    ["Ambit:1", "ambit:", "reg.example.com/ambit:1 x", "", "reg.example.com//ambit"]] + [
    (Overrides(image_prefix="Registry/Ambit-"), "--image-prefix"),
    (Overrides(image_prefix="reg.example.com//"), "--image-prefix"),
    (Overrides(tag="-1"), "--tag"),
    (Overrides(tag="a b"), "--tag"),
])
def test_bad_image_flags_are_refused(manifests: Path, overrides: Overrides, flag: str) -> None:
    with pytest.raises(RenderError, match=flag):
        render_dir(manifests, overrides)


@pytest.mark.parametrize("value", ["ambit", "localhost/ambit:0.1.0", "registry:5000/a/b:c",
                                   "ghcr.io/org/ambit@sha256:" + "a" * 64])
def test_good_images_pass(manifests: Path, value: str) -> None:
    r = render_dir(manifests, Overrides(images={"waypoint": value}))
    args = containers(find(r, "Deployment", "ambit-controller"))[0]["args"]
    assert args[args.index("--waypoint-image") + 1] == value
    # One component's override leaves the others as the manifests have them.
    assert {c["image"] for c in containers(find(r, "DaemonSet", "ambit-node"))} \
        == {DEFAULT_IMAGE}


@pytest.mark.parametrize("current, images, prefix, tag, expected", [
    ("localhost/ambit-ztunnel:0.1.0", {}, None, None, None),
    ("localhost/ambit-ztunnel:0.1.0", {}, None, "0.2.0", "localhost/ambit-ztunnel:0.2.0"),
    ("localhost/ambit-ztunnel:0.1.0", {}, "reg:5000/x/ambit-", None,
     "reg:5000/x/ambit-ztunnel:0.1.0"),
    ("localhost/ambit-ztunnel", {}, "r.io/ambit-", None, "r.io/ambit-ztunnel"),
    ("reg:5000/ambit-ztunnel@sha256:" + "a" * 64, {}, None, "1", "reg:5000/ambit-ztunnel:1"),
    ("localhost/ambit-ztunnel:0.1.0", {"ztunnel": "a/b:c"}, "r.io/", "9", "a/b:c"),
    ("localhost/ambit-ztunnel:0.1.0", {"agent": "a/b:c"}, None, None, None),
])
def test_image_for(current: str, images: dict[str, str], prefix: str | None, tag: str | None,
                   expected: str | None) -> None:
    assert image_for("ztunnel", current, images, prefix, tag) == expected


@pytest.mark.parametrize("values, message", [
    (["registry.example.com/ambit:0.1.0"], "--image takes COMPONENT=IMAGE"),
    (["proxy=a/b:1"], "no component 'proxy'"),
    (["agent=a:1", "agent=b:1"], "--image agent= given twice"),
])
def test_image_flags_parse_with_clear_errors(values: list[str], message: str) -> None:
    with pytest.raises(ImageError, match=message):
        parse_image_flags(values)
    assert parse_image_flags(["agent=a:1", "waypoint=w:2"]) == {"agent": "a:1", "waypoint": "w:2"}


def test_a_bad_value_in_the_manifests_is_reported_with_its_file(manifests: Path) -> None:
    f = manifests / "settings.yaml"
    f.write_text(f.read_text().replace("redirectMode: auto", "redirectMode: magic"))
    with pytest.raises(RenderError, match=r"settings.yaml \(document 1\): data.redirectMode"):
        render_dir(manifests, Overrides())
    # an override replaces the bad value
    assert render_dir(manifests, Overrides(redirect_mode="auto")).config["redirectMode"] \
        == "auto"


def test_missing_manifests_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RenderError, match=r"--manifests .*nope: no such directory"):
        render_dir(tmp_path / "nope", Overrides())
    with pytest.raises(RenderError, match=r"no kustomization\.yaml in it"):
        render_dir(tmp_path, Overrides())
    monkeypatch.setattr(render, "default_manifests_dirs",
                        lambda: (tmp_path / "a", tmp_path / "b"))
    with pytest.raises(RenderError, match=r"cannot find Ambit's manifests .*/a and .*/b.*"
                                          "pass --manifests DIR"):
        render_dir(None, Overrides())


@pytest.mark.parametrize("edit, fragment", [
    (lambda d: (d / "kustomization.yaml").write_text(
        "resources: [00-ns.yaml]\npatches: [{path: p.yaml}]\n"),
     "reads only `resources:` from a kustomization, not patches"),
    (lambda d: (d / "kustomization.yaml").write_text("resources: [missing.yaml]\n"),
     "resource 'missing.yaml' does not exist"),
    (lambda d: (d / "kustomization.yaml").write_text(
        "resources: [https://example.com/x.yaml]\n"), "remote resource"),
    (lambda d: (d / "rbac.yaml").write_text("kind: [unclosed\n"), "rbac.yaml: not valid YAML"),
    (lambda d: (d / "rbac.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n"),
     r"rbac.yaml \(document 1\): ConfigMap without metadata.name"),
    (lambda d: (d / "rbac.yaml").write_text("apiVersion: v1\nmetadata: {name: x}\n"),
     "kind is missing"),
    (lambda d: (d / "rbac.yaml").write_text((d / "settings.yaml").read_text()),
     "ConfigMap ambit-system/ambit-config is also defined in rbac.yaml"),
    (lambda d: (d / "settings.yaml").write_text("apiVersion: v1\nkind: ConfigMap\n"
                                                "metadata: {name: other, namespace: x}\n"),
     "no ConfigMap ambit-system/ambit-config"),
])
def test_broken_manifests_are_clear_errors(manifests: Path, edit: Any, fragment: str) -> None:
    edit(manifests)
    with pytest.raises(RenderError, match=fragment):
        render_dir(manifests, Overrides())


# ----- the command line -----

def test_cli_dry_run_prints_yaml_and_json(manifests: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["install", "--dry-run", "--manifests", str(manifests), "--image-prefix",
                     NEW_PREFIX, "--tag", NEW_TAG, "--image", "waypoint=w.example.com/wp:3",
                     "--redirect-mode", "iptables"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    node = next(d for d in docs if d["kind"] == "DaemonSet")
    assert {c["image"] for c in containers(node)} == {NEW["agent"], NEW["ztunnel"]}
    args = containers(next(d for d in docs if d["kind"] == "Deployment"))[0]["args"]
    assert args[args.index("--waypoint-image") + 1] == "w.example.com/wp:3"
    assert next(d for d in docs if d["kind"] == "ConfigMap")["data"]["redirectMode"] \
        == "iptables"
    assert cli.main(["install", "--dry-run", "-o", "json", "--manifests", str(manifests)]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "List"


@pytest.mark.parametrize("argv, message", [
    (["--trust-domain", "BAD"], "--trust-domain 'BAD': not a trust domain"),
    (["--redirect-mode", "x"], "--redirect-mode 'x': not one of"),
    (["--timeout", "0"], "--timeout must be more than 0"),
    (["--image", "registry.example.com/ambit:0.1.0"], "--image takes COMPONENT=IMAGE"),
    (["--tag", "a b"], "--tag 'a b': not a tag"),
])
def test_cli_usage_errors_exit_2_with_one_line(manifests: Path, argv: list[str], message: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["install", "--dry-run", "--manifests", str(manifests), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ambit install: error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_missing_manifests_exits_2(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["uninstall", "--manifests", str(tmp_path / "none")]) == 2
    assert "no such directory" in capsys.readouterr().err


# ----- the agent printer shared with `ambit agent status` -----

def test_agent_lines_match_what_ambit_agent_status_prints(
        capsys: pytest.CaptureFixture[str]) -> None:
    """``ambit status --pods`` shows a node like ``ambit agent status`` on that node does."""
    import argparse
    import http.server
    import threading

    from agent import main as agent_main
    from agent.status_view import agent_lines

    doc = {"node": "node-a", "redirectMode": "iptables", "redirectModeReason": "requested",
           "ready": "ready", "lastError": "boom", "uplinks": ["eth0"], "cni": "chained",
           "capture": {"rules": 4, "chains": 2},
           "pods": [{"pod": "uid-1", "ips": ["10.0.0.1"], "hostIface": "veth1", "netns": "",
                     "captured": False, "shouldCapture": True, "reason": "pending"}]}
    body = json.dumps(doc).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert agent_main._status(argparse.Namespace(url=url, json=False)) == 0
    finally:
        server.shutdown()
    printed = capsys.readouterr().out.splitlines()
    assert agent_lines(doc) == printed
    assert printed[-1].split()[3] == "no!"


@pytest.mark.parametrize("command", ["status", "uninstall"])
def test_a_missing_kubeconfig_is_named(tmp_path: Path, command: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert cli.main([command, "--kubeconfig", str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"kubeconfig {missing} does not exist" in err and "Traceback" not in err
