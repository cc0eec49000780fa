"""``ambit waypoint run``: flags and validation, the Envoy bootstrap (checked by the real
``envoy --mode validate``), the Envoy command line and log parsing, the metrics merge."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ambit.cli import build_parser
from waypoint.bootstrap import build_bootstrap, write_bootstrap
from waypoint.cli import config_from_args
from waypoint.config import (
    CONTROLLER_NAMESPACE,
    CONTROLLER_SERVICE_ACCOUNT,
    WaypointConfig,
    WaypointConfigError,
    default_envoy_binary,
    split_host_port,
)
from waypoint.envoy_proc import describe_exit, envoy_command, parse_log_line
from waypoint.runner import merge_envoy_stats


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    token, root = tmp_path / "token", tmp_path / "root.pem"
    token.write_text("t\n")
    root.write_text("-----BEGIN CERTIFICATE-----\n")
    return {"token": token, "root": root, "run": tmp_path / "run"}


def make(files: dict[str, Path], **changes: Any) -> WaypointConfig:
    settings: dict[str, Any] = dict(
        namespace="shop", gateway="wp", pod_name="wp-5c9-x2", pod_ip="10.244.1.7",
        controller_address="10.96.0.12:15012", token_file=files["token"],
        ca_root_cert=files["root"], run_dir=files["run"])
    settings.update(changes)
    return WaypointConfig(**settings)


# -- flags and validation -----------------------------------------------------------------


def test_cli_flags_and_defaults(files: dict[str, Path]) -> None:
    args = build_parser().parse_args([
        "waypoint", "run", "--namespace", "shop", "--gateway", "wp", "--pod-name", "wp-1",
        "--pod-ip", "10.0.0.9", "--controller", "ambit-controller.ambit-system.svc:15012",
        "--token-file", str(files["token"]), "--ca-root-cert", str(files["root"]),
        "--run-dir", str(files["run"])])
    assert args.command == "waypoint" and args.waypoint_command == "run"
    c = config_from_args(args)
    assert (c.trust_domain, c.sa, c.ca_target) == (
        "cluster.local", "wp", "ambit-controller.ambit-system.svc:15012")
    assert (c.concurrency, c.admin_port, c.metrics_port, c.readiness_port, c.drain_seconds) \
        == (2, 15000, 15020, 15021, 5.0)
    assert c.envoy_path == default_envoy_binary() and Path(c.envoy_path).is_file()
    assert str(c.identity) == "spiffe://cluster.local/ns/shop/sa/wp"
    assert (c.node_id, c.node_cluster) == ("shop/wp/wp-1", "shop/wp")
    assert c.agent_socket == files["run"] / "agent.sock"
    assert c.ca_uses_tls and not c.insecure_xds


def test_cli_overrides(files: dict[str, Path]) -> None:
    args = build_parser().parse_args([
        "waypoint", "run", "--namespace", "shop", "--gateway", "wp", "--pod-name", "wp-1",
        "--pod-ip", "fd00::5", "--controller", "127.0.0.1:15012", "--token-file",
        str(files["token"]), "--insecure-xds", "--service-account", "wp-sa",
        "--trust-domain", "example.org", "--run-dir", str(files["run"]), "--concurrency", "4",
        "--drain-seconds", "0.5", "--admin-port", "16000", "--metrics-port", "0",
        "--log-level", "debug"])
    c = config_from_args(args)
    assert str(c.identity) == "spiffe://example.org/ns/shop/sa/wp-sa"
    assert not c.ca_uses_tls and c.ca_root_cert is None
    assert (c.concurrency, c.drain_seconds, c.admin_port, c.metrics_port) == (4, 0.5, 16000, 0)


def test_the_main_entry_reports_config_errors_with_status_2(
        files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from ambit.cli import main

    code = main(["waypoint", "run", "--namespace", "shop", "--gateway", "wp", "--pod-name",
                 "p", "--pod-ip", "nope", "--controller", "1.2.3.4:15012", "--token-file",
                 str(files["token"]), "--ca-root-cert", str(files["root"])])
    assert code == 2
    assert "--pod-ip: 'nope' is not an IP address" in capsys.readouterr().err


@pytest.mark.parametrize(("changes", "message"), [
    ({"namespace": ""}, "--namespace: required"),
    ({"gateway": "Bad_Name"}, "--gateway: 'Bad_Name' is not a Kubernetes name"),
    ({"pod_ip": "10.0.0"}, "--pod-ip"),
    ({"controller_address": "controller"}, "--controller: 'controller' is not HOST:PORT"),
    ({"controller_address": "c:99999"}, "is not a port"),
    ({"ca_address": "ca_x:1"}, "--ca-address: 'ca_x' is neither"),
    ({"token_file": None}, "--token-file: required"),
    ({"token_file": Path("/nonexistent/token")}, "--token-file: /nonexistent/token does not"),
    ({"ca_root_cert": None}, "--ca-root-cert: required"),
    ({"ca_root_cert": None, "insecure_xds": True, "ca_address": "10.0.0.1:15012"},
     "--ca-root-cert: required"),
    ({"run_dir": Path("/" + "d" * 120)}, "too long for a unix socket"),
    ({"concurrency": 0}, "--concurrency"),
    ({"metrics_port": 15000}, "--metrics-port: 15000 is Envoy's admin port too"),
    ({"admin_port": 0}, "--admin-port"),
    ({"drain_seconds": -1.0}, "--drain-seconds"),
    ({"envoy_binary": "/nonexistent/envoy"}, "--envoy-binary: /nonexistent/envoy does not"),
])
def test_validation_names_the_flag(files: dict[str, Path], changes: dict[str, Any],
                                   message: str) -> None:
    with pytest.raises(WaypointConfigError, match=message.replace("(", r"\(")):
        make(files, **changes).validate()


def test_insecure_controller_needs_no_root(files: dict[str, Path]) -> None:
    c = make(files, ca_root_cert=None, insecure_xds=True).validate()
    assert not c.ca_uses_tls


def test_split_host_port() -> None:
    assert split_host_port("10.0.0.1:15012") == ("10.0.0.1", 15012)
    assert split_host_port("[fd00::1]:15012") == ("fd00::1", 15012)
    assert split_host_port("ctl.ns.svc:1") == ("ctl.ns.svc", 1)
    for bad in ("fd00::1:15012", "host", ":15012", "[fd00::1]15012", "h:0"):
        with pytest.raises(ValueError):
            split_host_port(bad)


def test_controller_identity_matches_the_controller() -> None:
    from controller.app import CONTROLLER_IDENTITY

    assert (CONTROLLER_NAMESPACE, CONTROLLER_SERVICE_ACCOUNT) == CONTROLLER_IDENTITY


# -- bootstrap ----------------------------------------------------------------------------


def clusters(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in doc["static_resources"]["clusters"]}


def test_bootstrap_node_admin_ads_and_extensions(files: dict[str, Path]) -> None:
    doc = build_bootstrap(make(files, admin_port=15555))
    assert doc["node"] == {
        "id": "shop/wp/wp-5c9-x2", "cluster": "shop/wp",
        "metadata": {"NAMESPACE": "shop", "GATEWAY": "wp", "POD": "wp-5c9-x2",
                     "POD_IP": "10.244.1.7", "TRUST_DOMAIN": "cluster.local"}}
    assert doc["admin"]["address"]["socket_address"] == {"address": "127.0.0.1",
                                                         "port_value": 15555}
    dyn = doc["dynamic_resources"]
    assert dyn["ads_config"] == {
        "api_type": "GRPC", "transport_api_version": "V3",
        "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
        "set_node_on_first_message_only": True}
    assert dyn["cds_config"] == dyn["lds_config"] == {"ads": {}, "resource_api_version": "V3"}
    assert [e["name"] for e in doc["bootstrap_extensions"]] == [
        "envoy.bootstrap.internal_listener"]
    assert set(clusters(doc)) == {"xds-grpc", "waypoint-agent"}


def test_bootstrap_xds_cluster_tls_via_sds_with_controller_san(files: dict[str, Path]) -> None:
    xds = clusters(build_bootstrap(make(files)))["xds-grpc"]
    assert xds["type"] == "STATIC"
    endpoint = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "10.96.0.12",
                                                      "port_value": 15012}
    http = xds["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in http["explicit_http_config"]
    tls = xds["transport_socket"]["typed_config"]
    assert tls["@type"].endswith("UpstreamTlsContext") and "sni" not in tls
    common = tls["common_tls_context"]
    [cert] = common["tls_certificate_sds_secret_configs"]
    assert cert["name"] == "default"
    sds = cert["sds_config"]["api_config_source"]
    assert sds["grpc_services"] == [{"envoy_grpc": {"cluster_name": "waypoint-agent"}}]
    validation = common["combined_validation_context"]
    assert validation["validation_context_sds_secret_config"]["name"] == "ROOTCA"
    assert validation["default_validation_context"]["match_typed_subject_alt_names"] == [{
        "san_type": "URI",
        "matcher": {"exact": "spiffe://cluster.local/ns/ambit-system/sa/ambit-controller"}}]


def test_bootstrap_dns_controller_and_insecure(files: dict[str, Path]) -> None:
    dns = clusters(build_bootstrap(make(
        files, controller_address="ambit-controller.ambit-system.svc:15012",
        trust_domain="example.org")))["xds-grpc"]
    assert dns["type"] == "STRICT_DNS"
    assert dns["transport_socket"]["typed_config"]["sni"] == "ambit-controller.ambit-system.svc"
    san = dns["transport_socket"]["typed_config"]["common_tls_context"][
        "combined_validation_context"]["default_validation_context"][
        "match_typed_subject_alt_names"][0]["matcher"]["exact"]
    assert san == "spiffe://example.org/ns/ambit-system/sa/ambit-controller"
    plain = clusters(build_bootstrap(make(files, insecure_xds=True)))["xds-grpc"]
    assert "transport_socket" not in plain


def test_bootstrap_agent_cluster_is_the_unix_socket(files: dict[str, Path]) -> None:
    agent = clusters(build_bootstrap(make(files)))["waypoint-agent"]
    endpoint = agent["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"] == {"pipe": {"path": str(files["run"] / "agent.sock")}}
    assert "http2_protocol_options" in agent["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]


@pytest.mark.parametrize("changes", [
    {},
    {"controller_address": "ambit-controller.ambit-system.svc:15012"},
    {"controller_address": "[fd00::12]:15012"},
    {"insecure_xds": True},
])
def test_envoy_accepts_the_bootstrap(files: dict[str, Path], changes: dict[str, Any]) -> None:
    config = make(files, **changes)
    path = write_bootstrap(config)
    assert json.loads(path.read_text()) == build_bootstrap(config)
    result = subprocess.run([config.envoy_path, "--mode", "validate", "-c", str(path),
                             "--disable-hot-restart", "--log-level", "warn"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_envoy_rejects_a_broken_bootstrap(files: dict[str, Path]) -> None:
    """The validate test above would catch mistakes: Envoy does reject unknown fields."""
    config = make(files)
    doc = build_bootstrap(config)
    doc["static_resources"]["clusters"][0]["no_such_field"] = 1
    path = files["run"] / "bad.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    result = subprocess.run([config.envoy_path, "--mode", "validate", "-c", str(path),
                             "--disable-hot-restart"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert "no_such_field" in result.stdout + result.stderr


# -- Envoy process helpers ----------------------------------------------------------------


def test_envoy_command_line(files: dict[str, Path]) -> None:
    cmd = envoy_command("/bin/envoy", Path("/run/envoy.json"), 3, "warn", 4.5)
    assert cmd[:3] == ["/bin/envoy", "-c", "/run/envoy.json"]
    joined = " ".join(cmd)
    for part in ("--concurrency 3", "--log-level warn", "--drain-time-s 5",
                 "--disable-hot-restart"):
        assert part in joined


def test_envoy_log_lines_map_to_levels() -> None:
    assert parse_log_line("[warning][config] stream closed") == (logging.WARNING,
                                                                 "[config] stream closed")
    assert parse_log_line("[error][main] boom") == (logging.ERROR, "[main] boom")
    assert parse_log_line("[debug][upstream] x")[0] == logging.DEBUG
    assert parse_log_line("[critical][assert] y")[0] == logging.CRITICAL
    assert parse_log_line("Caught Segmentation fault") == (logging.WARNING,
                                                           "Caught Segmentation fault")


def test_describe_exit() -> None:
    assert describe_exit(1) == "exit status 1"
    assert describe_exit(-9) == "killed by SIGKILL"


def test_metrics_merge_appends_envoy_stats() -> None:
    own = "# TYPE istio_requests_total counter\nistio_requests_total 1.0"
    merged = merge_envoy_stats(own, "# TYPE envoy_server_live gauge\nenvoy_server_live 1\n")
    assert merged.splitlines() == [
        "# TYPE istio_requests_total counter", "istio_requests_total 1.0",
        "# HELP ambit_waypoint_envoy_stats_up 1 if Envoy's /stats/prometheus answered this "
        "scrape", "# TYPE ambit_waypoint_envoy_stats_up gauge", "ambit_waypoint_envoy_stats_up 1",
        "# TYPE envoy_server_live gauge", "envoy_server_live 1"]
    assert merge_envoy_stats(own, None).endswith("ambit_waypoint_envoy_stats_up 0\n")
