"""agent.k8s_owner: when a stopping agent removes Ambit from its node (only on evidence)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.k8s_owner import ApiConfigError, ApiTarget, Observation, decide

UID = "0b8e1c4e-1111-4a5b-9c2d-000000000001"
WHAT = "ambit-system/ambit-node"


@pytest.mark.parametrize(("obs", "known_uid", "remove", "needle"), [
    # Uninstall: foreground deletion marks the DaemonSet, background deletion removes it.
    (Observation(200, UID, "2025-01-01T00:00:00Z"), UID, True, "being deleted"),
    (Observation(200, UID, "2025-01-01T00:00:00Z"), "", True, "being deleted"),
    (Observation(404), UID, True, "gone (404)"),
    # Rolling update, drain, restart: the DaemonSet is there, unchanged.
    (Observation(200, UID), UID, False, "still there"),
    (Observation(200, UID), "", False, "still there"),
    # Deleted and re-created meanwhile: the new DaemonSet's pods take over.
    (Observation(200, "another-uid"), UID, False, "replaced"),
    # Never seen: a wrong --daemonset must not uninstall on every restart.
    (Observation(404), "", False, "never saw it"),
    # Doubt: never remove.
    (Observation(None, error="ClientConnectorError: connection refused"), UID, False,
     "cannot ask the API server"),
    (Observation(403, error='daemonsets.apps "ambit-node" is forbidden'), UID, False,
     "Role ambit-node"),
    (Observation(401), UID, False, "refused"),
    (Observation(500, error="etcdserver: request timed out"), UID, False, "unexpected answer"),
])  # fmt: skip
def test_decide(obs: Observation, known_uid: str, remove: bool, needle: str) -> None:
    d = decide(obs, known_uid, WHAT)
    assert d.remove is remove
    assert needle in d.reason and WHAT in d.reason
    if not remove:
        assert "leaving capture and the CNI chain in place" in d.reason


def test_in_cluster_target(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("tok\n")
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    t = ApiTarget.in_cluster(env, tmp_path)
    assert (t.base_url, t.token_file, t.ca_file) == ("https://10.96.0.1:443",
                                                     tmp_path / "token", None)
    (tmp_path / "ca.crt").write_text("pem")
    t = ApiTarget.in_cluster({**env, "KUBERNETES_SERVICE_HOST": "fd00::1"}, tmp_path)
    assert (t.base_url, t.ca_file) == ("https://[fd00::1]:443", tmp_path / "ca.crt")
    with pytest.raises(ApiConfigError, match="not running in a Kubernetes pod"):
        ApiTarget.in_cluster({}, tmp_path)
    with pytest.raises(ApiConfigError, match="automountServiceAccountToken"):
        ApiTarget.in_cluster(env, tmp_path / "nowhere")
