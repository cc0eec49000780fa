"""Where a ztunnel's certificates come from: the identity directory or the controller's CA."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.ca import CertificateAuthority
from ztunnel.app import make_secrets
from ztunnel.ca_client import CaSecretManager
from ztunnel.config import ConfigError, ZtunnelConfig
from ztunnel.identity import SecretManager
from ztunnel.metrics import Metrics


@pytest.fixture
def token(tmp_path: Path) -> Path:
    path = tmp_path / "node.token"
    path.write_text("secret\n")
    return path


def test_ca_settings_from_a_mapping(token: Path) -> None:
    c = ZtunnelConfig.from_mapping({"node": "n1", "ca_address": "ctl:15012",
                                    "node_token_file": str(token)})
    assert c.node_token_file == token and c.identity_dir is None
    assert isinstance(make_secrets(c, Metrics()), CaSecretManager)


def test_state_from_the_controller_with_certificates_from_a_directory(tmp_path: Path,
                                                                       token: Path) -> None:
    """The node token is for the state push too, not only for the CA."""
    c = ZtunnelConfig(node="n1", controller_address="ctl:15012", node_token_file=token,
                      identity_dir=tmp_path).validate()
    assert isinstance(make_secrets(c, Metrics()), SecretManager)


def test_identity_dir_selects_the_file_source(tmp_path: Path) -> None:
    c = ZtunnelConfig(node="n1", identity_dir=tmp_path).validate()
    assert isinstance(make_secrets(c, Metrics()), SecretManager)


def test_ca_root_cert_makes_the_channel_tls(tmp_path: Path, token: Path) -> None:
    root = tmp_path / "root.pem"
    root.write_bytes(CertificateAuthority.generate("cluster.local").root_pem)
    c = ZtunnelConfig(node="n1", ca_address="ctl:15012", node_token_file=token,
                      ca_root_cert=root).validate()
    secrets = make_secrets(c, Metrics())
    assert isinstance(secrets, CaSecretManager) and secrets.credentials is not None


@pytest.mark.parametrize(("settings", "message"), [
    ({"ca_address": "ctl:15012"}, "ca_address and node_token_file go together"),
    ({"node_token_file": "TOKEN"}, "ca_address and node_token_file go together"),
    ({"ca_address": "ctl:15012", "node_token_file": "TOKEN", "identity_dir": "DIR"},
     "identity_dir and ca_address are mutually exclusive"),
    ({"ca_address": "ctl:15012", "node_token_file": "/nonexistent/token"},
     "node_token_file: /nonexistent/token does not exist; create it with `ambit node join`"),
    ({"ca_root_cert": "ROOT"}, "ca_root_cert: only meaningful with ca_address"),
    # The controller streams the state only to a node that proves itself.
    ({"controller_address": "ctl:15012", "identity_dir": "DIR"},
     "controller_address needs node_token_file"),
    ({"controller_address": "ctl:15012", "ca_address": "ctl:15012"},
     "controller_address needs node_token_file"),
    ({"ca_address": "ctl:15012", "node_token_file": "TOKEN", "ca_root_cert": "/nonexistent"},
     "ca_root_cert: /nonexistent does not exist"),
])
def test_bad_ca_settings(tmp_path: Path, token: Path, settings: dict[str, str],
                         message: str) -> None:
    subst = {"TOKEN": str(token), "DIR": str(tmp_path), "ROOT": str(token)}
    with pytest.raises(ConfigError, match=message):
        ZtunnelConfig.from_mapping({"node": "n1",
                                    **{k: subst.get(v, v) for k, v in settings.items()}})
