"""Give bcc the running kernel's headers when the agent runs in a container.

Why it exists: bcc compiles the capture programs at startup against
``/lib/modules/$(uname -r)/{build,source}``. On a node those are links into the host's
``/usr/src`` (absolute links, e.g. ``/usr/src/linux-headers-6.1.0-18-amd64``), which mean nothing
inside the agent's container, whose ``/usr/src`` is the image's. So the node DaemonSet mounts the
host's ``/lib/modules`` at ``/host/lib/modules`` and its ``/usr/src`` at ``/host/usr/src``, both
read-only, and the agent makes its own ``/lib/modules/<release>/{build,source}`` links (in the
container's filesystem, never on the host):

1. to the host's headers, the host's links re-rooted under ``/host/usr/src``, when they exist;
2. else to the image's Debian headers (``linux-headers-*-amd64`` and its ``-common`` twin), the
   newest installed: the programs use only stable UAPI headers and the kernel's BTF, so a 6.x
   header set of another build compiles them correctly, as ``hack/setup.sh`` relies on for
   development machines.

When ``/lib/modules/<release>/build`` already has headers (the agent runs on the host itself, as
in the dev cluster), nothing is touched. ``plan`` is pure (paths in, links out) and tested in a
table; ``ensure`` applies it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

MODULES = Path("/lib/modules")
HOST_MODULES = Path("/host/lib/modules")
HOST_USR_SRC = Path("/host/usr/src")
IMAGE_USR_SRC = Path("/usr/src")
_DEBIAN_BUILD = re.compile(r"^linux-headers-(?P<version>.+)-amd64$")


@dataclass(frozen=True)
class Plan:
    """Links to create: ``build``/``source`` -> a headers directory, and where it came from."""

    build: Path
    source: Path
    origin: str  # "the node's headers" | "the image's Debian headers"


def _has_headers(path: Path) -> bool:
    return (path / "include").is_dir() or (path / "Makefile").is_file()


def _host_link(host_modules: Path, release: str, name: str, host_usr_src: Path) -> Path | None:
    """The host's ``/lib/modules/<release>/<name>`` link as a path in this container."""
    link = host_modules / release / name
    try:
        target = os.readlink(link)
    except OSError:
        return link if link.is_dir() and not link.is_symlink() else None
    # Where the link points on the host: absolute, or relative to /lib/modules/<release>.
    on_host = os.path.normpath(os.path.join("/lib/modules", release, target))
    if on_host.startswith("/usr/src/"):
        return host_usr_src / on_host[len("/usr/src/"):]
    return None  # headers elsewhere on the host: not mounted into the pod


def _version_key(text: str) -> list[tuple[int, str]]:
    return [(int(part), "") if part.isdigit() else (-1, part)
            for part in re.split(r"[.-]", text)]


def _image_headers(image_usr_src: Path) -> tuple[Path, Path] | None:
    builds = []
    for entry in image_usr_src.glob("linux-headers-*-amd64") if image_usr_src.is_dir() else []:
        m = _DEBIAN_BUILD.match(entry.name)
        common = image_usr_src / f"linux-headers-{m['version']}-common" if m else None
        if m and common is not None and common.is_dir() and _has_headers(entry):
            builds.append((m["version"], entry, common))
    if not builds:
        return None
    _, build, common = max(builds, key=lambda b: _version_key(b[0]))
    return build, common


def plan(release: str, *, modules: Path | None = None, host_modules: Path | None = None,
         host_usr_src: Path | None = None, image_usr_src: Path | None = None) \
        -> Plan | str | None:
    """``None``: headers are already in place; a ``Plan``: links to make; a string: why no
    headers can be found (for the eBPF-unavailable reason). Paths default to the module's
    constants, read at call time."""
    modules = modules or MODULES
    host_modules = host_modules or HOST_MODULES
    host_usr_src = host_usr_src or HOST_USR_SRC
    image_usr_src = image_usr_src or IMAGE_USR_SRC
    if _has_headers(modules / release / "build"):
        return None
    build = _host_link(host_modules, release, "build", host_usr_src)
    if build is not None and _has_headers(build):
        source = _host_link(host_modules, release, "source", host_usr_src)
        if source is None or not source.is_dir():
            source = build
        return Plan(build, source, "the node's headers")
    image = _image_headers(image_usr_src)
    if image is not None:
        return Plan(image[0], image[1], "the image's Debian headers")
    return (f"no kernel headers for {release}: none at {modules / release / 'build'}, none "
            f"from the node (mount its /lib/modules at {host_modules} and /usr/src at "
            f"{host_usr_src}) and no linux-headers-*-amd64 under {image_usr_src}")


def ensure(release: str, *, modules: Path | None = None, host_modules: Path | None = None,
           host_usr_src: Path | None = None, image_usr_src: Path | None = None) -> str | None:
    """Make ``modules/<release>/{build,source}`` point at headers if they do not already.

    Returns a line saying what was linked (for the log), or raises ``OSError`` when the links
    cannot be written, or ``LookupError`` with the reason when there are no headers at all.
    """
    decided = plan(release, modules=modules, host_modules=host_modules,
                   host_usr_src=host_usr_src, image_usr_src=image_usr_src)
    if decided is None:
        return None
    if isinstance(decided, str):
        raise LookupError(decided)
    target_dir = (modules or MODULES) / release
    target_dir.mkdir(parents=True, exist_ok=True)
    for name, path in (("build", decided.build), ("source", decided.source)):
        link = target_dir / name
        tmp = target_dir / f".{name}.ambit-tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(path)
        tmp.replace(link)  # atomic: a concurrent compile sees the old or the new link
    return (f"kernel headers for {release}: linked {target_dir}/build -> {decided.build} "
            f"({decided.origin})")
