"""agent.cni.installer on temp directories: install waits for the cluster's config and chains
into it, the watcher repairs what a CNI or an upgrade undoes, uninstall puts things back.

The "binary" is a small shell script that answers CNI VERSION like ambit-cni (the real plugin
is a static C binary built elsewhere); nothing here touches /opt/cni or /etc/cni.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from agent.cni import chain, installer
from agent.cni.chain import CONVERTED_KEY
from agent.cni.installer import ChainWatcher, CniPaths, InstallError
from tests.component.waiting import until

ENTRY = chain.plugin_entry()
VERSIONS = '["0.3.1", "0.4.0", "1.0.0"]'
FAKE_PLUGIN = """#!/bin/sh
# ambit-cni stand-in ({tag}): answers VERSION, nothing else.
[ "$CNI_COMMAND" = VERSION ] || exit 1
echo '{{"cniVersion": "1.0.0", "supportedVersions": {versions}}}'
"""
FLANNEL: dict[str, Any] = {
    "name": "cbr0", "cniVersion": "0.3.1",
    "plugins": [{"type": "flannel", "delegate": {"hairpinMode": True, "isDefaultGateway": True}},
                {"type": "portmap", "capabilities": {"portMappings": True}}],
}  # fmt: skip
BRIDGE: dict[str, Any] = {
    "cniVersion": "1.0.0", "name": "bridge", "type": "bridge", "bridge": "cni0",
    "isGateway": True, "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"},
}  # fmt: skip


eventually = partial(until, limit=5.0)


def fake_plugin(path: Path, tag: str = "v1", versions: str = VERSIONS) -> Path:
    path.write_text(FAKE_PLUGIN.format(tag=tag, versions=versions))
    path.chmod(0o755)
    return path


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[CniPaths, Path]]:
    """Empty host CNI dirs (bin with another plugin in it) and the image's plugin file."""
    paths = CniPaths(tmp_path / "host/opt/cni/bin", tmp_path / "host/etc/cni/net.d")
    paths.bin_dir.mkdir(parents=True)
    paths.conf_dir.mkdir(parents=True)
    (paths.bin_dir / "flannel").write_text("#!/bin/sh\n")
    yield paths, fake_plugin(tmp_path / "image-ambit-cni")
    leftovers = [p.name for d in (paths.bin_dir, paths.conf_dir) for p in d.iterdir()
                 if p.name.endswith(installer.TMP_SUFFIX)]
    assert leftovers == [], "temp files left behind"


def write(path: Path, doc: dict[str, Any], mode: int = 0o644) -> None:
    # Whole and with its final mode, as a CNI writes its config: the installer polls the
    # directory, and a file seen between a write and a chmod would be read with the umask's mode
    # (the mode the installer then, rightly, kept).
    tmp = path.with_name(f".{path.name}.test-tmp")
    tmp.write_text(json.dumps(doc))
    tmp.chmod(mode)
    tmp.replace(path)


def read(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text())
    assert isinstance(doc, dict)
    return doc


def chained(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "plugins": [*doc["plugins"], ENTRY]}


def test_install_waits_for_the_config_then_chains(
        node: tuple[CniPaths, Path], caplog: pytest.LogCaptureFixture) -> None:
    paths, binary = node
    caplog.set_level(logging.INFO, "agent.cni.install")
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(
        installer.install(paths, binary, poll=0.02, log_every=0.1)))
    t.start()
    time.sleep(0.35)
    assert t.is_alive(), "install returned before the cluster's CNI config existed"
    # The binary is in place while waiting, executable by the runtime, same bytes.
    target = paths.bin_dir / "ambit-cni"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert target.read_bytes() == binary.read_bytes()
    write(paths.conf_dir / "10-flannel.conflist", FLANNEL, 0o600)
    t.join(5)
    assert not t.is_alive()
    (done,) = result
    assert done[0] == f"copied {binary} to {target}"
    assert done[1].startswith("chained ambit-cni into 10-flannel.conflist")
    conf = paths.conf_dir / "10-flannel.conflist"
    assert read(conf) == chained(FLANNEL)
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600  # the file keeps its mode
    waits = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert len(waits) >= 2
    assert waits[0] == f"waiting for the cluster's CNI config in {paths.conf_dir}"

    # Idempotent: a second run (an init container restart) rewrites nothing.
    before = conf.stat()
    again = installer.install(paths, binary)
    assert again == [f"{target} is already this version",
                     f"{conf} already chains ambit-cni"]
    assert conf.stat().st_mtime_ns == before.st_mtime_ns and conf.stat().st_ino == before.st_ino


def test_install_gives_up_after_the_timeout(node: tuple[CniPaths, Path]) -> None:
    paths, binary = node
    (paths.conf_dir / "calico-kubeconfig").write_text("not a network config")
    started = time.monotonic()
    with pytest.raises(InstallError, match=r"gave up after 0.3s waiting for the cluster's CNI "
                       rf"config in {paths.conf_dir} \(is the cluster's CNI"):
        installer.install(paths, binary, timeout=0.3, poll=0.05)
    assert time.monotonic() - started < 3


def test_install_waits_out_a_half_written_config(node: tuple[CniPaths, Path],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    paths, binary = node
    caplog.set_level(logging.INFO, "agent.cni.install")
    conf = paths.conf_dir / "10-flannel.conflist"
    conf.write_text('{"name": "cbr0", "plugins": [')
    t = threading.Thread(target=installer.install, args=(paths, binary),
                         kwargs={"poll": 0.02, "log_every": 0.05})
    t.start()
    time.sleep(0.2)
    write(conf, FLANNEL)
    t.join(5)
    assert not t.is_alive() and read(conf) == chained(FLANNEL)
    assert any(f"{conf}: not valid JSON" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("versions", "name", "doc", "needle"), [
    ('["0.4.0", "1.0.0"]', "10-flannel.conflist", FLANNEL,
     "cniVersion '0.3.1' is not one ambit-cni speaks"),
    (VERSIONS, "10-flannel.conf", FLANNEL, "holds a plugin list but is not named .conflist"),
])  # fmt: skip
def test_install_fails_at_once_on_a_config_it_must_not_chain(
        node: tuple[CniPaths, Path], versions: str, name: str, doc: dict[str, Any],
        needle: str) -> None:
    paths, _ = node
    binary = fake_plugin(paths.bin_dir.parent / "old-plugin", versions=versions)
    write(paths.conf_dir / name, doc)
    with pytest.raises(InstallError, match=needle) as info:
        installer.install(paths, binary, timeout=5)
    assert str(info.value).startswith(f"{paths.conf_dir}/{name}: ")
    assert read(paths.conf_dir / name) == doc  # untouched


def test_install_rejects_a_binary_that_is_not_a_plugin(node: tuple[CniPaths, Path]) -> None:
    paths, _ = node
    bogus = paths.bin_dir.parent / "bogus"
    bogus.write_text("#!/bin/sh\necho hello\n")
    bogus.chmod(0o755)
    with pytest.raises(InstallError, match="not a list of supported versions; is --binary the "
                       "ambit-cni plugin"):
        installer.install(paths, bogus, timeout=1)
    with pytest.raises(InstallError, match=r"--binary .*: no such file"):
        installer.install(paths, paths.bin_dir / "missing", timeout=1)
    with pytest.raises(InstallError, match=r"--cni-bin-dir .*: not a directory"):
        installer.install(CniPaths(paths.bin_dir / "nope", paths.conf_dir), bogus)


def test_conf_is_converted_and_restored(node: tuple[CniPaths, Path]) -> None:
    paths, binary = node
    conf = paths.conf_dir / "10-bridge.conf"
    write(conf, BRIDGE, 0o640)
    write(paths.conf_dir / "99-loopback.conf",
          {"cniVersion": "1.0.0", "name": "lo", "type": "loopback"})
    done = installer.install(paths, binary)
    assert "converted 10-bridge.conf into 10-bridge.conflist" in done[1]
    conflist = paths.conf_dir / "10-bridge.conflist"
    assert not conf.exists()
    assert read(conflist) == {"cniVersion": "1.0.0", "name": "bridge",
                              "plugins": [BRIDGE, ENTRY], CONVERTED_KEY: "10-bridge.conf"}
    assert stat.S_IMODE(conflist.stat().st_mode) == 0o640

    removed = installer.uninstall(paths)
    assert removed == [
        "removed ambit-cni from 10-bridge.conflist and restored 10-bridge.conf, the file it "
        f"was converted from (in {paths.conf_dir})",
        f"removed {paths.bin_dir / 'ambit-cni'}",
    ]
    assert read(conf) == BRIDGE and stat.S_IMODE(conf.stat().st_mode) == 0o640
    assert sorted(p.name for p in paths.conf_dir.iterdir()) == ["10-bridge.conf",
                                                                "99-loopback.conf"]
    assert sorted(p.name for p in paths.bin_dir.iterdir()) == ["flannel"]
    assert installer.uninstall(paths) == []  # idempotent


def test_uninstall_cleans_every_file_and_keeps_a_fresh_conf(
        node: tuple[CniPaths, Path]) -> None:
    paths, binary = node
    # Chained into 10-flannel.conflist; later a new primary appeared and was chained too.
    write(paths.conf_dir / "10-flannel.conflist", FLANNEL)
    installer.install(paths, binary)
    write(paths.conf_dir / "05-bridge.conf", BRIDGE)
    installer.install(paths, binary)
    assert installer.chained_files(paths.conf_dir) == ["05-bridge.conflist",
                                                       "10-flannel.conflist"]
    # The bridge CNI rewrote its .conf meanwhile: its fresh file wins over our restore.
    fresh = {**BRIDGE, "bridge": "cni1"}
    write(paths.conf_dir / "05-bridge.conf", fresh)
    (paths.conf_dir / "broken.json").write_text("{")
    done = installer.uninstall(paths)
    assert any(line.startswith(f"skipped {paths.conf_dir}/broken.json: not valid JSON")
               for line in done)
    assert ("removed 05-bridge.conflist (ambit-cni's conversion of 05-bridge.conf); kept the "
            f"newer 05-bridge.conf the cluster's CNI wrote (in {paths.conf_dir})") in done
    assert read(paths.conf_dir / "05-bridge.conf") == fresh
    assert not (paths.conf_dir / "05-bridge.conflist").exists()
    assert read(paths.conf_dir / "10-flannel.conflist") == FLANNEL
    assert installer.chained_files(paths.conf_dir) == []


def test_a_config_rewritten_while_we_edit_it_is_read_again(
        node: tuple[CniPaths, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    paths, _ = node
    conf = paths.conf_dir / "10-flannel.conflist"
    write(conf, FLANNEL)
    newer = {**FLANNEL, "plugins": [*FLANNEL["plugins"], {"type": "bandwidth"}]}
    real_read = installer._read
    calls = []

    def racing_read(conf_dir: Path, name: str) -> Any:
        got = real_read(conf_dir, name)
        calls.append(name)
        if len(calls) == 1:  # flannel writes its new version right after our first read
            time.sleep(0.01)
            write(conf, newer)
        return got

    monkeypatch.setattr(installer, "_read", racing_read)
    state = installer.ensure_chained(paths.conf_dir, ENTRY)
    assert len(calls) == 2 and state.primary == "10-flannel.conflist"
    assert read(conf) == chained(newer)  # flannel's change is kept, ours is added


def test_watcher_repairs_config_and_binary(node: tuple[CniPaths, Path]) -> None:
    paths, binary = node
    conf = paths.conf_dir / "10-flannel.conflist"
    write(conf, FLANNEL)
    w = ChainWatcher(paths, binary)
    assert w.check_once() == [
        f"copied {binary} to {paths.installed_binary} (it was missing or a different version)",
        f"chained ambit-cni into 10-flannel.conflist (in {paths.conf_dir})"]
    assert w.check_once() == []
    assert w.status == f"ambit-cni chained in {conf}"

    write(conf, FLANNEL)  # flannel restarted and wrote its config again
    paths.installed_binary.unlink()  # someone cleaned /opt/cni/bin
    assert w.check_once() == [
        f"copied {binary} to {paths.installed_binary} (it was missing or a different version)",
        f"chained ambit-cni into 10-flannel.conflist (in {paths.conf_dir})"]

    fake_plugin(binary, tag="v2")  # an upgraded image ships a new plugin
    assert w.check_once()[0].startswith(f"copied {binary}")
    assert paths.installed_binary.read_bytes() == binary.read_bytes()
    paths.installed_binary.chmod(0o700)
    assert len(w.check_once()) == 1 and os.access(paths.installed_binary, os.X_OK)
    assert stat.S_IMODE(paths.installed_binary.stat().st_mode) == 0o755

    conf.unlink()
    with pytest.raises(InstallError, match=f"no CNI config in {paths.conf_dir}"):
        w.check_once()


async def test_watcher_task_rechains_and_logs(node: tuple[CniPaths, Path],
                                              caplog: pytest.LogCaptureFixture) -> None:
    paths, binary = node
    caplog.set_level(logging.INFO, "agent.cni.install")
    conf = paths.conf_dir / "10-flannel.conflist"
    w = ChainWatcher(paths, binary, "/run/ambit/cni.sock", interval=0.02)
    task = asyncio.create_task(w.run())

    def rechained() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.getMessage().startswith("CNI: chained ambit-cni into 10-flannel.conflist")]

    try:
        await eventually(lambda: "problem" in w.status)
        await asyncio.sleep(0.1)  # several passes with the same problem: logged once
        write(conf, FLANNEL)
        await eventually(lambda: "chained" in w.status)
        write(conf, FLANNEL)  # rewritten by the CNI: chained again within a pass or two
        await eventually(lambda: len(rechained()) == 2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert read(conf)["plugins"][-1]["agentSocket"] == "/run/ambit/cni.sock"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("no CNI config in" in m for m in messages) == 1
    assert any(m.startswith("CNI: fixed; ambit-cni chained in") for m in messages)


def _ambit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ambit.cli", "agent", "cni", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_cli(node: tuple[CniPaths, Path]) -> None:
    paths, binary = node
    dirs = ["--cni-bin-dir", str(paths.bin_dir), "--cni-conf-dir", str(paths.conf_dir)]
    r = _ambit("install", *dirs, "--binary", str(binary), "--timeout", "0.5")
    assert r.returncode == 1
    assert "error: gave up after 0.5s waiting for the cluster's CNI config" in r.stderr
    assert "waiting for the cluster's CNI config in" in r.stderr  # the progress log line

    write(paths.conf_dir / "10-flannel.conflist", FLANNEL)
    r = _ambit("install", *dirs, "--binary", str(binary), "--agent-socket", "/run/a.sock")
    assert r.returncode == 0, r.stderr
    assert "chained ambit-cni into 10-flannel.conflist" in r.stdout
    assert read(paths.conf_dir / "10-flannel.conflist")["plugins"][-1] == chain.plugin_entry(
        "/run/a.sock")

    r = _ambit("uninstall", *dirs)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"removed ambit-cni from 10-flannel.conflist (in {paths.conf_dir})",
        f"removed {paths.installed_binary}"]
    assert read(paths.conf_dir / "10-flannel.conflist") == FLANNEL
    r = _ambit("uninstall", *dirs)
    assert r.returncode == 0 and r.stdout.startswith("nothing to remove")


async def test_stopping_the_watcher_waits_for_a_pass_in_progress(
        node: tuple[CniPaths, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent removes the chain right after stopping the watcher: a pass still writing in
    a thread must be over by then."""
    paths, binary = node
    w = ChainWatcher(paths, binary, interval=0.01)
    started, finished = threading.Event(), threading.Event()

    def slow_pass() -> list[str]:
        started.set()
        time.sleep(0.3)
        finished.set()
        return []

    monkeypatch.setattr(w, "check_once", slow_pass)
    task = asyncio.create_task(w.run())
    await eventually(started.is_set)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished.is_set()
