"""What every ``ambit`` subcommand shares, whichever package owns it: the usage-error base and
the shape of a sub-parser and a handler.

Why in the base layer: each component (``ztunnel``, ``controller``, ``agent``, ``waypoint``)
owns the sub-parser and the handler of its own command, and must not import ``ambit`` (the
layer above it); yet ``ambit`` prints every component's usage errors the same way, from one
``except``. So the base class of those errors lives here, where both sides can see it.

The contract, for a package that adds a command: ``add_parser(sub)`` adds its sub-parser to
``sub`` and registers its handler with ``set_defaults(func=handler)``; ``ambit`` calls
``args.func(args)`` and exits with what it returns. The handler imports its runtime modules
(gRPC, Envoy protos, uvloop) inside the function, never at module level: ``ambit`` builds
every command's parser at each start, ``ambit --help`` included.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

Handler: TypeAlias = Callable[[argparse.Namespace], int]
"""A command's handler: the parsed flags in, the process exit status out."""

if TYPE_CHECKING:
    # Subscripted only for the type checker: the class is not generic at run time.
    SubParsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]


class UsageError(Exception):
    """Bad input from the user: printed as ``ambit: error: ...`` with exit status 2.

    Raise it (or a subclass) from a handler for a mistake the user must fix: a bad flag
    value, a file that cannot be used. The message says what is wrong and how to fix it; no
    traceback is shown."""
