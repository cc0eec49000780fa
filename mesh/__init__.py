"""What every Ambit component shares: the base layer (L0).

The ztunnel, controller, agent and waypoint packages import only this package (and third-party
code), never each other; the ``ambit`` command line sits on top of all of them. Here live the
SPIFFE identities, the mesh model with its parser, store and wire format (``state``), the API
protos and their generated code (``proto``, ``api``), the ports, marks and labels that two
components must agree on (``ports``), the identity-directory layout, the generic listener and
HTTP server, and the CA client. ``tests/unit/test_layers.py`` keeps the direction.
"""

__version__ = "0.1.0"
