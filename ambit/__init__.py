"""The ``ambit`` command line (the top layer, L2): the entry point, ``ambit install``, the local
development tools (``ambit dev``) and the registry and waypoint commands. It may import every
component; no component imports it (``tests/unit/test_layers.py``).
"""

from mesh import __version__

__all__ = ["__version__"]
