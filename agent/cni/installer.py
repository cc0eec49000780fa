"""Putting ``ambit-cni`` on a node and keeping it there: the binary, the chain entry, removal.

Why it exists: in Kubernetes the node agent runs in a pod, but the CNI plugin must be where the
*host's* container runtime looks (``/opt/cni/bin``) and must be listed in the *host's* network
config (``/etc/cni/net.d``), both mounted into the pod. Three moments need it:

* the DaemonSet's init container (``ambit agent cni install``) copies the binary, waits for
  the cluster's own CNI to write its config (a new node may get it after Ambit's pod), and
  chains our entry into it, then exits so the agent starts;
* the running agent (``ChainWatcher``) keeps that true: CNIs such as flannel or Calico rewrite
  their config when they restart, which silently drops our entry (new pods would then start
  uncaptured), and an upgraded image ships a new binary;
* removal (``ambit agent cni uninstall``, ``ambit agent uninstall`` and the agent itself when
  its DaemonSet is deleted) takes our entry out of whichever config holds it, restores a
  ``.conf`` we converted, and removes the binary.

Every write is atomic (a temp file in the same directory, then ``rename``), so the runtime
never reads half a config or executes half a binary; the temp names end in ``.ambit-tmp``,
which libcni ignores. A config is rewritten only if it did not change while we edited it
(otherwise we try again), keeping the mode and owner the cluster's CNI gave it. The decisions
about the documents themselves are pure, in ``agent.cni.chain``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.cni import chain
from agent.cni.chain import ChainError, Edit
from agent.cni.spec import DEFAULT_AGENT_SOCKET, PLUGIN_TYPE

log = logging.getLogger("agent.cni.install")

BINARY_NAME = PLUGIN_TYPE
TMP_SUFFIX = ".ambit-tmp"
BINARY_MODE = 0o755
WAIT_LOG_EVERY = 10.0
WATCH_INTERVAL = 5.0
VERSION_TIMEOUT = 10.0


class InstallError(RuntimeError):
    """Installing or removing the CNI plugin failed; the message says what and how to fix it."""


@dataclass(frozen=True)
class CniPaths:
    """The host's CNI directories as mounted into the agent's pod (``--cni-*-dir``)."""

    bin_dir: Path
    conf_dir: Path

    @property
    def installed_binary(self) -> Path:
        return self.bin_dir / BINARY_NAME


# --- the binary ----------------------------------------------------------------------------


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_source(binary: Path) -> None:
    if not binary.is_file():
        raise InstallError(f"--binary {binary}: no such file; the Ambit image ships the plugin "
                           "at /opt/ambit/cni/ambit-cni")
    if not os.access(binary, os.X_OK):
        raise InstallError(f"--binary {binary}: not executable (chmod 0755 it)")


def binary_is_current(binary: Path, bin_dir: Path) -> bool:
    """The installed copy exists, is executable by everyone, and has the same bytes."""
    target = bin_dir / BINARY_NAME
    try:
        st = target.stat()
    except FileNotFoundError:
        return False
    if st.st_mode & 0o777 != BINARY_MODE or st.st_size != binary.stat().st_size:
        return False
    return _digest(target) == _digest(binary)


def install_binary(binary: Path, bin_dir: Path) -> bool:
    """Copy ``binary`` to ``bin_dir/ambit-cni`` (mode 0755) unless it is there already;
    True if it was copied. Atomic: a pod sandbox being set up runs either the old or the new
    file, never a partial one, and running plugins keep their (old) inode."""
    _check_source(binary)
    if not bin_dir.is_dir():
        raise InstallError(f"--cni-bin-dir {bin_dir}: not a directory; mount the host's CNI "
                           "plugin directory (usually /opt/cni/bin) there")
    if binary_is_current(binary, bin_dir):
        return False
    target = bin_dir / BINARY_NAME
    tmp = bin_dir / f".{BINARY_NAME}{TMP_SUFFIX}"
    try:
        with binary.open("rb") as src, _create(tmp, BINARY_MODE) as dst:
            while block := src.read(1 << 20):
                dst.write(block)
            dst.flush()
            os.fsync(dst.fileno())
        os.chmod(tmp, BINARY_MODE)  # the umask must not narrow it
        os.replace(tmp, target)
        _fsync_dir(bin_dir)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InstallError(f"copying {binary} to {target}: {e.strerror or e}; the host's CNI "
                           "bin directory must be mounted read-write") from None
    return True


def remove_binary(bin_dir: Path) -> str | None:
    """Remove ``bin_dir/ambit-cni``; what was done, or ``None`` if it was not there."""
    target = bin_dir / BINARY_NAME
    (bin_dir / f".{BINARY_NAME}{TMP_SUFFIX}").unlink(missing_ok=True)
    try:
        target.unlink()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise InstallError(f"removing {target}: {e.strerror or e}") from None
    return f"removed {target}"


def supported_versions(binary: Path, timeout: float = VERSION_TIMEOUT) -> tuple[str, ...]:
    """The CNI versions ``binary`` speaks, from its own ``VERSION`` answer (what libcni asks).

    Also proves the file is a working plugin for this machine before we chain it in.
    """
    env = {"CNI_COMMAND": "VERSION", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    fix = "is --binary the ambit-cni plugin, built for this machine?"
    try:
        res = subprocess.run([str(binary)], input=b'{"cniVersion": "1.0.0"}', env=env,
                             capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise InstallError(f"{binary} did not answer CNI VERSION within {timeout:g}s; {fix}") \
            from None
    except OSError as e:
        raise InstallError(f"cannot run {binary}: {e.strerror or e}; {fix}") from None
    try:
        doc = json.loads(res.stdout)
        versions = doc["supportedVersions"]
        if res.returncode != 0 or not isinstance(versions, list) or not all(
                isinstance(v, str) for v in versions) or not versions:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        out = res.stdout.decode(errors="replace").strip()[:200]
        err = res.stderr.decode(errors="replace").strip()[:200]
        raise InstallError(f"{binary} answered CNI VERSION with exit {res.returncode} and "
                           f"{out!r} (stderr {err!r}), not a list of supported versions; "
                           f"{fix}") from None
    return tuple(versions)


# --- config files ----------------------------------------------------------------------------


def _create(path: Path, mode: int) -> Any:
    path.unlink(missing_ok=True)  # a temp file left by a crash
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    return os.fdopen(fd, "wb")


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def config_listing(conf_dir: Path) -> list[str]:
    """Regular files in ``conf_dir`` (none if it does not exist yet)."""
    try:
        entries = list(os.scandir(conf_dir))
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise InstallError(f"--cni-conf-dir {conf_dir}: not a directory") from None
    return [e.name for e in entries if e.is_file()]


@dataclass(frozen=True)
class _Read:
    name: str
    doc: dict[str, Any]
    stat: os.stat_result


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_ino, a.st_size, a.st_mtime_ns) == (b.st_ino, b.st_size, b.st_mtime_ns)


class _Gone(ChainError):
    """The file was removed between listing the directory and reading it."""


def _read(conf_dir: Path, name: str) -> _Read:
    path = conf_dir / name
    try:
        with path.open("rb") as f:  # the stat of what we read, for _write_config's check
            st = os.fstat(f.fileno())
            text = f.read().decode()
    except FileNotFoundError:
        raise _Gone(f"{name}: disappeared while being read", transient=True) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ChainError(f"{name}: cannot read it ({e})") from None
    return _Read(name, chain.parse_config(name, text), st)


class _Changed(Exception):
    """The file changed between our read and our write; read it again."""


def _write_config(conf_dir: Path, name: str, doc: dict[str, Any], original: _Read) -> None:
    """Write ``doc`` to ``conf_dir/name`` atomically with the mode and owner of the file we
    read (``original``: the same file, or the one a list is converted from or restored from),
    unless that file changed since we read it (``_Changed``: read it again)."""
    path = conf_dir / name
    mode = original.stat.st_mode & 0o7777
    tmp = conf_dir / f".{name}{TMP_SUFFIX}"
    try:
        with _create(tmp, mode) as f:
            f.write(chain.render(doc).encode())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask must not narrow it
        with contextlib.suppress(OSError):
            os.chown(tmp, original.stat.st_uid, original.stat.st_gid)
        try:
            now: os.stat_result | None = (conf_dir / original.name).stat()
        except FileNotFoundError:
            now = None
        if now is None or not _same_file(now, original.stat):
            tmp.unlink(missing_ok=True)
            raise _Changed(original.name)
        os.replace(tmp, path)
        _fsync_dir(conf_dir)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InstallError(f"writing {path}: {e.strerror or e}; the host's CNI config "
                           "directory must be mounted read-write") from None


def _apply(conf_dir: Path, edit: Edit, original: _Read) -> str:
    """Carry out ``edit`` of the file ``original`` (read from ``conf_dir``); what was done."""
    note = edit.note
    if edit.write is not None and edit.doc is not None:
        restoring = edit.write != original.name and not chain.is_list(edit.write)
        if restoring and (conf_dir / edit.write).exists():
            # The cluster's CNI wrote a fresh X.conf after we converted the old one into our
            # X.conflist: theirs wins, only our list goes.
            note = (f"removed {original.name} (ambit-cni's conversion of {edit.write}); kept "
                    f"the newer {edit.write} the cluster's CNI wrote")
        else:
            _write_config(conf_dir, edit.write, edit.doc, original)
    if edit.remove is not None and edit.remove != edit.write:
        try:
            (conf_dir / edit.remove).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise InstallError(f"removing {conf_dir / edit.remove}: {e.strerror or e}") \
                from None
        _fsync_dir(conf_dir)
    return note


@dataclass(frozen=True)
class ChainState:
    """Where the runtime's config stands: ``primary`` is ``None`` when there is none yet;
    ``note`` says what was changed ("" when it was already right)."""

    primary: str | None
    note: str = ""


def ensure_chained(conf_dir: Path, entry: dict[str, Any],
                   versions: Sequence[str] | None = None, attempts: int = 5) -> ChainState:
    """Make the primary config in ``conf_dir`` chain ``entry``; idempotent.

    Raises ``ChainError`` (the message starts with the file name) for a config we cannot
    chain into, and ``InstallError`` for a directory we cannot write.
    """
    for _ in range(attempts):
        primary = chain.primary_config(config_listing(conf_dir))
        if primary is None:
            return ChainState(None)
        try:
            current = _read(conf_dir, primary)
        except _Gone:
            continue
        edit = chain.chain(primary, current.doc, entry, versions)
        if not edit.changed:
            return ChainState(primary)
        try:
            note = _apply(conf_dir, edit, current)
        except _Changed:
            continue  # the cluster's CNI wrote it meanwhile: start over with its version
        return ChainState(edit.write or primary, note)
    raise ChainError(f"{primary}: keeps changing while ambit-cni is chained into it; is "
                     "another installer rewriting it?", transient=True)


def remove_chain(conf_dir: Path) -> list[str]:
    """Remove our entry from every config file in ``conf_dir`` (restoring a ``.conf`` we
    converted); what was done, one line each. Unreadable files are reported and left."""
    done: list[str] = []
    for name in chain.config_files(config_listing(conf_dir)):
        for _ in range(5):
            try:
                current = _read(conf_dir, name)
            except _Gone:
                break
            except ChainError as e:
                done.append(f"skipped {conf_dir}/{e}")
                break
            edit = chain.unchain(name, current.doc)
            if not edit.changed:
                break
            try:
                note = _apply(conf_dir, edit, current)
            except _Changed:
                continue
            done.append(f"{note} (in {conf_dir})")
            break
        else:
            done.append(f"skipped {conf_dir / name}: it kept changing while ambit-cni was "
                        "being removed from it; run the uninstall again")
    return done


def chained_files(conf_dir: Path) -> list[str]:
    """Config files in ``conf_dir`` that mention ambit-cni (for status and tests)."""
    out = []
    for name in chain.config_files(config_listing(conf_dir)):
        try:
            doc = _read(conf_dir, name).doc
        except ChainError:
            continue
        if any(isinstance(p, dict) and p.get("type") == PLUGIN_TYPE
               for p in doc.get("plugins") or []):
            out.append(name)
    return out


# --- the three moments -------------------------------------------------------------------------


def _explain(conf_dir: Path, e: ChainError) -> str:
    return f"{conf_dir}/{e}"  # ChainError messages start with the file's name


def install(paths: CniPaths, binary: Path, *, agent_socket: str = DEFAULT_AGENT_SOCKET,
            timeout: float | None = None, poll: float = 1.0,
            log_every: float = WAIT_LOG_EVERY,
            sleep: Callable[[float], None] = time.sleep) -> list[str]:
    """``ambit agent cni install``: copy the binary, wait for the cluster's CNI config,
    chain our entry into it. Returns what was done; raises ``InstallError`` (with the reason)
    on failure or after ``timeout`` seconds of waiting (``None``: wait for ever)."""
    done = []
    if install_binary(binary, paths.bin_dir):
        done.append(f"copied {binary} to {paths.installed_binary}")
    else:
        done.append(f"{paths.installed_binary} is already this version")
    versions = supported_versions(binary)
    entry = chain.plugin_entry(agent_socket)
    started = time.monotonic()
    last_log: float | None = None
    waiting = f"waiting for the cluster's CNI config in {paths.conf_dir}"
    while True:
        try:
            state = ensure_chained(paths.conf_dir, entry, versions)
        except ChainError as e:
            if not e.transient:
                raise InstallError(_explain(paths.conf_dir, e)) from None
            reason = f"{waiting}: {_explain(paths.conf_dir, e)}"
        else:
            if state.primary is not None:
                done.append(state.note + f" (in {paths.conf_dir})" if state.note else
                            f"{paths.conf_dir / state.primary} already chains ambit-cni")
                return done
            reason = waiting
        now = time.monotonic()
        if timeout is not None and now - started >= timeout:
            raise InstallError(f"gave up after {timeout:g}s {reason} (is the cluster's CNI, "
                               "e.g. flannel or Calico, installed and running on this node?)")
        if last_log is None or now - last_log >= log_every:
            log.info("%s", reason)
            last_log = now
        sleep(poll)


def uninstall(paths: CniPaths) -> list[str]:
    """Remove our entry from the CNI config and the binary; what was done."""
    done = remove_chain(paths.conf_dir)
    removed = remove_binary(paths.bin_dir)
    if removed:
        done.append(removed)
    return done


class ChainWatcher:
    """Keeps ``ambit-cni`` installed while the agent runs.

    Every ``interval`` seconds (polling: a few stat/read calls, and it also catches edits made
    while the agent was down): re-copy the binary if it is missing or differs from ``binary``
    (an upgraded image), and re-chain the primary config if it lost our entry (the cluster's
    CNI rewrote it) or if a new file took over as primary. Logs what it changed; a problem is
    logged once until it changes, and ``status`` says how things stand.
    """

    def __init__(self, paths: CniPaths, binary: Path | None,
                 agent_socket: str = DEFAULT_AGENT_SOCKET,
                 interval: float = WATCH_INTERVAL) -> None:
        self.paths = paths
        self.binary = binary
        self.entry = chain.plugin_entry(agent_socket)
        self.interval = interval
        self.status = "not checked yet"
        self._versions: tuple[str, ...] | None = None
        self._problem = ""

    def check_once(self) -> list[str]:
        """One pass (blocking file I/O); returns what it changed, raises ``InstallError``
        naming the problem."""
        done = []
        if self.binary is not None and install_binary(self.binary, self.paths.bin_dir):
            done.append(f"copied {self.binary} to {self.paths.installed_binary} (it was "
                        "missing or a different version)")
        if self._versions is None:
            self._versions = supported_versions(self.binary or self.paths.installed_binary)
        try:
            state = ensure_chained(self.paths.conf_dir, self.entry, self._versions)
        except ChainError as e:
            raise InstallError(_explain(self.paths.conf_dir, e)) from None
        if state.primary is None:
            raise InstallError(f"no CNI config in {self.paths.conf_dir} (the cluster's CNI has "
                               "not written one, or it was removed); pods cannot be wired on "
                               "this node until it is back")
        if state.note:
            done.append(f"{state.note} (in {self.paths.conf_dir})")
        self.status = f"ambit-cni chained in {self.paths.conf_dir / state.primary}"
        return done

    async def run(self) -> None:
        first = True
        while True:
            try:
                for line in await self._pass():
                    log.warning("CNI: %s", line)
                if self._problem:
                    log.info("CNI: fixed; %s", self.status)
                elif first:
                    log.info("CNI: %s", self.status)
                self._problem = ""
                first = False
            except InstallError as e:
                self.status = f"problem: {e}"
                if str(e) != self._problem:
                    log.error("CNI: %s", e)
                self._problem = str(e)
            await asyncio.sleep(self.interval)

    async def _pass(self) -> list[str]:
        """``check_once`` in a thread. Cancelling waits for a started pass to finish: the
        agent removes the chain right after stopping the watcher, and a pass still writing
        in the background could put the entry back."""
        fut = asyncio.ensure_future(asyncio.to_thread(self.check_once))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            await asyncio.wait([fut])
            raise
