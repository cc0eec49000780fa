"""Process configuration and the ``ambit`` command line: bad input exits 2 with a message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ambit.cli import main
from ztunnel.config import ConfigError, ZtunnelConfig


def test_defaults_are_istio_ports() -> None:
    c = ZtunnelConfig(node="n1").validate()
    assert (c.outbound_port, c.inbound_plaintext_port, c.inbound_port) == (15001, 15006, 15008)
    assert (c.admin_port, c.metrics_port, c.readiness_port, c.socks5_port) == (
        15000, 15020, 15021, 0)


@pytest.mark.parametrize(("settings", "message"), [
    ({"node": "n", "inbound_port": 70000}, "inbound_port"),
    ({"node": "n", "bind_host": "localhost"}, "bind_host"),
    ({"node": "n", "inbound_bind": "sometimes"}, "inbound_bind"),
    ({"node": "n", "colour": "blue"}, "unknown setting"),
    ({}, "node: must be set"),
    ({"node": "n", "state_file": "/nonexistent/state.yaml"}, "state_file"),
])
def test_bad_settings(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ZtunnelConfig.from_mapping(settings)


def test_config_file(tmp_path: Path) -> None:
    f = tmp_path / "zt.yaml"
    f.write_text("node: n1\nsocks5_port: 15080\n")
    c = ZtunnelConfig.from_file(f, socks5_port=None, admin_port=16000)
    assert c.socks5_port == 15080 and c.admin_port == 16000


def test_cli_bad_config_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        main(["ztunnel", "--node", "n1", "--state", str(tmp_path / "missing.yaml")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "ambit: error: state_file:" in err and "does not exist" in err


def test_cli_bad_argument_exits_2() -> None:
    r = subprocess.run([sys.executable, "-m", "ambit.cli", "ztunnel", "--inbound-port", "x"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2
    assert "invalid int value" in r.stderr


def test_cli_help_for_each_command() -> None:
    for argv in (["--help"], ["ztunnel", "--help"], ["dev", "certs", "--help"]):
        r = subprocess.run([sys.executable, "-m", "ambit.cli", *argv], capture_output=True,
                           text=True, check=False)
        assert r.returncode == 0 and "usage: ambit" in r.stdout


def test_dev_certs_bad_identity(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        main(["dev", "certs", "--out", str(tmp_path), "--identity", "justone"])
    assert e.value.code == 2
    assert "NAMESPACE/SERVICEACCOUNT" in capsys.readouterr().err
