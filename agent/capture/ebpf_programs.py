"""The eBPF capture programs: their sources and pins, building them in the loader process, and
opening the pins in the agent.

Why it exists: bcc and its embedded clang/LLVM must never enter the agent (they would stay
resident, about 150 MB of its RSS), so compiling, loading and pinning happen in a short-lived
child, ``agent/capture/ebpf_loader.py``. This module is what both sides share: where the sources
are and how they are assembled (``amalgamate``), the compiler flags that carry the numbers
shared with Python (``compile_flags``), and where programs are pinned (``program_pin``); and
the agent's side of the loader: running it (``load_programs``), digesting its output into a
``CaptureError`` (``compiler_messages``) and opening what it pinned (``open_program``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.capture.base import (
    LISTENER_INBOUND,
    LISTENER_INBOUND_PLAINTEXT,
    LISTENER_OUTBOUND,
    LISTENER_SLOTS,
    CaptureError,
)
from agent.capture.bpf_sys import PROG_TYPE_SCHED_CLS, obj_get, program_info
from agent.capture.ebpf_maps import MAX_EXCLUDED, MAX_PODS
from mesh.ports import HBONE_PORT as INBOUND_HBONE_PORT
from mesh.ports import MARK_MASK, TPROXY_MARK

# All of eBPF capture logs under the backend's name, whichever module does the work.
log = logging.getLogger("agent.capture.ebpf")

DEFAULT_SOURCE_DIR = Path(__file__).resolve().parents[2] / "ebpf"

POD_PROGRAM = "pod_ingress"
UPLINK_PROGRAM = "uplink_ingress"
PROGRAMS = (POD_PROGRAM, UPLINK_PROGRAM)
# Programs are pinned next to the maps as prog_<name>; a new one is pinned as prog_<name>_new
# and renamed over the old pin (bpffs names may not contain dots).
PROG_PIN_PREFIX = "prog_"
PROG_PIN_NEW_SUFFIX = "_new"


def program_pin(pin_dir: Path, program: str) -> Path:
    """Where the loader pins ``program`` (and the agent opens it)."""
    return pin_dir / f"{PROG_PIN_PREFIX}{program}"


def program_pin_new(pin_dir: Path, program: str) -> Path:
    """The loader's temporary pin of a freshly loaded ``program``, renamed over the old one."""
    return pin_dir / f"{PROG_PIN_PREFIX}{program}{PROG_PIN_NEW_SUFFIX}"


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')
_SAFE_PATH = re.compile(r'^[^"\\\n\r]+$')


def amalgamate(source: Path, include_dir: Path) -> str:
    """``source`` with its ``#include "..."`` files (resolved in ``include_dir``) pasted in.

    bcc only rewrites map accesses (``pods.lookup(&key)``) in the main file it is given, not
    in included headers, so helpers that use maps could not live in ``ebpf/lib/*.h``. Pasting
    the headers in, each once (as if every header had ``#pragma once``), keeps the sources
    ordinary C; ``#line`` directives keep compiler and verifier messages pointing at the real
    file and line. System includes (``<uapi/...>``) are left to the compiler.
    """
    seen: set[Path] = set()

    def expand(path: Path, label: str) -> list[str]:
        try:
            lines = path.read_text().splitlines()
        except OSError as e:
            raise CaptureError(f"eBPF source {path}: {e.strerror}") from None
        out = [f'#line 1 "{label}"']
        for number, line in enumerate(lines, 1):
            m = _INCLUDE.match(line)
            if m is None:
                out.append(line)
                continue
            target = (include_dir / m.group(1)).resolve()
            if not target.is_file():
                raise CaptureError(f'{label}:{number}: #include "{m.group(1)}" not found in '
                                   f"{include_dir}")  # fmt: skip
            if target not in seen:
                seen.add(target)
                out.extend(expand(target, m.group(1)))
            out.append(f'#line {number + 1} "{label}"')
        return out

    return "\n".join(expand(source, source.name)) + "\n"


def compile_flags(pin_dir: Path, include_dir: Path) -> list[str]:
    """The clang flags: where the headers and pins are, and the numbers shared with Python."""
    text = str(pin_dir)
    if not _SAFE_PATH.match(text) or not pin_dir.is_absolute():
        raise CaptureError(
            f"bpf dir {text!r} must be an absolute path without quotes, backslashes or newlines "
            "(it is compiled into the programs as a C string)"
        )
    return [
        f"-I{include_dir}",
        f'-DAMBIT_PIN_DIR="{text}"',
        f"-DAMBIT_TPROXY_MARK={TPROXY_MARK:#x}",
        f"-DAMBIT_MARK_MASK={MARK_MASK:#x}",
        f"-DAMBIT_INBOUND_HBONE_PORT={INBOUND_HBONE_PORT}",
        f"-DAMBIT_SLOT_OUTBOUND={LISTENER_SLOTS[LISTENER_OUTBOUND]}",
        f"-DAMBIT_SLOT_INBOUND={LISTENER_SLOTS[LISTENER_INBOUND]}",
        f"-DAMBIT_SLOT_INBOUND_PLAINTEXT={LISTENER_SLOTS[LISTENER_INBOUND_PLAINTEXT]}",
        f"-DAMBIT_MAX_PODS={MAX_PODS}",
        f"-DAMBIT_MAX_EXCLUDED={MAX_EXCLUDED}",
    ]


# --- compiling and loading: the loader process ----------------------------------------------------

LOADER_MODULE = "agent.capture.ebpf_loader"
LOADER_TIMEOUT = 180.0  # clang takes about a second per program; a slow node, much more
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # holds `agent/`: the child runs this code

_COMPILER_ERROR = re.compile(r"(^|\s|:)(fatal )?error: ")
_VERIFIER_SUMMARY = re.compile(r"^processed \d+ insns")
_VERIFIER_NOISE = re.compile(r"^(\d+: |; |\s*$|bpf: Failed to load program)")


def compiler_messages(output: str, limit: int = 8) -> str:
    """The lines of the loader's output that say what went wrong, for ``CaptureError``.

    clang's diagnostics (``pod_ingress.c:18:9: error: ...``) when compiling failed; else the
    verifier's verdict, the lines just before its ``processed N insns`` summary (the log
    before them is the instruction trace); else the last lines.
    """
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    errors = [line.strip() for line in lines if _COMPILER_ERROR.search(line)]
    if errors:
        return "; ".join(errors[:limit])
    end = next((i for i in range(len(lines) - 1, -1, -1) if _VERIFIER_SUMMARY.match(lines[i])),
               None)  # fmt: skip
    if end is not None:
        verdict: list[str] = []
        for line in reversed(lines[:end]):
            if _VERIFIER_NOISE.match(line):
                if verdict:
                    break
                continue
            verdict.insert(0, line.strip())
        if verdict:
            return "; ".join(verdict[-limit:])
    return "; ".join(line.strip() for line in lines[-3:])


def loader_command(pin_dir: Path, source_dir: Path, programs: Sequence[str]) -> list[str]:
    argv = [sys.executable, "-m", LOADER_MODULE, "--bpf-dir", str(pin_dir),
            "--source-dir", str(source_dir)]  # fmt: skip
    for name in programs:
        argv += ["--program", name]
    return argv


def load_programs(
    pin_dir: Path,
    source_dir: Path = DEFAULT_SOURCE_DIR,
    programs: Sequence[str] = PROGRAMS,
    timeout: float = LOADER_TIMEOUT,
) -> dict[str, int]:
    """Compile, load and pin ``programs`` (``source_dir/<name>.c``, entry function ``<name>``)
    in a child process; returns the kernel id of each program now pinned at ``program_pin``.

    The child (``agent/capture/ebpf_loader.py``) is the only process that loads bcc and its
    clang/LLVM, and it exits when done, so none of that stays resident in the agent. Maps are
    opened from, or created and pinned in, ``pin_dir`` as bcc's ``BPF_TABLE_PINNED`` does. The
    old pins are replaced only once every program passed the verifier. A failure raises
    ``CaptureError`` with the compiler's or verifier's message; the child's whole output (the
    full verifier log, say) goes to this process's log.
    """
    argv = loader_command(pin_dir, source_dir, programs)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p
    )
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              env=env, timeout=timeout, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise CaptureError(f"the eBPF loader took more than {timeout:g}s; killed it") from None
    except OSError as e:
        raise CaptureError(f"cannot run the eBPF loader ({argv[0]}): {e.strerror}") from None
    output = proc.stderr.strip()
    try:
        answer = json.loads(proc.stdout)
        if not isinstance(answer, dict):
            raise ValueError("not an object")
    except ValueError:
        answer = {"error": f"the eBPF loader exited with status {proc.returncode} without "
                           "an answer"}  # fmt: skip
    if proc.returncode != 0 or "error" in answer:
        log.error("eBPF loader failed (%s)%s", " ".join(programs),
                  f"; its output:\n{output}" if output else "")  # fmt: skip
        detail = compiler_messages(output)
        raise CaptureError(f"{answer.get('error', 'the eBPF loader failed')}"
                           + (f": {detail}" if detail else ""))  # fmt: skip
    if output:
        log.warning("eBPF loader output:\n%s", output)
    ids = answer.get("programs")
    if not isinstance(ids, dict) or set(ids) != set(programs):
        raise CaptureError(f"the eBPF loader answered {proc.stdout.strip()!r}")
    return {str(name): int(i) for name, i in ids.items()}


@dataclass
class LoadedProgram:
    """A pinned program opened by this process: ``fd`` is what tc attaches, ``id`` the
    kernel's id of that load (``bpftool prog show id N``, ``tc filter show`` prints it)."""

    name: str
    fd: int
    id: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_program(pin_dir: Path, name: str) -> LoadedProgram:
    """The program the loader pinned for ``name``, checked to be a tc classifier."""
    path = program_pin(pin_dir, name)
    try:
        fd = obj_get(path)
    except OSError as e:
        raise CaptureError(f"cannot open pinned program {path}: {e.strerror}") from None
    try:
        info = program_info(fd)
        if info.type != PROG_TYPE_SCHED_CLS:
            raise CaptureError(f"{path} is not a tc program (BPF type {info.type}); run "
                               "`ambit agent uninstall`")  # fmt: skip
    except BaseException:
        os.close(fd)
        raise
    return LoadedProgram(name, fd, info.id)


def pinned_program_ids(pin_dir: Path) -> dict[str, int]:
    """Kernel id of each of our programs pinned in ``pin_dir`` (missing ones left out)."""
    out: dict[str, int] = {}
    for name in PROGRAMS:
        if not program_pin(pin_dir, name).exists():
            continue
        prog = open_program(pin_dir, name)
        out[name] = prog.id
        prog.close()
    return out
