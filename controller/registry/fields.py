"""Field validators shared by every Kubernetes-shaped document the controller reads.

Why one module: registry documents (``documents.py``) and the waypoint kinds
(``controller/waypoint/parse.py``) check the same things (a mapping with known keys, a
required string, a DNS-1123 name) and must say so in the same words, naming the field. The
mapping and string checks are the ztunnel's own state-file checks (``mesh/state/parse.py``),
so a state file and a registry document reject the same mistake with the same message.
"""

from __future__ import annotations

import re
from typing import Any

from mesh.state.parse import StateError, mapping, string

__all__ = ["StateError", "dns_name", "mapping", "string"]

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


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
