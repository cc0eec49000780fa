"""Field validators shared by every Kubernetes-shaped document the controller reads.

Why one module: registry documents (``documents.py``) and the waypoint kinds
(``controller/waypoint/parse.py``) check the same things (a mapping with known keys, a
required string, a DNS-1123 name) and must say so in the same words, naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from ztunnel.state.parse import StateError

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def mapping(value: Any, path: str, allowed: Iterable[str],
            unsupported: Mapping[str, str] | None = None) -> Mapping[str, Any]:
    """A mapping with only ``allowed`` keys (None is an empty one); keys in ``unsupported``
    get their own message."""
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise StateError(path, f"expected a mapping, got {type(value).__name__}")
    allowed = set(allowed)
    for key in value:
        where = f"{path}.{key}" if path else str(key)
        if unsupported and key in unsupported:
            raise StateError(where, unsupported[key])
        if key not in allowed:
            raise StateError(where, f"unknown field; expected one of: "
                             f"{', '.join(sorted(allowed))}")
    return value


def string(value: Any, path: str) -> str:
    """A required, non-empty string."""
    if value is None:
        raise StateError(path, "is required")
    if not isinstance(value, str) or not value:
        raise StateError(path, f"expected a non-empty string, got {value!r}")
    return value


def dns_name(value: Any, path: str, *, label: bool = False) -> str:
    """A Kubernetes object name: a DNS-1123 label (namespaces, services) or subdomain."""
    text = string(value, path)
    pattern, limit = (_DNS_LABEL, 63) if label else (_DNS_SUBDOMAIN, 253)
    if len(text) > limit or not pattern.fullmatch(text):
        what = "DNS label" if label else "DNS name"
        raise StateError(path, f"{text!r} is not a valid {what}: lowercase letters, digits "
                         f"and '-'{'' if label else ' or .'}, starting and ending with a "
                         f"letter or digit, at most {limit} characters")
    return text
