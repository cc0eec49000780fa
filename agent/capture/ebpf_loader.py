"""Compile, load and pin the eBPF capture programs, in a process of its own that then exits.

Why it exists: bcc compiles C with an embedded clang/LLVM, and once a process has used it,
those pages stay resident: the node agent sat at ~220 MB in eBPF mode against ~70 MB in
iptables mode. The agent (``agent/capture/ebpf_programs.py`` ``load_programs``) therefore runs

    python -m agent.capture.ebpf_loader --bpf-dir DIR --source-dir DIR [--program NAME ...]

once per start. This process compiles each program with bcc (``amalgamate`` and
``compile_flags`` as before; the maps are ``BPF_TABLE_PINNED``, so they are opened from, or
created and pinned in, ``DIR``), loads it as a tc classifier and, only when every program
passed the verifier, pins each one at ``DIR/prog_<name>`` (pinned as ``prog_<name>_new``, then
renamed over the old pin, so there is always a complete program at the path). The pins keep the
programs alive after this process exits; the agent opens them with ``BPF_OBJ_GET`` and attaches
them with tc.

Protocol: stdout carries exactly one JSON object, ``{"programs": {name: kernel id}}`` on success
(exit 0) or ``{"error": "..."}`` (exit 1). Everything bcc, clang and the verifier print goes to
stderr (native code printing to stdout is redirected there too), which the agent logs and mines
for the message it puts in ``CaptureError``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.capture.base import CaptureError
from agent.capture.bpf_sys import obj_pin, program_info
from agent.capture.ebpf_programs import (
    DEFAULT_SOURCE_DIR,
    PROGRAMS,
    amalgamate,
    compile_flags,
    program_pin,
    program_pin_new,
)


def _bcc() -> Any:
    """bcc, untyped; imported here only, never in the agent."""
    try:
        return importlib.import_module("bcc")
    except ImportError as e:
        raise CaptureError(
            f"bcc is not importable ({e}); install it (Debian: apt-get install python3-bpfcc) "
            "or use --redirect-mode iptables"
        ) from None


def _pin(fd: int, pin_dir: Path, name: str) -> None:
    """Pin program ``fd`` as ``name``, replacing the old pin in one step (rename on bpffs)."""
    new, final = program_pin_new(pin_dir, name), program_pin(pin_dir, name)
    try:
        new.unlink(missing_ok=True)  # left by a loader that died between pin and rename
        obj_pin(fd, new)
        os.replace(new, final)
    except OSError as e:
        with contextlib.suppress(OSError):
            new.unlink(missing_ok=True)
        raise CaptureError(f"pinning {name} at {final}: {e.strerror}") from None


def load_and_pin(pin_dir: Path, source_dir: Path, programs: Sequence[str]) -> dict[str, int]:
    """Compile and load every program, then pin them all; returns name -> kernel program id."""
    bcc = _bcc()
    flags = compile_flags(pin_dir, source_dir)
    modules: list[Any] = []  # bcc's BPF objects own the program fds: keep them until pinned
    fds: dict[str, int] = {}
    for name in programs:
        source = source_dir / f"{name}.c"
        text = amalgamate(source, source_dir)
        try:
            module = bcc.BPF(text=text.encode(), cflags=flags)
        except Exception as e:  # bcc raises bare Exceptions for compile errors
            raise CaptureError(f"compiling {source}: {e}") from None
        modules.append(module)
        try:
            fn = module.load_func(name.encode(), bcc.BPF.SCHED_CLS)
        except Exception as e:
            raise CaptureError(f"loading {source}: {e} (the verifier rejected it)") from None
        fds[name] = int(fn.fd)
    ids = {}
    for name, fd in fds.items():
        _pin(fd, pin_dir, name)
        ids[name] = program_info(fd).id
    return ids


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bpf-dir", type=Path, required=True,
                   help="where the maps are pinned and the programs get pinned (on a bpffs)")
    p.add_argument("--source-dir", type=Path, default=DEFAULT_SOURCE_DIR,
                   help="the C sources (<name>.c) and their lib/ headers")
    p.add_argument("--program", action="append", default=[],
                   help=f"program to load, repeatable (default: {', '.join(PROGRAMS)})")
    args = p.parse_args(argv)
    # stdout is the answer channel: keep our own copy of it, and send anything else that
    # writes to fd 1 (bcc's native code, a stray print) to stderr with the compiler output.
    sys.stdout.flush()
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    try:
        ids = load_and_pin(args.bpf_dir, args.source_dir, args.program or list(PROGRAMS))
    except CaptureError as e:
        sys.stderr.flush()
        json.dump({"error": str(e)}, answer)
        answer.close()
        return 1
    json.dump({"programs": ids}, answer)
    answer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
