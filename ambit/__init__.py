"""Ambit: a sidecarless service mesh for Kubernetes.

This package holds what every component shares: the ``ambit`` command line, SPIFFE identity
helpers and the local development tooling (``ambit dev``).
"""

__version__ = "0.1.0"
