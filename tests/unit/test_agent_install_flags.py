"""The install-related flags of ``ambit agent run``: CNI directories, --binary, --daemonset."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AgentConfig, AgentConfigError


def cfg(**kw: object) -> AgentConfig:
    base: dict[str, object] = {"node": "node-1", "controller_address": "10.0.0.1:15012"}
    base.update(kw)
    return AgentConfig(**base)  # type: ignore[arg-type]


def test_cni_flags_accepted(tmp_path: Path) -> None:
    binary = tmp_path / "ambit-cni"
    binary.write_text("#!/bin/sh\n")
    c = cfg(cni_bin_dir=tmp_path, cni_conf_dir=tmp_path, cni_binary=binary,
            daemonset="ambit-node", daemonset_namespace="ambit-system").validate()
    assert c.manages_cni
    assert not cfg().validate().manages_cni


@pytest.mark.parametrize(("kw", "needle"), [
    ({"cni_bin_dir": "DIR"}, "--cni-bin-dir and --cni-conf-dir go together"),
    ({"cni_binary": "FILE"}, "--binary: needs --cni-bin-dir"),
    ({"cni_bin_dir": "DIR", "cni_conf_dir": "DIR", "cni_binary": "MISSING"},
     "--binary: .* does not exist"),
    ({"cni_bin_dir": "MISSING", "cni_conf_dir": "DIR"}, "--cni-bin-dir: .* not a directory"),
    ({"daemonset": "Ambit_Node", "daemonset_namespace": "ambit-system"},
     "--daemonset: 'Ambit_Node'"),
    ({"daemonset": "ambit-node"}, r"\$POD_NAMESPACE"),
])  # fmt: skip
def test_cni_flags_rejected(tmp_path: Path, kw: dict[str, str], needle: str) -> None:
    (tmp_path / "ambit-cni").write_text("")
    where = {"DIR": tmp_path, "FILE": tmp_path / "ambit-cni", "MISSING": tmp_path / "nope"}
    values = {k: where.get(v, v) for k, v in kw.items()}
    with pytest.raises(AgentConfigError, match=needle):
        cfg(**values).validate()
