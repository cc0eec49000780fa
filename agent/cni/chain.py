"""Chaining ``ambit-cni`` into the cluster's own CNI network config, as pure functions.

Why it exists: on a real node Ambit does not own the pod network. The cluster's CNI (flannel,
Calico, a bridge config, ...) writes its network config into ``/etc/cni/net.d``, and the
container runtime runs the plugins of the *first* config file there for every pod sandbox.
``ambit-cni`` only learns about a new pod if it is an entry of that file's ``plugins`` list,
after the plugin that assigns the addresses. Editing someone else's file safely (find the file
the runtime really uses, never duplicate our entry, keep everything else as it was, undo it
exactly) is decided here without any I/O, so every case is a table test; the file writes, the
waiting and the watching are ``agent.cni.installer``.

What was followed (read in istio/istio ``cni/pkg/install/cniconfig.go`` and ``install.go``, and
linkerd2's ``cni-plugin`` ``install-cni.sh``):

* **Which file.** libcni's ``ConfFiles(dir, [".conf", ".conflist", ".json"])`` sorted by name,
  and the first one is the pod network: containerd (go-cni ``loadFromConfDir``) takes the first
  and fails if it is invalid; CRI-O and Istio's ``getDefaultCNINetwork`` skip invalid ones. We
  take the first by name (what containerd runs) and report an invalid one as an error naming
  the file instead of silently chaining into another file. Only ``.conflist`` files are lists;
  ``.conf`` and ``.json`` hold one plugin (libcni ``ConfFromFile``).
* **Inserting.** Like Istio's ``insertCNIConfig``: a list gets our entry appended to
  ``plugins`` after any existing one is dropped; a single-plugin file becomes a list
  ``[the original plugin, ours]`` written as ``<stem>.conflist`` and the original file is
  removed (Istio writes it and renames ``X.conf`` to ``X.conflist``; Linkerd writes
  ``X.conflist`` and deletes ``X.conf``). Differences, on purpose: the list keeps the original's
  ``name`` and ``cniVersion`` (Istio forces ``k8s-pod-network``/``0.3.1``, which renames the
  network); an existing ``ambit-cni`` entry is *replaced where it is* rather than moved to the
  end, so we never fight another chained plugin (Istio's, Linkerd's) that also wants to be last;
  and a converted list records the file it came from (top-level key ``CONVERTED_KEY``, ignored
  by libcni) so that uninstalling can restore the original ``.conf`` (Istio and Linkerd leave
  the converted list behind).
* **Removing.** Like Istio's ``Cleanup`` and Linkerd's
  ``del(.plugins[]? | select(.type == "linkerd-cni"))``: drop every ``ambit-cni`` entry and
  keep the rest of the document as it is.
* **cniVersion.** The runtime injects the list's ``cniVersion`` into every plugin's config;
  chaining into a list whose version ``ambit-cni`` does not speak would fail every pod sandbox
  (fail-closed), so ``chain`` refuses it when told the supported versions.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.cni.spec import DEFAULT_AGENT_SOCKET, PLUGIN_TYPE, FailurePolicy

CONFIG_EXTENSIONS = (".conf", ".conflist", ".json")
LIST_EXTENSION = ".conflist"
# Top-level key of a list we converted from a single-plugin file: that file's name.
CONVERTED_KEY = "ambit.dev/convertedFrom"


class ChainError(ValueError):
    """A config file we cannot chain into; the message names the file and what to do.

    ``transient``: the file may be in the middle of being written (not valid JSON yet), so
    trying again later can succeed; otherwise it is wrong as it is and needs a person.
    """

    def __init__(self, msg: str, *, transient: bool = False) -> None:
        super().__init__(msg)
        self.transient = transient


def plugin_entry(
    agent_socket: str = DEFAULT_AGENT_SOCKET,
    failure_policy: FailurePolicy = FailurePolicy.FAIL_CLOSED,
) -> dict[str, Any]:
    """Our entry of the ``plugins`` list (the runtime adds ``name`` and ``cniVersion``)."""
    return {"type": PLUGIN_TYPE, "agentSocket": agent_socket,
            "failurePolicy": failure_policy.value}


def is_config_file(name: str) -> bool:
    """A file libcni reads as a network config (by extension, as ``ConfFiles`` does)."""
    return any(name.endswith(ext) and len(name) > len(ext) for ext in CONFIG_EXTENSIONS)


def config_files(names: Iterable[str]) -> list[str]:
    """The network config files among ``names`` (a directory listing), in runtime order."""
    return sorted(n for n in names if is_config_file(n) and "/" not in n)


def primary_config(names: Iterable[str]) -> str | None:
    """The file the container runtime uses for pods: the first config file by name."""
    files = config_files(names)
    return files[0] if files else None


def is_list(filename: str) -> bool:
    return filename.endswith(LIST_EXTENSION)


def list_name_for(filename: str) -> str:
    """``10-bridge.conf`` -> ``10-bridge.conflist`` (a list keeps its own name)."""
    if is_list(filename):
        return filename
    stem = filename.rsplit(".", 1)[0]
    return stem + LIST_EXTENSION


def parse_config(filename: str, text: str) -> dict[str, Any]:
    """A config file's document, checked the way libcni loads it; ``ChainError`` names the
    file."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ChainError(f"{filename}: not valid JSON ({e}); the runtime cannot use it either: "
                         "fix or remove it", transient=True) from None
    if not isinstance(doc, dict):
        raise ChainError(f"{filename}: a CNI config must be a JSON object, not "
                         f"{type(doc).__name__}")
    if is_list(filename):
        plugins = doc.get("plugins")
        if not isinstance(plugins, list) or not plugins:
            raise ChainError(f'{filename}: a .conflist needs a non-empty "plugins" list')
        for i, p in enumerate(plugins):
            if not isinstance(p, dict) or not isinstance(p.get("type"), str) or not p["type"]:
                raise ChainError(f'{filename}: plugins[{i}] must be an object with a "type"')
    else:
        if "plugins" in doc and "type" not in doc:
            raise ChainError(f"{filename}: holds a plugin list but is not named .conflist, so "
                             "the runtime reads it as a single plugin and fails; rename it to "
                             f"{list_name_for(filename)}")
        if not isinstance(doc.get("type"), str) or not doc["type"]:
            raise ChainError(f'{filename}: a single-plugin config needs a "type"')
    return doc


@dataclass(frozen=True)
class Edit:
    """What to do to the conf dir: write ``doc`` to ``write`` (unless ``None``), then remove
    ``remove`` (unless ``None``). ``changed`` is False when the files are already right."""

    write: str | None
    doc: dict[str, Any] | None
    remove: str | None = None
    note: str = ""

    @property
    def changed(self) -> bool:
        return self.write is not None or self.remove is not None


def _is_ours(plugin: Any) -> bool:
    return isinstance(plugin, dict) and plugin.get("type") == PLUGIN_TYPE


def _check_version(filename: str, doc: Mapping[str, Any],
                   supported: Sequence[str] | None) -> None:
    if supported is None:
        return
    version = doc.get("cniVersion")
    if version not in supported:
        raise ChainError(
            f"{filename}: cniVersion {version!r} is not one ambit-cni speaks "
            f"({', '.join(supported)}); the runtime passes the list's version to every "
            "plugin, so chaining it would fail every new pod. Upgrade the cluster's CNI "
            "config to one of those versions, or ambit-cni to one that supports it")


def chain(filename: str, doc: Mapping[str, Any], entry: Mapping[str, Any],
          supported_versions: Sequence[str] | None = None) -> Edit:
    """The edit that makes ``filename`` (the primary config, parsed) run ``entry`` after its
    plugins. Idempotent: an already chained file gives an unchanged ``Edit``."""
    _check_version(filename, doc, supported_versions)
    entry = dict(entry)
    if not is_list(filename):
        if _is_ours(doc):
            raise ChainError(f"{filename}: is an ambit-cni config on its own, with no plugin "
                             "that gives pods their addresses; remove it and restore the "
                             "cluster's CNI config")
        converted = {"cniVersion": doc.get("cniVersion"), "name": doc.get("name"),
                     "plugins": [copy.deepcopy(dict(doc)), entry], CONVERTED_KEY: filename}
        if converted["cniVersion"] is None:
            del converted["cniVersion"]
        if converted["name"] is None:
            del converted["name"]
        target = list_name_for(filename)
        return Edit(target, converted, filename,
                    f"converted {filename} into {target} with ambit-cni chained")
    plugins: list[Any] = list(doc["plugins"])
    others = [p for p in plugins if not _is_ours(p)]
    if not others:
        raise ChainError(f"{filename}: holds only ambit-cni, no plugin that gives pods their "
                         "addresses; restore the cluster's CNI config (reinstall its CNI)")
    # Where ours sits now, counted in plugins of others before it (0: none, or it runs first).
    position = 0
    for p in plugins:
        if _is_ours(p):
            break
        position += 1
    if position == len(plugins) or position == 0:
        wanted = [*others, entry]
    else:
        wanted = [*others[:position], entry, *others[position:]]
    if wanted == plugins:
        return Edit(None, None)
    new = copy.deepcopy(dict(doc))
    new["plugins"] = copy.deepcopy(wanted)
    ours = sum(1 for p in plugins if _is_ours(p))
    note = (f"chained ambit-cni into {filename}" if ours == 0 else
            f"replaced the stale ambit-cni entry in {filename}" if ours == 1 else
            f"collapsed {ours} ambit-cni entries in {filename} into one")
    return Edit(filename, new, note=note)


def is_chained(filename: str, doc: Mapping[str, Any], entry: Mapping[str, Any]) -> bool:
    """``filename`` already runs exactly ``entry`` once, after the cluster's plugins."""
    return is_list(filename) and not chain(filename, doc, entry).changed


def unchain(filename: str, doc: Mapping[str, Any]) -> Edit:
    """The edit that removes every ``ambit-cni`` entry from ``filename``; a list we converted
    from a single-plugin file goes back to that file when nothing else was chained since."""
    if not is_list(filename):
        return Edit(None, None)
    plugins: list[Any] = list(doc.get("plugins") or [])
    kept = [p for p in plugins if not _is_ours(p)]
    origin = doc.get(CONVERTED_KEY)
    if len(kept) == len(plugins) and origin is None:
        return Edit(None, None)
    removed = len(plugins) - len(kept)
    what = f"removed ambit-cni from {filename}" if removed else f"{filename} had no ambit-cni"
    if (isinstance(origin, str) and is_config_file(origin) and not is_list(origin)
            and "/" not in origin and len(kept) == 1 and isinstance(kept[0], dict)):
        return Edit(origin, copy.deepcopy(kept[0]), filename,
                    f"{what} and restored {origin}, the file it was converted from")
    new = copy.deepcopy(dict(doc))
    new.pop(CONVERTED_KEY, None)
    new["plugins"] = copy.deepcopy(kept)
    if not kept:  # nothing but ours was ever in it: the file is ours alone
        return Edit(None, None, filename, f"removed {filename} (it held only ambit-cni)")
    return Edit(filename, new, note=what)


def render(doc: Mapping[str, Any]) -> str:
    """A config document as written to disk (stable, readable, trailing newline)."""
    return json.dumps(doc, indent=2) + "\n"
