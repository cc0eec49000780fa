"""The Vagrant cluster (vagrant/): everything about it that can be checked without a hypervisor.

Why these tests: the Vagrant flow cannot run on the machines this project is built on (no
hypervisor, no container engine), so a typo in the Vagrantfile, a shell mistake, a sample the
controller would reject or a smoke test that reads the wrong metric would only show on a
user's machine. Checked here:

* the Vagrantfile is valid Ruby, and evaluated against a small stand-in for Vagrant's
  configuration DSL (a Ruby recorder fed through ``ruby``): three machines in order with
  distinct addresses in one /24, both providers sized from the defaults or AMBIT_VAGRANT_*,
  the repository rsynced to /ambit without Vagrant's own state, every provisioner's script
  present and given every variable it requires, the trigger that installs Ambit on the last
  worker, bad settings refused with the variable named, the host-side secrets kept 0600;
* every script passes ``bash -n`` and ``shellcheck``;
* the sample app and the capture pod validate strictly against the Kubernetes schemas
  (kubernetes-validate, offline), the AuthorizationPolicies against our CRD's schema with no
  field the API server would prune, and the whole sample goes through the controller's own
  Kubernetes conversion and translation with no problem reported: the server is bound to the
  waypoint, the policies parse, and the L4 policy lets only the waypoint in;
* the image the scripts use is the manifests' default;
* the smoke test's helper (vagrant/scripts/smokecheck.py) reads real Prometheus output, pcap
  files with VXLAN, and the agents' pod lists, and its verdicts fail when they should; the
  metric names and labels the smoke test asks for are the ones the ztunnel and the waypoint
  export.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import re
import shlex
import shutil
import stat
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema  # type: ignore[import-untyped, unused-ignore]
import kubernetes_validate  # type: ignore[import-untyped, unused-ignore]
import pytest
import yaml

from controller.registry.k8s_convert import build_snapshot, gateway_record
from controller.registry.translate import translate
from controller.waypoint.deploy import render
from controller.waypoint.model import PolicyAction
from controller.waypoint.parse import (
    parse_gateway,
    parse_http_route,
    parse_waypoint_policy,
    waypoint_policies,
)
from mesh.state.parse import parse_authorization_spec
from waypoint.als import LABELS as WAYPOINT_LABELS
from ztunnel.authz import ConnectionInfo, authorize
from ztunnel.metrics import CONNECTION_LABELS, ConnectionLabels, Metrics

ROOT = Path(__file__).resolve().parents[2]
VAGRANT = ROOT / "vagrant"
VAGRANTFILE = VAGRANT / "Vagrantfile"
SCRIPTS = VAGRANT / "scripts"
SAMPLE = VAGRANT / "sample"
CAPTURE_POD = SCRIPTS / "capture-pod.yaml"
SMOKE = SCRIPTS / "smoke-test.sh"
CRDS = ROOT / "deploy" / "daemonset" / "crds"
MANIFESTS = ROOT / "deploy" / "daemonset"
CONTRACT_IMAGE = "localhost/ambit:0.1.0"
TRUST_DOMAIN = "cluster.local"
NS = "demo"


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: hack/setup.sh installs it (Debian package {name})"
    return path


# --- the Vagrantfile, evaluated with a recording stand-in for Vagrant ------------------------

# Records every setter and call on the configuration objects, with the path of the object it
# was made on; blocks are run with a recorder scoped to that call, except trigger `ruby`
# blocks, which run on the host at `vagrant up` time (only recorded).
RECORDER = r'''
require "json"

$events = []

def jsonable(v)
  case v
  when Symbol then ":#{v}"
  when Hash then v.each_with_object({}) { |(k, x), h| h[k.to_s] = jsonable(x) }
  when Array then v.map { |x| jsonable(x) }
  when Proc then "<proc>"
  when Recorder then "<recorder #{v.__path}>"
  when String, Integer, Float, true, false, nil then v
  else v.to_s
  end
end

class Recorder
  def initialize(path)
    @path = path
    @children = {}
  end

  def __path
    @path
  end

  def respond_to_missing?(*)
    true
  end

  def method_missing(name, *args, **kw, &blk)
    n = name.to_s
    if n.end_with?("=")
      $events << { "path" => @path, "op" => "set", "name" => n.chomp("="),
                   "value" => jsonable(args[0]) }
      return args[0]
    end
    if args.empty? && kw.empty? && blk.nil?
      return (@children[n] ||= Recorder.new("#{@path}.#{n}"))
    end
    index = $events.length
    child = Recorder.new("#{@path}.#{n}[#{index}]")
    event = { "path" => @path, "op" => "call", "name" => n, "args" => jsonable(args),
              "kw" => jsonable(kw), "scope" => child.__path, "block" => !blk.nil? }
    $events << event
    if blk && n != "ruby"
      blk.call(child, *Array.new([blk.arity - 1, 0].max) { Recorder.new("#{child.__path}.arg") })
    end
    child
  end
end

module Vagrant
  def self.require_version(*requirements)
    $events << { "path" => "Vagrant", "op" => "call", "name" => "require_version",
                 "args" => requirements }
  end

  def self.configure(version)
    $events << { "path" => "Vagrant", "op" => "call", "name" => "configure",
                 "args" => [version] }
    yield Recorder.new("config")
  end

  def self.has_plugin?(*)
    false
  end
end

load ENV.fetch("VAGRANTFILE")
puts "--- recorded ---"
puts JSON.generate({ "events" => $events,
                     "no_parallel" => ENV["VAGRANT_NO_PARALLEL"] })
'''


def evaluate(tmp_path: Path, **env: str) -> dict[str, Any]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AMBIT_VAGRANT_")}
    environ.pop("VAGRANT_NO_PARALLEL", None)
    environ.update({"VAGRANTFILE": str(VAGRANTFILE),
                    "AMBIT_VAGRANT_STATE_DIR": str(tmp_path / "state")})
    environ.update(env)
    stub = tmp_path / "recorder.rb"
    stub.write_text(RECORDER)
    proc = subprocess.run([_tool("ruby"), str(stub)], capture_output=True, text=True,
                          env=environ, timeout=60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip() or proc.stdout.strip())
    _, sep, recorded = proc.stdout.partition("--- recorded ---\n")
    assert sep, proc.stdout
    doc = json.loads(recorded)
    assert isinstance(doc, dict)
    return doc


class Machine:
    """One `config.vm.define` and what was recorded inside its block."""

    def __init__(self, define: dict[str, Any], events: list[dict[str, Any]]) -> None:
        self.name: str = define["args"][0]
        self.options: dict[str, Any] = define["kw"]
        self.index = events.index(define)
        scope = define["scope"]
        self.events = [e for e in events if str(e["path"]).startswith(scope)]

    def set(self, suffix: str, name: str) -> Any:
        for e in self.events:
            if e["op"] == "set" and e["path"].endswith(suffix) and e["name"] == name:
                return e["value"]
        raise KeyError(f"{self.name}: nothing set {suffix}.{name}")

    def calls(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["op"] == "call" and e["name"] == name]

    def provider(self, provider: str) -> dict[str, Any]:
        (call,) = [c for c in self.calls("provider") if c["args"] == [f":{provider}"]]
        return {e["name"]: e["value"] for e in self.events
                if e["op"] == "set" and e["path"] == call["scope"]}

    @property
    def ip(self) -> str:
        (net,) = self.calls("network")
        assert net["args"] == [":private_network"], net
        return str(net["kw"]["ip"])

    @property
    def provisioners(self) -> list[dict[str, Any]]:
        return self.calls("provision")


def machines(doc: dict[str, Any]) -> list[Machine]:
    events: list[dict[str, Any]] = doc["events"]
    defines = [e for e in events if e["op"] == "call" and e["name"] == "define"
               and e["path"] == "config.vm"]
    return [Machine(d, events) for d in defines]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return evaluate(tmp_path_factory.mktemp("vagrant"))


def test_vagrantfile_is_valid_ruby() -> None:
    proc = subprocess.run([_tool("ruby"), "-c", str(VAGRANTFILE)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0 and "Syntax OK" in proc.stdout, proc.stderr


def test_three_machines_in_order_on_one_private_24(recorded: dict[str, Any]) -> None:
    ms = machines(recorded)
    assert [m.name for m in ms] == ["cp1", "worker1", "worker2"]
    ips = [ipaddress.ip_address(m.ip) for m in ms]
    assert len(set(ips)) == 3
    nets = {ipaddress.ip_network(f"{ip}/24", strict=False) for ip in ips}
    assert nets == {ipaddress.ip_network("192.168.56.0/24")}
    assert all(ip.is_private for ip in ips)
    assert [m.options.get("primary") for m in ms] == [True, False, False]
    for m in ms:
        assert m.set(".vm", "hostname") == m.name
    # Machines come up one at a time, in this order.
    assert recorded["no_parallel"] == "yes"


def test_providers_are_sized_from_defaults(recorded: dict[str, Any]) -> None:
    cp, w1, w2 = machines(recorded)
    for provider in ("virtualbox", "libvirt"):
        assert cp.provider(provider).items() >= {"memory": 4096, "cpus": 2}.items()
        for w in (w1, w2):
            assert w.provider(provider).items() >= {"memory": 3072, "cpus": 2}.items()


def test_sizes_network_and_box_follow_the_environment(tmp_path: Path) -> None:
    doc = evaluate(tmp_path, AMBIT_VAGRANT_CP_MEMORY="6144", AMBIT_VAGRANT_CP_CPUS="4",
                   AMBIT_VAGRANT_WORKER_MEMORY="2048", AMBIT_VAGRANT_WORKER_CPUS="1",
                   AMBIT_VAGRANT_NETWORK="10.77.3", AMBIT_VAGRANT_BOX="generic/debian12",
                   AMBIT_VAGRANT_K8S_VERSION="v1.33")
    cp, w1, _ = machines(doc)
    assert cp.provider("libvirt")["memory"] == 6144 and cp.provider("virtualbox")["cpus"] == 4
    assert w1.provider("virtualbox")["memory"] == 2048 and w1.provider("libvirt")["cpus"] == 1
    assert [m.ip for m in machines(doc)] == ["10.77.3.10", "10.77.3.11", "10.77.3.12"]
    boxes = [e["value"] for e in doc["events"] if e["op"] == "set" and e["name"] == "box"]
    assert boxes == ["generic/debian12"]
    common = next(p for p in cp.provisioners if p["args"] == ["common"])
    assert common["kw"]["env"]["K8S_VERSION"] == "v1.33"


@pytest.mark.parametrize(("variable", "value"), [
    ("AMBIT_VAGRANT_CP_MEMORY", "lots"),
    ("AMBIT_VAGRANT_WORKER_CPUS", "0"),
    ("AMBIT_VAGRANT_NETWORK", "192.168.56.0/24"),
    ("AMBIT_VAGRANT_NETWORK", "300.1.1"),
    ("AMBIT_VAGRANT_K8S_VERSION", "v1.29"),
    ("AMBIT_VAGRANT_K8S_VERSION", "1.31"),
    ("AMBIT_VAGRANT_REDIRECT_MODE", "tproxy"),
    ("AMBIT_VAGRANT_AUTO_INSTALL", "yes"),
])
def test_bad_settings_are_refused_naming_the_variable(tmp_path: Path, variable: str,
                                                      value: str) -> None:
    with pytest.raises(RuntimeError, match=re.escape(variable)):
        evaluate(tmp_path, **{variable: value})


def test_repository_is_rsynced_without_vagrant_state(recorded: dict[str, Any]) -> None:
    folders = [e for e in recorded["events"]
               if e["op"] == "call" and e["name"] == "synced_folder"]
    by_target = {f["args"][1]: f for f in folders}
    assert by_target["/vagrant"]["kw"] == {"disabled": True}
    ambit = by_target["/ambit"]
    assert Path(ambit["args"][0]) == ROOT
    assert ambit["kw"]["type"] == "rsync"
    excluded = ambit["kw"]["rsync__exclude"]
    # Vagrant's machine data holds every machine's private SSH key and our secrets.
    assert "vagrant/.vagrant/" in excluded and ".venv/" in excluded and ".git/" in excluded


def _required_variables(script: Path, args: list[str]) -> set[str]:
    """The variables a script refuses to run without (``: "${VAR:?...}"``): those at its top
    level, plus those of the function named by its first argument (image.sh build|fetch)."""
    scopes: dict[str, set[str]] = {}
    scope = ""
    for line in script.read_text().splitlines():
        start = re.match(r"^([a-z_]+)\(\) \{$", line)
        if start:
            scope = start.group(1)
        elif line == "}":
            scope = ""
        scopes.setdefault(scope, set()).update(
            re.findall(r':\s+"\$\{([A-Z_0-9]+):\?', line))
    return scopes.get("", set()) | (scopes.get(args[0], set()) if args else set())


def test_provisioners_exist_run_in_order_and_get_their_variables(
        recorded: dict[str, Any]) -> None:
    cp, w1, w2 = machines(recorded)
    names = {m.name: [p["args"][0] for p in m.provisioners] for m in (cp, w1, w2)}
    assert names == {"cp1": ["common", "control-plane", "image", "ambit", "smoke"],
                     "worker1": ["common", "join", "image"],
                     "worker2": ["common", "join", "image"]}
    for m in (cp, w1, w2):
        for p in m.provisioners:
            kw = p["kw"]
            assert kw["type"] == "shell"
            script = VAGRANT / kw["path"]
            assert script.is_file(), f"{m.name} {p['args'][0]}: {script} is missing"
            missing = _required_variables(script, kw.get("args", [])) - set(kw.get("env", {}))
            assert not missing, f"{m.name} {p['args'][0]}: {script.name} needs {missing}"
            if "KUBEADM_TOKEN" in kw.get("env", {}) or "SHARE_KEY" in kw.get("env", {}):
                assert kw.get("sensitive") is True, f"{m.name} {p['args'][0]} shows secrets"
    # The Ambit steps run only when asked (the trigger, or --provision-with).
    assert [p["kw"].get("run") for p in cp.provisioners][-2:] == ["never", "never"]
    image_build = next(p for p in cp.provisioners if p["args"] == ["image"])
    assert image_build["kw"]["args"] == ["build"]
    for w in (w1, w2):
        fetch = next(p for p in w.provisioners if p["args"] == ["image"])
        assert fetch["kw"]["args"] == ["fetch"]
        assert fetch["kw"]["env"]["SHARE_KEY"] == image_build["kw"]["env"]["SHARE_KEY"]
        join = next(p for p in w.provisioners if p["args"] == ["join"])
        cp_env = next(p for p in cp.provisioners if p["args"] == ["control-plane"])["kw"]["env"]
        assert join["kw"]["env"]["KUBEADM_TOKEN"] == cp_env["KUBEADM_TOKEN"]
        assert join["kw"]["env"]["CP_IP"] == cp.ip
    # cp1's provisioners (it is defined first, and machines come up in definition order)
    # before any worker's.
    assert cp.index < w1.index < w2.index
    assert max(recorded["events"].index(e) for e in cp.provisioners) < \
        min(recorded["events"].index(e) for e in w1.provisioners)


def test_last_worker_triggers_the_install_on_cp1(recorded: dict[str, Any]) -> None:
    cp, w1, w2 = machines(recorded)
    assert not w1.calls("after") and not cp.calls("after")
    (after,) = w2.calls("after")
    assert after["args"] == [":up"]
    scoped = [e for e in w2.events if e["path"] == after["scope"]]
    assert any(e["op"] == "call" and e["name"] == "ruby" and e["block"] for e in scoped)
    # The trigger runs these scripts from the synced copy on cp1.
    source = VAGRANTFILE.read_text()
    trigger = source[source.index("node.trigger.after"):]
    run = re.search(r"%w\[([^\]]+)\]", trigger)
    assert run is not None
    for script in run.group(1).split():
        assert (SCRIPTS / script).is_file(), script
    assert "/ambit/vagrant/scripts/" in trigger


def test_no_auto_install_leaves_out_the_trigger(tmp_path: Path) -> None:
    doc = evaluate(tmp_path, AMBIT_VAGRANT_AUTO_INSTALL="0")
    assert not any(e["op"] == "call" and e["name"] == "after" for e in doc["events"])


def test_secrets_are_made_once_private_and_reused(tmp_path: Path) -> None:
    first = evaluate(tmp_path)
    second = evaluate(tmp_path)
    path = tmp_path / "state" / "ambit-secrets.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secrets = json.loads(path.read_text())
    assert re.fullmatch(r"[a-z0-9]{6}\.[a-z0-9]{16}", secrets["token"])
    assert re.fullmatch(r"[0-9a-f]{64}", secrets["share_key"])

    def token(doc: dict[str, Any]) -> str:
        cp = machines(doc)[0]
        p = next(p for p in cp.provisioners if p["args"] == ["control-plane"])
        return str(p["kw"]["env"]["KUBEADM_TOKEN"])

    assert token(first) == token(second) == secrets["token"]
    path.write_text('{"token": "not a token"}')
    with pytest.raises(RuntimeError, match=re.escape("ambit-secrets.json")):
        evaluate(tmp_path)


# --- scripts -----------------------------------------------------------------------------------

SHELL_SCRIPTS = sorted(SCRIPTS.glob("*.sh"))


def test_all_expected_scripts_exist() -> None:
    assert {p.name for p in SHELL_SCRIPTS} == {
        "common.sh", "control-plane.sh", "worker.sh", "image.sh", "install.sh",
        "smoke-test.sh"}


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_script_syntax_and_shellcheck(script: Path) -> None:
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n"), "bash scripts (the provisioners run them)"
    # The README runs them by path (sudo /ambit/vagrant/scripts/smoke-test.sh).
    assert os.access(script, os.X_OK), f"chmod +x {script.relative_to(ROOT)}"
    assert "set -euo pipefail" in text
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([_tool("shellcheck"), "--shell=bash", str(script)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _manifest_images() -> set[str]:
    images: set[str] = set()
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict) or doc.get("kind") not in (
                    "Deployment", "DaemonSet"):
                continue
            pod = doc["spec"]["template"]["spec"]
            for c in [*pod.get("initContainers", []), *pod.get("containers", [])]:
                images.add(c["image"])
    return images


def test_scripts_use_the_manifests_default_image(recorded: dict[str, Any]) -> None:
    # One image per component (issue 17): PREFIX + component + ":" + TAG, as the manifests name
    # them; the Vagrantfile passes PREFIX and TAG, install.sh defaults to the same.
    images = _manifest_images()
    found = {re.fullmatch(r"(.*?)(agent|ztunnel|controller):([^:/]+)", i) for i in images}
    assert None not in found, f"not PREFIX-COMPONENT:TAG: {images}"
    ((prefix, tag),) = {(m.group(1), m.group(3)) for m in found if m is not None}
    for key, value in (("AMBIT_IMAGE_PREFIX", prefix), ("AMBIT_TAG", tag)):
        used = {str(e["kw"]["env"][key]) for m in machines(recorded)
                for e in m.provisioners if key in e["kw"].get("env", {})}
        assert used == {value}, key
        assert f"{key}=${{{key}:-{value}}}" in (SCRIPTS / "install.sh").read_text()


def test_pinned_downloads() -> None:
    source = VAGRANTFILE.read_text()
    assert re.search(r'GATEWAY_API_VERSION = "v\d+\.\d+\.\d+"', source)
    assert re.search(r'FLANNEL_VERSION = "v\d+\.\d+\.\d+"', source)
    sample = "\n".join(p.read_text() for p in sorted(SAMPLE.glob("*.yaml")))
    images = re.findall(r"image:\s*(\S+)", sample + CAPTURE_POD.read_text())
    assert images and all(re.search(r":\d+(\.\d+)+$", i) for i in images), images


# --- the sample app ----------------------------------------------------------------------------

def sample_objects() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in sorted(SAMPLE.glob("*.yaml")):
        out.extend(d for d in yaml.safe_load_all(path.read_text()) if d is not None)
    return out


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [o for o in sample_objects() if o["kind"] == kind]


def one(kind: str, name: str) -> dict[str, Any]:
    (obj,) = [o for o in by_kind(kind) if o["metadata"]["name"] == name]
    return obj


BUILT_IN = {"Namespace", "ServiceAccount", "Deployment", "Service"}
AMBIT_KINDS = {"AuthorizationPolicy"}
GATEWAY_KINDS = {"Gateway", "HTTPRoute"}


def _k8s_minor(recorded: dict[str, Any]) -> str:
    cp = machines(recorded)[0]
    common = next(p for p in cp.provisioners if p["args"] == ["common"])
    return str(common["kw"]["env"]["K8S_VERSION"]).removeprefix("v")


def test_sample_kinds_are_all_checked() -> None:
    kinds = {o["kind"] for o in sample_objects()}
    assert kinds == BUILT_IN | AMBIT_KINDS | GATEWAY_KINDS
    for o in sample_objects():
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == NS, o["metadata"]


def test_sample_files_apply_namespace_first() -> None:
    first = sorted(SAMPLE.glob("*.yaml"))[0]
    assert [d["kind"] for d in yaml.safe_load_all(first.read_text())] == ["Namespace"]


def _validate_built_in(obj: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{obj['kind']} {obj['metadata'].get('name')}: {e.message} at "
                    f"{'.'.join(str(p) for p in e.path)}")


def test_sample_built_in_objects_validate_strictly(recorded: dict[str, Any]) -> None:
    version = _k8s_minor(recorded)
    for obj in sample_objects():
        if obj["kind"] in BUILT_IN:
            _validate_built_in(obj, version)


def test_sample_namespace_is_ambient_and_server_uses_the_waypoint() -> None:
    assert one("Namespace", NS)["metadata"]["labels"] == {"ambit.dev/dataplane-mode": "ambient"}
    assert one("Service", "server")["metadata"]["labels"]["ambit.dev/use-waypoint"] == "waypoint"


def _pod_spec(name: str) -> dict[str, Any]:
    spec = one("Deployment", name)["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def test_sample_identities_and_placement(recorded: dict[str, Any]) -> None:
    nodes = {m.name for m in machines(recorded)}
    placement = {}
    for name in ("server", "client", "intruder"):
        spec = _pod_spec(name)
        assert spec["serviceAccountName"] == name
        assert one("ServiceAccount", name)
        placement[name] = spec["nodeSelector"]["kubernetes.io/hostname"]
        assert placement[name] in nodes
    # The client and the server on different workers: the requests cross the wire, where the
    # smoke test captures them.
    assert placement["client"] != placement["server"] != "cp1"
    assert placement["intruder"] == placement["client"]
    server = _pod_spec("server")["containers"][0]
    assert server["ports"][0]["containerPort"] == 8080
    assert one("Service", "server")["spec"]["ports"][0]["targetPort"] == 8080
    assert ":8080/" in SMOKE.read_text()


def _crd_schema(plural: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRDS / f"{plural}.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v.get("served")]
    schema = version["schema"]["openAPIV3Schema"]
    assert isinstance(schema, dict)
    return schema


def _pruned(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    """Fields of ``value`` the API server would prune: not declared by a structural schema."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for k, v in value.items():
            if props is not None and k in props:
                out += _pruned(v, props[k], f"{path}.{k}")
            elif isinstance(extra, dict):
                out += _pruned(v, extra, f"{path}.{k}")
            elif props is not None or extra is None:
                out.append(f"{path}.{k}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            out += _pruned(v, schema["items"], f"{path}[{i}]")
    return out


def test_sample_policies_validate_against_our_crd() -> None:
    schema = _crd_schema("authorizationpolicies")
    crd = yaml.safe_load((CRDS / "authorizationpolicies.yaml").read_text())
    group, (served,) = crd["spec"]["group"], [v["name"] for v in crd["spec"]["versions"]
                                              if v.get("served")]
    policies = by_kind("AuthorizationPolicy")
    assert len(policies) == 3
    for p in policies:
        assert p["apiVersion"] == f"{group}/{served}"
        jsonschema.validate(p["spec"], schema["properties"]["spec"])
        assert _pruned(p["spec"], schema["properties"]["spec"], "spec") == []


def test_crd_check_catches_a_pruned_field() -> None:
    schema = _crd_schema("authorizationpolicies")["properties"]["spec"]
    assert _pruned({"action": "ALLOW", "rulez": []}, schema, "spec") == ["spec.rulez"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"action": "PERMIT"}, schema)


def test_sample_gateway_and_route_parse() -> None:
    gw = one("Gateway", "waypoint")
    gateway = parse_gateway("waypoint", NS, gw["metadata"].get("labels", {}).items(),
                            gw["spec"])
    assert gateway.waypoint_for == "service"
    problems: list[str] = []
    assert gateway_record(gw, problems.append) == gateway and not problems
    route = one("HTTPRoute", "server")
    parsed = parse_http_route("server", NS, route["spec"])
    assert [(p.kind, p.name, p.port) for p in parsed.parents] == [("Service", "server", 80)]
    (rule,) = parsed.rules
    assert rule.response_headers is not None
    assert dict(rule.response_headers.set) == {"x-ambit-waypoint": "demo/waypoint"}
    # The smoke test looks for exactly this header.
    assert "x-ambit-waypoint: demo/waypoint" in SMOKE.read_text()


def test_sample_policies_parse_as_the_controller_reads_them() -> None:
    l4 = one("AuthorizationPolicy", "server-only-via-waypoint")
    policy = parse_authorization_spec(l4["metadata"]["name"], NS, l4["spec"], "spec")
    waypoint = f"{TRUST_DOMAIN}/ns/{NS}/sa/waypoint"

    def allowed(principal: str) -> bool:
        c = ConnectionInfo(ipaddress.ip_address("10.244.1.5"), 8080, principal, NS)
        return authorize((policy,), c).allowed

    assert allowed(waypoint)
    assert not allowed(f"{TRUST_DOMAIN}/ns/{NS}/sa/client")
    assert not allowed(f"{TRUST_DOMAIN}/ns/{NS}/sa/intruder")

    allow = parse_waypoint_policy("waypoint-allow-client", NS,
                                  one("AuthorizationPolicy", "waypoint-allow-client")["spec"])
    assert allow.action is PolicyAction.ALLOW
    assert [m.value for r in allow.rules for s in r.sources for m in s.principals] == [
        f"{TRUST_DOMAIN}/ns/{NS}/sa/client"]
    deny = parse_waypoint_policy("waypoint-deny-admin-writes", NS,
                                 one("AuthorizationPolicy", "waypoint-deny-admin-writes")["spec"])
    assert deny.action is PolicyAction.DENY
    first = deny.rules[0].operations[0]
    assert [m.value for m in first.methods] == ["POST"]
    assert [m.value for m in first.paths] == ["/admin*"]
    for p in (allow, deny):
        assert [(t.kind, t.name) for t in p.targets] == [("Gateway", "waypoint")]


def _pods_of(deployment: dict[str, Any], ip: str) -> dict[str, Any]:
    """The pod a Deployment would run, as the API server would show it (running, ready)."""
    meta, template = deployment["metadata"], deployment["spec"]["template"]
    spec = template["spec"]
    node = (spec.get("nodeSelector") or {}).get("kubernetes.io/hostname", "worker1")
    return {
        "metadata": {"name": f"{meta['name']}-7d9f8-abcde", "namespace": meta["namespace"],
                     "labels": {**template["metadata"]["labels"], "pod-template-hash": "7d9f8"},
                     "ownerReferences": [{"kind": "ReplicaSet", "name": f"{meta['name']}-7d9f8",
                                          "controller": True}]},
        "spec": {"nodeName": node, "serviceAccountName": spec.get("serviceAccountName",
                                                                  meta["name"]),
                 "containers": spec["containers"]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }


def test_the_controller_accepts_the_whole_sample() -> None:
    objs = sample_objects()
    gw_obj = {**one("Gateway", "waypoint")}
    gw_obj["metadata"] = {**gw_obj["metadata"], "uid": "0f1e2d3c-0000-4000-8000-000000000001"}
    gateway = parse_gateway("waypoint", NS, gw_obj["metadata"]["labels"].items(), gw_obj["spec"])
    rendered = render(gateway, uid=gw_obj["metadata"]["uid"], image=CONTRACT_IMAGE,
                      trust_domain=TRUST_DOMAIN, controller_address="ambit-controller:15011")
    waypoint_deployment = next(o for o in rendered if o["kind"] == "Deployment")
    waypoint_service = next(o for o in rendered if o["kind"] == "Service")

    ips = iter(f"10.244.{n}.{h}" for n, h in ((2, 5), (1, 5), (1, 6), (2, 9)))
    deployments = [*by_kind("Deployment"), waypoint_deployment]
    pods = [_pods_of(d, next(ips)) for d in deployments]
    services = []
    for n, s in enumerate([*by_kind("Service"), waypoint_service]):
        s = {**s, "spec": {**s["spec"], "clusterIP": f"10.96.0.{10 + n}",
                           "clusterIPs": [f"10.96.0.{10 + n}"]}}
        services.append(s)

    def keyed(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {f"{o['metadata'].get('namespace', '')}/{o['metadata']['name']}": o
                for o in items}

    caches = {
        "namespaces": keyed(by_kind("Namespace")),
        "pods": keyed(pods),
        "services": keyed(services),
        "authorizationpolicies": keyed(by_kind("AuthorizationPolicy")),
        "gateways": keyed([gw_obj]),
        "httproutes": keyed([o for o in objs if o["kind"] == "HTTPRoute"]),
    }
    problems: list[str] = []
    snapshot = build_snapshot(caches, 1, problems.append)
    assert problems == []
    translation = translate(snapshot, TRUST_DOMAIN, 1)
    assert translation.problems == ()
    config = translation.config
    server = next(s for s in config.services if s.key == f"{NS}/server")
    assert server.waypoint is not None and (server.waypoint.namespace, server.waypoint.name) \
        == (NS, "waypoint")
    by_name = {w.name.split("-")[0]: w for w in config.workloads}
    assert by_name["client"].protocol.name == "HBONE"
    assert by_name["server"].protocol.name == "HBONE"
    assert by_name["waypoint"].protocol.name == "TCP"  # a waypoint is never captured
    assert [p.key for p in config.policies] == [f"{NS}/server-only-via-waypoint"]
    l7, l7_problems = waypoint_policies(snapshot.authorization_policies)
    assert l7_problems == ()
    assert sorted(p.name for p in l7) == ["waypoint-allow-client", "waypoint-deny-admin-writes"]
    assert len(snapshot.http_routes) == 1


# --- the capture pod ---------------------------------------------------------------------------

def test_capture_pod_validates(recorded: dict[str, Any]) -> None:
    text = CAPTURE_POD.read_text()
    assert "__NODE__" in text
    assert "s/__NODE__/" in SMOKE.read_text()
    pod = yaml.safe_load(text.replace("__NODE__", "worker1"))
    _validate_built_in(pod, _k8s_minor(recorded))
    assert pod["spec"]["hostNetwork"] is True
    assert pod["spec"]["nodeName"] == "worker1"
    args = pod["spec"]["containers"][0]["args"][0]
    # Debian's tcpdump AppArmor profile lets it write *.pcap files; -Z root keeps it from
    # dropping to a user that cannot write the directory.
    assert re.search(r"-w \"\$dir/\w+\.pcap\"", args) and "-Z root" in args
    assert "/var/tmp/ambit-smoke" in SMOKE.read_text() and "/var/tmp/ambit-smoke" in args
    proc = subprocess.run(["sh", "-n", "-c", args], capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr


# --- the smoke test's helper -------------------------------------------------------------------

def _load_smokecheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("smokecheck", SCRIPTS / "smokecheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["smokecheck"] = module
    spec.loader.exec_module(module)
    return module


sc = _load_smokecheck()

CLIENT = f"spiffe://{TRUST_DOMAIN}/ns/{NS}/sa/client"


def _ztunnel_exposition() -> str:
    m = Metrics()
    base = dict.fromkeys(CONNECTION_LABELS, "unknown")
    m.opened.labels(**{**base, "reporter": "source", "source_principal": CLIENT,
                       "connection_security_policy": "mutual_tls"}).inc(3)
    m.opened.labels(**{**base, "reporter": "source", "source_principal": CLIENT,
                       "connection_security_policy": "none"}).inc(7)
    m.opened.labels(**{**base, "reporter": "destination",
                       "source_principal": 'weird "quoted"\\name',
                       "response_flags": "DENY"}).inc()
    return m.render().decode()


def test_metrics_parser_reads_the_ztunnels_real_output() -> None:
    samples = sc.parse_metrics(_ztunnel_exposition())
    total, count = sc.metric_sum(samples, "istio_tcp_connections_opened_total",
                                 {"source_principal": CLIENT,
                                  "connection_security_policy": "mutual_tls"})
    assert (total, count) == (3.0, 1)
    total, _ = sc.metric_sum(samples, "istio_tcp_connections_opened_total",
                             {"source_principal": CLIENT})
    assert total == 10.0
    total, _ = sc.metric_sum(samples, "istio_tcp_connections_opened_total",
                             {"source_principal": 'weird "quoted"\\name'})
    assert total == 1.0
    # _created samples are another name; help and type lines are skipped.
    assert sc.metric_sum(samples, "istio_tcp_connections_opened", {})[1] == 0


def test_metrics_parser_refuses_garbage() -> None:
    with pytest.raises(sc.CheckError, match="line 2"):
        sc.parse_metrics("ok 1\nthis is not { a sample\n")


def test_connection_principal_is_the_spiffe_uri_the_smoke_test_expects() -> None:
    labels = ConnectionLabels(reporter="source", source=None,
                              source_principal=f"{TRUST_DOMAIN}/ns/{NS}/sa/client",
                              destination=None, service=None, mtls=True)
    values = dict(zip(CONNECTION_LABELS, labels.values(), strict=True))
    assert values["source_principal"] == CLIENT
    assert values["connection_security_policy"] == "mutual_tls"
    assert "printf 'spiffe://%s/ns/%s/sa/%s'" in SMOKE.read_text()


def _smoke_metric_calls() -> Iterator[list[str]]:
    text = SMOKE.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.startswith("metric "):
            yield shlex.split(line)


def test_smoke_test_asks_for_metrics_and_labels_that_exist() -> None:
    calls = list(_smoke_metric_calls())
    assert len(calls) >= 6
    exported = {"waypoint": ("istio_requests_total", set(WAYPOINT_LABELS)),
                "node": ("istio_tcp_connections_opened_total", set(CONNECTION_LABELS))}
    for call in calls:
        _, stem, _title, name, at_least, *labels = call
        expected_name, label_names = exported["waypoint" if stem == "waypoint" else "node"]
        assert name == expected_name, call
        float(at_least.replace("$REQUESTS", "5"))
        for label in labels:
            key = label.split("=", 1)[0]
            assert key in label_names, f"{key} is not a label of {name}: {call}"
    # mTLS is asserted at both ends and on the waypoint.
    mtls = [c for c in calls if "connection_security_policy=mutual_tls" in c]
    assert {c[1].split("-")[0] for c in mtls} == {"waypoint", "node"}


def test_metric_command_counts_since_the_first_scrape(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    before = tmp_path / "before.prom"
    after = tmp_path / "after.prom"
    before.write_text('istio_requests_total{source_principal="a",response_code="200"} 4\n')
    after.write_text('istio_requests_total{source_principal="a",response_code="200"} 9\n'
                     'istio_requests_total{source_principal="b",response_code="200"} 50\n')
    args = ["metric", "--file", str(after), "--before", str(before), "--name",
            "istio_requests_total", "--label", "source_principal=a", "--title", "t"]
    assert sc.main([*args, "--at-least", "5"]) == 0
    assert capsys.readouterr().out.startswith("PASS  t (istio_requests_total +5 since")
    assert sc.main([*args, "--at-least", "6"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL  t") and "expected at least 6 since the first scrape" in out
    assert sc.main(["metric", "--file", str(tmp_path / "missing"), "--name", "x",
                    "--title", "t"]) == 2


# Packets, built byte by byte (checked once against tshark while writing this test).

def _eth(payload: bytes) -> bytes:
    return b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x08\x00" + payload


def _ipv4(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0x4000, 64, proto, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return header + payload


def _tcp(sport: int, dport: int, payload: bytes = b"", flags: int = 0x18, seq: int = 1) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 65535, 0, 0) + payload


def _udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def _vxlan(inner: bytes, outer_src: str = "192.168.56.11",
           outer_dst: str = "192.168.56.12") -> bytes:
    return _eth(_ipv4(outer_src, outer_dst, 17,
                      _udp(40000, 8472, b"\x08\x00\x00\x00\x00\x00\x01\x00" + inner)))


def _pod_tcp(src: str, sport: int, dst: str, dport: int, payload: bytes = b"",
             flags: int = 0x18) -> bytes:
    return _vxlan(_eth(_ipv4(src, dst, 6, _tcp(sport, dport, payload, flags))))


def _pcap(frames: list[bytes], truncate_last: int = 0) -> bytes:
    out = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1)
    for i, f in enumerate(frames):
        out += struct.pack("<IIII", 1700000000 + i, 0, len(f), len(f)) + f
    return out[:len(out) - truncate_last] if truncate_last else out


MARKER = b"ambit-smoke-0011223344556677"
SERVER, CLIENT_IP, NODE1, WAYPOINT = "10.244.2.5", "10.244.1.5", "10.244.1.0", "10.244.2.9"
CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"r" * 40
SERVER_HELLO = b"\x16\x03\x03\x00\x7a\x02\x00\x00\x76\x03\x03" + b"s" * 40


def _hbone_exchange(src: str = NODE1, dst: str = WAYPOINT, sport: int = 41000) -> list[bytes]:
    return [
        _pod_tcp(src, sport, dst, 15008, flags=0x02),
        _pod_tcp(dst, 15008, src, sport, flags=0x12),
        _pod_tcp(src, sport, dst, 15008, CLIENT_HELLO),
        _pod_tcp(dst, 15008, src, sport, SERVER_HELLO),
        _pod_tcp(src, sport, dst, 15008, b"\x17\x03\x03\x00\x40" + b"\xaa" * 64),
    ]


def _wire(frames: list[bytes], tmp_path: Path,
          capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp_path / "capture.pcap"
    path.write_bytes(_pcap(frames))
    status = sc.main(["wire", "--pcap", str(path), "--marker", MARKER.decode(),
                      "--app-ip", SERVER, "--app-ip", CLIENT_IP])
    return status, capsys.readouterr().out


def test_wire_passes_hbone_only_traffic(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    frames = [*_hbone_exchange(), *_hbone_exchange(WAYPOINT, SERVER, 42000),
              # unrelated cluster traffic (kubelet TLS, DNS) is not the sample's
              _eth(_ipv4("192.168.56.10", "192.168.56.11", 6, _tcp(6443, 50000, b"\x17\x03"))),
              _vxlan(_eth(_ipv4("10.244.1.7", "10.244.0.3", 17, _udp(5353, 53, b"q"))))]
    status, out = _wire(frames, tmp_path, capsys)
    assert status == 0, out
    assert out.count("PASS") == 4 and "2 connection(s) on port 15008" in out


def test_wire_fails_on_plaintext_marker(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    leak = _pod_tcp(NODE1, 41000, WAYPOINT, 15008,
                    b"GET /echo?msg=" + MARKER + b" HTTP/1.1\r\n")
    status, out = _wire([*_hbone_exchange(), leak], tmp_path, capsys)
    assert status == 1
    assert "FAIL  no plaintext" in out and "1 packet(s) carry the marker" in out


def test_wire_finds_a_marker_split_across_segments(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    half = len(MARKER) // 2
    frames = [*_hbone_exchange(),
              _pod_tcp(NODE1, 41000, WAYPOINT, 15008, b"xx" + MARKER[:half]),
              _pod_tcp(NODE1, 41000, WAYPOINT, 15008, MARKER[half:] + b"yy")]
    status, out = _wire(frames, tmp_path, capsys)
    assert status == 1 and "in the stream 10.244.1.0:41000 -> 10.244.2.9:15008" in out


def test_wire_fails_on_sample_traffic_outside_hbone(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    plain = _pod_tcp(CLIENT_IP, 43000, SERVER, 8080, b"\x00" * 10)
    status, out = _wire([*_hbone_exchange(), plain], tmp_path, capsys)
    assert status == 1
    assert "FAIL  the sample pods' TCP traffic" in out
    assert "10.244.1.5:43000 -> 10.244.2.5:8080" in out


def test_wire_fails_without_hbone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out = _wire([_vxlan(_eth(_ipv4("10.244.1.7", "10.244.0.3", 17,
                                           _udp(5353, 53, b"q"))))], tmp_path, capsys)
    assert status == 1 and "FAIL  HBONE between the nodes: 0 connection(s)" in out


def test_wire_fails_when_hbone_does_not_start_with_tls(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    frames = [_pod_tcp(NODE1, 41000, WAYPOINT, 15008, flags=0x02),
              _pod_tcp(NODE1, 41000, WAYPOINT, 15008, b"CONNECT server:80 HTTP/2\r\n")]
    status, out = _wire(frames, tmp_path, capsys)
    assert status == 1 and "are not a TLS handshake record" in out


def test_wire_notes_pooled_connections(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    # No SYN captured: the ztunnels reused a connection; nothing to say about its handshake.
    frames = _hbone_exchange()[4:]
    status, out = _wire(frames, tmp_path, capsys)
    assert status == 0, out
    assert "no HBONE connection started during the capture" in out


def test_pcap_reader_stops_at_a_cut_record_and_refuses_other_formats() -> None:
    frames = _hbone_exchange()
    records = list(sc.read_pcap(_pcap(frames, truncate_last=5)))
    assert len(records) == len(frames) - 1
    with pytest.raises(sc.CheckError, match="pcapng"):
        list(sc.read_pcap(b"\x0a\x0d\x0d\x0a" + b"\x00" * 40))
    with pytest.raises(sc.CheckError, match="shorter"):
        list(sc.read_pcap(b"\xd4\xc3\xb2\xa1"))


def test_decode_reads_cooked_captures_and_vlans() -> None:
    inner = _ipv4(CLIENT_IP, SERVER, 6, _tcp(1234, 15008))
    sll = b"\x00\x00\x00\x01\x00\x06" + b"\x00" * 8 + b"\x08\x00" + inner
    (seg,) = sc.decode(sc.LINKTYPE_LINUX_SLL, sll).segments
    assert (seg.src, seg.dport, seg.encapsulated) == (CLIENT_IP, 15008, False)
    vlan = b"\x02" * 12 + b"\x81\x00\x00\x05" + b"\x08\x00" + inner
    (seg,) = sc.decode(sc.LINKTYPE_ETHERNET, vlan).segments
    assert seg.dst == SERVER
    (seg,) = sc.decode(sc.LINKTYPE_ETHERNET, _pod_tcp(CLIENT_IP, 1, SERVER, 2)).segments
    assert seg.encapsulated


def test_captured_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = [{"node": "worker1", "pods": [
                {"pod": "demo/client-1", "captured": True, "shouldCapture": True, "reason": ""},
                {"pod": "demo/intruder-1", "captured": False, "shouldCapture": True,
                 "reason": "no host interface"}]},
            {"node": "worker2", "pods": [
                {"pod": "demo/server-1", "captured": True, "shouldCapture": True}]}]
    files = []
    for i, d in enumerate(docs):
        files += ["--status", str(tmp_path / f"{i}.json")]
        (tmp_path / f"{i}.json").write_text(json.dumps(d))
    assert sc.main(["captured", *files, "demo/client-1", "demo/server-1"]) == 0
    assert "PASS  demo/server-1 is captured (on worker2)" in capsys.readouterr().out
    assert sc.main(["captured", *files, "demo/intruder-1", "demo/gone"]) == 1
    out = capsys.readouterr().out
    assert "captured=False" in out and "no host interface" in out
    assert "FAIL  demo/gone is captured" in out and "no node agent lists this pod" in out


def test_smoke_test_runs_the_helper_it_ships() -> None:
    text = SMOKE.read_text()
    for command in re.findall(r'"\$\{HELPER\[@\]\}" (\w+)', text):
        assert command in ("captured", "metric", "wire")
    assert "vagrant/scripts/smokecheck.py" in text
    # Every check prints PASS/FAIL and the run ends with a summary and the exit status.
    assert "printf 'PASS  %s\\n'" in text and "printf 'FAIL  %s\\n'" in text
    assert "passed, %d failed" in text


def _ambit_commands(script: Path) -> Iterator[list[str]]:
    """The `ambit ...` command lines of a script, continuations joined, variables as words."""
    text = script.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        words = line.strip().split(" ", 1)
        if words[0] == "ambit" and len(words) > 1:
            command = re.sub(r"\s*(>|2>|\|\|).*$", "", words[1])
            yield shlex.split(command)


def test_scripts_call_ambit_with_flags_it_has() -> None:
    from ambit.cli import build_parser

    values = {"AMBIT_SRC": "/ambit", "AMBIT_IMAGE_PREFIX": "localhost/ambit-", "AMBIT_TAG": "0.1.0",
              "AMBIT_TRUST_DOMAIN": TRUST_DOMAIN, "AMBIT_REDIRECT_MODE": "auto"}
    seen = []
    for script in (SCRIPTS / "install.sh", SMOKE):
        for argv in _ambit_commands(script):
            if argv == ["--version"]:
                continue
            resolved = [re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], a) for a in argv]
            args = build_parser().parse_args(resolved)
            seen.append(args.command)
    assert "install" in seen and "status" in seen


def test_redirect_modes_offered_are_the_agents() -> None:
    from agent.config import REDIRECT_MODES

    match = re.search(r'"AMBIT_VAGRANT_REDIRECT_MODE", "auto",\s*%w\[([^\]]+)\]',
                      VAGRANTFILE.read_text())
    assert match is not None
    assert tuple(match.group(1).split()) == tuple(REDIRECT_MODES)


def test_agent_documents_come_from_ambit_status_json(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    status = {"installed": True, "healthy": True, "nodes": {"daemonset": {}, "pods": [
        {"name": "ambit-node-a", "node": "worker1", "agent": {"node": "worker1", "pods": [
            {"pod": "demo/client-1", "captured": True, "shouldCapture": True}]}},
        {"name": "ambit-node-b", "node": "worker2", "agent": None,
         "agentError": "no answer"}]}}
    path = tmp_path / "status.json"
    path.write_text(json.dumps(status))
    assert sc.main(["captured", "--ambit-status", str(path), "demo/client-1"]) == 0
    assert "PASS  demo/client-1 is captured (on worker1)" in capsys.readouterr().out
    path.write_text(json.dumps({"installed": False}))
    assert sc.main(["captured", "--ambit-status", str(path), "demo/client-1"]) == 2
    assert "not `ambit status --json` output" in capsys.readouterr().out
