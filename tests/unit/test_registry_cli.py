"""The registry commands through ``ambit.cli.main``: output, exit status 2 and messages."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from ambit.cli import main
from controller.registry.model import Pod
from controller.registry.sqlite import EmbeddedRegistry

POLICY = textwrap.dedent("""\
    apiVersion: security.ambit.dev/v1
    kind: PeerAuthentication
    metadata: {name: default, namespace: shop}
    spec: {mtls: {mode: STRICT}}
    ---
    apiVersion: security.ambit.dev/v1
    kind: AuthorizationPolicy
    metadata: {name: deny, namespace: shop}
    spec:
      action: DENY
      rules:
      - from:
        - source: {ipBlocks: [BLOCK]}
    """)


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "nested" / "dir" / "registry.db"
    monkeypatch.setenv("AMBIT_DB", str(path))
    return path


def ok(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ambit: error: ") or "usage:" in err
    return err


def test_workflow(db: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert "namespace shop enabled (created); 0 workload(s)" in ok(
        ["namespace", "enable", "shop"], capsys)
    assert db.exists()  # parent directories were created
    out = ok(["workload", "add", "--name", "web-1", "--namespace", "shop", "--node", "n1",
              "--ip", "10.0.0.1", "--ip", "fd00::1", "--service-account", "web",
              "--label", "app=web", "--label", "tier=front"], capsys)
    assert out == "Workload shop/web-1 created\n"
    ok(["workload", "add", "--name", "db", "--namespace", "shop", "--node", "n2", "--ip",
        "10.0.0.2", "--label", "ambit.dev/dataplane-mode=none", "--not-ready"], capsys)
    assert "Service shop/web created" in ok(
        ["service", "apply", "--name", "web", "--namespace", "shop", "--vip", "10.96.0.1",
         "--port", "80:8080", "--port", "443", "--selector", "app=web"], capsys)
    f = tmp_path / "p.yaml"
    f.write_text(POLICY.replace("BLOCK", "192.168.0.0/16"))
    assert ok(["policy", "apply", "-f", str(f)], capsys).splitlines() == [
        "PeerAuthentication shop/default created", "AuthorizationPolicy shop/deny created"]
    assert "unchanged" in ok(["policy", "apply", "-f", str(f)], capsys)

    table = ok(["get"], capsys)
    assert f"registry {db}, revision 5" in table
    lines = {line.split()[0]: line for line in table.splitlines() if line.strip()}
    assert lines["shop/web-1"].split()[-1] == "HBONE"
    assert "10.0.0.1,fd00::1" in lines["shop/web-1"]
    assert "TCP (it is labelled ambit.dev/dataplane-mode=none)" in lines["shop/db"]
    assert lines["shop/web"].split()[1:] == ["10.96.0.1", "80:8080,443:443", "app=web",
                                             "1/1", "ready", "-"]
    assert lines["shop/deny"].split()[1] == "DENY" and "STRICT" in lines["shop/default"]

    with EmbeddedRegistry(db) as r:
        web = r.get("Workload", "shop", "web-1")
        assert isinstance(web, Pod) and web.service_account == "web"
        assert dict(web.labels) == {"app": "web", "tier": "front"}

    # -o yaml prints documents that apply back unchanged.
    exported = tmp_path / "all.yaml"
    exported.write_text(ok(["get", "-o", "yaml"], capsys))
    assert set(ok(["apply", "-f", str(exported)], capsys).split()) >= {"unchanged"}
    assert "created" not in ok(["apply", "-f", str(exported)], capsys)

    assert ok(["workload", "remove", "shop/db"], capsys) == "Workload shop/db deleted\n"
    assert "AuthorizationPolicy shop/deny deleted" in ok(["delete", "ap", "shop/deny"], capsys)
    assert "namespace shop disabled" in ok(["namespace", "disable", "shop"], capsys)
    assert "TCP (namespace shop is not enabled" in ok(["get", "workloads"], capsys)


def test_workload_outside_mesh_gets_a_note(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["workload", "add", "--name", "a", "--node", "n1", "--ip", "10.0.0.1"])
    err = capsys.readouterr().err
    assert ("note: Workload default/a is not in the mesh (namespace default is not enabled; "
            "run `ambit namespace enable default`)") in err


def test_node_join_prints_only_the_token(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token = ok(["node", "join", "node-a"], capsys).strip()
    newer = ok(["node", "join", "node-a"], capsys).strip()
    with EmbeddedRegistry(db) as r:
        assert r.node_for_token(token) == "node-a" == r.node_for_token(newer)
    old_id, new_id = token.partition(".")[0], newer.partition(".")[0]
    assert f"node-a  0          {old_id},{new_id}" in ok(["get", "nodes"], capsys)
    # Rotation: revoke the old token alone; the new one keeps working.
    assert ok(["node", "revoke", "node-a", "--token-id", old_id], capsys) == (
        "revoked 1 token(s) of node node-a\n")
    with EmbeddedRegistry(db) as r:
        assert r.node_for_token(token) is None and r.node_for_token(newer) == "node-a"
    assert f"node node-a has no token {old_id}" in fails(
        ["node", "revoke", "node-a", "--token-id", old_id], capsys)
    assert ok(["node", "revoke", "node-a"], capsys) == "revoked 1 token(s) of node node-a\n"
    assert "node node-a has no tokens" in fails(["node", "revoke", "node-a"], capsys)


@pytest.mark.parametrize(("argv", "message"), [
    (["workload", "add", "--name", "a", "--node", "n1", "--ip", "10.0.0.300"],
     "ambit: error: --ip: '10.0.0.300' is not an IP address"),
    (["workload", "add", "--name", "a", "--node", "n1", "--ip", "10.0.0.1", "--label", "x"],
     "ambit: error: --label 'x': expected KEY=VALUE"),
    (["workload", "add", "--name", "a", "--node", "n1", "--ip", "10.0.0.1", "--label",
      "app=a b"], "ambit: error: --label app: 'a b' is not a valid label value"),
    (["workload", "add", "--name", "A", "--node", "n1", "--ip", "10.0.0.1"],
     "ambit: error: --name: 'A' is not a valid DNS name"),
    (["workload", "remove", "default/ghost"],
     "ambit: error: Workload default/ghost is not registered (list objects with `ambit get`)"),
    (["workload", "remove", "a/b/c"], "ambit: error: 'a/b/c': expected NAMESPACE/NAME"),
    (["delete", "pod", "default/x"], "ambit: error: 'pod' is not a kind"),
    (["namespace", "disable", "ghost"], "ambit: error: namespace ghost is not registered"),
    (["service", "apply", "--name", "s"], "ambit: error: `ambit service apply` needs -f FILE, "
     "or --name, --vip and --port"),
    (["service", "apply", "--name", "s", "--vip", "10.96.0.1", "--port", "http"],
     "ambit: error: --port: 'http' is not a port number"),
    (["apply", "-f", "/nonexistent.yaml"], "ambit: error: cannot read /nonexistent.yaml: "
     "No such file or directory"),
    (["get", "pods"], "ambit: error: 'pods' is not something to get"),
    (["node", "join", "Node_1"], "ambit: error: node: 'Node_1' is not a valid DNS name"),
])
def test_errors(db: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                message: str) -> None:
    assert fails(argv, capsys).startswith(message)


def test_bad_policy_file_names_document_and_field(db: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(POLICY.replace("BLOCK", "x"))
    assert fails(["policy", "apply", "-f", str(f)], capsys) == (
        "ambit: error: document 2 (AuthorizationPolicy shop/deny): "
        "spec.rules[0].from[0].source.ipBlocks[0]: 'x' is not an IP address or CIDR block\n")
    # The valid first document was not applied either.
    assert "PeerAuthentication" not in ok(["get"], capsys)


def test_kind_restricted_commands(db: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "ns.yaml"
    f.write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n")
    assert "`ambit policy apply` takes AuthorizationPolicy and PeerAuthentication documents " \
        "only" in fails(["policy", "apply", "-f", str(f)], capsys)
    assert "document 1 is a Namespace; `ambit service apply` takes Service documents only" \
        in fails(["service", "apply", "-f", str(f)], capsys)
    (tmp_path / "empty.yaml").write_text("---\n")
    assert "no documents to apply" in fails(["apply", "-f", str(tmp_path / "empty.yaml")],
                                            capsys)
    (tmp_path / "broken.yaml").write_text("a: [\n")
    assert "broken.yaml: not valid YAML" in fails(
        ["apply", "-f", str(tmp_path / "broken.yaml")], capsys)


def test_db_flag_and_unwritable_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("AMBIT_DB", raising=False)
    explicit = tmp_path / "x.db"
    ok(["namespace", "enable", "a", "--db", str(explicit)], capsys)
    assert explicit.exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = fails(["get", "--db", str(blocker / "sub" / "r.db")], capsys)
    assert f"cannot create {blocker / 'sub'} for the registry" in err
    assert "--db PATH or $AMBIT_DB" in err
