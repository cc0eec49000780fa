"""Which image each of Ambit's containers runs, and how ``ambit install`` changes them.

Why it exists: Ambit ships one image per component (the Containerfile's targets: ztunnel, agent,
controller, waypoint; hack/images.sh builds them as ``localhost/ambit-<component>:<version>``),
so "the image" of an install is four references. A user pushing them to a registry changes
the prefix and the tag of all four at once (``--image-prefix registry.example.com/ambit-
--tag 0.2.0``); one built elsewhere replaces one (``--image waypoint=REF``). Each container is
matched to its component by its name in the manifests, and the controller's ``--waypoint-image``
flag names the waypoint's, so none of this depends on what the manifests' references look like.
Pure: ``render`` applies it, tests check it table by table.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

COMPONENTS = ("ztunnel", "agent", "controller", "waypoint")
# Container name in deploy/daemonset -> the component whose image it runs.
CONTAINER_COMPONENT = {"install-cni": "agent", "agent": "agent", "ztunnel": "ztunnel",
                       "controller": "controller"}
# The tag part of a reference (the distribution grammar's).
TAG = re.compile(r"^[\w][\w.-]{0,127}$")


class ImageError(ValueError):
    """An image flag cannot be used; the message names the flag and the fix."""


def split(ref: str) -> tuple[str, str | None]:
    """``(repository, tag or None)`` of a reference; a digest is dropped (a new tag or
    prefix names another image, which the old digest would contradict)."""
    ref = ref.split("@", 1)[0]
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1:]
    return ref, None


def parse_image_flags(values: list[str]) -> dict[str, str]:
    """``--image COMPONENT=IMAGE`` values, by component."""
    out: dict[str, str] = {}
    for value in values:
        component, sep, ref = value.partition("=")
        if not sep:
            raise ImageError(
                f"--image {value!r}: Ambit has one image per component, so --image takes "
                f"COMPONENT=IMAGE ({', '.join(COMPONENTS)}); to move all of them to a "
                "registry use --image-prefix REGISTRY/ambit- and --tag TAG")
        if component not in COMPONENTS:
            raise ImageError(f"--image {value!r}: no component {component!r}; one of "
                             f"{', '.join(COMPONENTS)}")
        if component in out:
            raise ImageError(f"--image {component}= given twice")
        out[component] = ref
    return out


def check(images: Mapping[str, str], prefix: str | None, tag: str | None,
          is_reference: re.Pattern[str]) -> None:
    """Every reference these flags can produce is a valid one (``is_reference`` is the
    distribution grammar's pattern, owned by render)."""
    if tag is not None and not TAG.match(tag):
        raise ImageError(f"--tag {tag!r}: not a tag (letters, digits, '_', '.', '-', at most "
                         "128, not starting with '.' or '-'), e.g. 0.2.0")
    if prefix is not None:
        sample = f"{prefix}ztunnel:{tag or '0'}"
        if not is_reference.match(sample):
            raise ImageError(f"--image-prefix {prefix!r}: {sample!r} would not be an image "
                             "reference; give [REGISTRY/]PATH-PREFIX in lower case, e.g. "
                             "registry.example.com/ambit-")
    for component, ref in images.items():
        if not is_reference.match(ref):
            raise ImageError(f"--image {component}={ref!r}: not an image reference; expected "
                             "[REGISTRY/]REPOSITORY[:TAG][@DIGEST] with a lower-case "
                             f"repository, e.g. registry.example.com/ambit-{component}:0.1.0")


def image_for(component: str, current: str, images: Mapping[str, str], prefix: str | None,
              tag: str | None) -> str | None:
    """The reference ``component`` runs after the overrides, or None to keep ``current``."""
    if component in images:
        return images[component]
    if prefix is None and tag is None:
        return None
    repository, current_tag = split(current)
    if prefix is not None:
        repository = f"{prefix}{component}"
    new_tag = tag if tag is not None else current_tag
    return f"{repository}:{new_tag}" if new_tag else repository
