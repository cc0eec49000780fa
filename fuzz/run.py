"""Run the fuzz targets one after another (``make fuzz``; ``tests/unit/test_fuzz.py`` runs them
briefly): ``python -m fuzz.run [--seconds N] [TARGET ...]``.

Each target first replays its committed corpus (``fuzz/corpus/<target>/``, seeds and fixed
crashes), then fuzzes for N seconds. New interesting inputs go to a scratch corpus under
``fuzz/out/<target>/corpus`` (not committed: copy a meaningful one into the seeds by hand),
crashes to ``fuzz/out/<target>/crash-*``. The C target (``cni_shim.c``) is built with clang
(libFuzzer, AddressSanitizer, UndefinedBehaviorSanitizer) into ``fuzz/out/``. One target at a
time, one process each: the machine is shared. Exits 1 if any target found something.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
ROOT = FUZZ.parent
CORPUS = FUZZ / "corpus"
OUT = FUZZ / "out"
SHIM = ROOT / "agent" / "cni" / "shim" / "ambit-cni.c"
PY_TARGETS = ("hbone_core", "socks5", "authority", "state_text", "state_wire", "cni_request",
              "link_request")
C_TARGETS = ("cni_shim",)
TARGETS = PY_TARGETS + C_TARGETS
CFLAGS = ["-g", "-O1", "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=undefined",
          "-std=gnu11", "-Wall", "-Wextra", "-Werror"]


class BuildError(RuntimeError):
    pass


@dataclass
class Result:
    target: str
    ok: bool
    runs: int
    cov: int
    seconds: float
    crashes: list[Path]
    tail: str


def build_c(target: str) -> Path:
    """The libFuzzer binary of a C target, rebuilt when its sources are newer."""
    src = FUZZ / f"{target}.c"
    binary = OUT / target / target
    if binary.exists() and binary.stat().st_mtime >= max(src.stat().st_mtime,
                                                          SHIM.stat().st_mtime):
        return binary
    clang = shutil.which("clang")
    if clang is None:
        raise BuildError("clang not found: install clang and libclang-rt-dev (hack/setup.sh)")
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_suffix(f".tmp{os.getpid()}")
    res = subprocess.run([clang, *CFLAGS, "-o", str(tmp), str(src)], capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        raise BuildError(f"building {target} failed:\n{res.stderr}")
    tmp.replace(binary)
    return binary


def command(target: str, inputs: list[str], flags: list[str]) -> list[str]:
    if target in C_TARGETS:
        # The shim writes its answers to stdout/stderr: closed (libFuzzer keeps its own
        # stderr); its leaks are per-process by design (the harness frees per input).
        return [str(build_c(target)), *flags, "-close_fd_mask=3", "-detect_leaks=0", *inputs]
    return [sys.executable, "-m", f"fuzz.{target}", *flags, *inputs]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # Report, do not hang in a debugger or symbolizer prompt.
    env.setdefault("ASAN_OPTIONS", "abort_on_error=0:symbolize=1")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    return env


def replay(target: str, files: list[Path]) -> subprocess.CompletedProcess[str]:
    """Run a target once on each of ``files`` (no fuzzing): 0 if none crashes."""
    return subprocess.run(command(target, [str(f) for f in files], []), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, check=False, timeout=300)


def fuzz(target: str, seconds: int, verbose: bool = False, max_runs: int = 0,
         scratch: Path | None = None, seed: int = 0) -> Result:
    """Replay the target's corpus, then fuzz it for ``seconds`` (or ``max_runs`` inputs);
    new inputs go to ``scratch`` (default ``fuzz/out/<target>/corpus``). ``seed``: libFuzzer's
    random seed (0: a new one each run), so a short run in the tests explores the same way."""
    out = OUT / target
    out.mkdir(parents=True, exist_ok=True)  # libFuzzer's -artifact_prefix: it must exist
    scratch = scratch or out / "corpus"
    scratch.mkdir(parents=True, exist_ok=True)
    seeds = CORPUS / target
    before = set(out.glob("crash-*")) | set(out.glob("timeout-*")) | set(out.glob("oom-*"))
    flags = [f"-max_total_time={seconds}", f"-artifact_prefix={out}/", "-timeout=10",
             "-rss_limit_mb=2048", "-max_len=8192", "-print_final_stats=1",
             f"-runs={max_runs or -1}", f"-seed={seed}"]
    t0 = time.monotonic()
    proc = subprocess.Popen(command(target, [str(scratch), str(seeds)], flags), cwd=ROOT,
                            env=_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, errors="replace")
    assert proc.stderr is not None
    runs = cov = 0
    tail: list[str] = []
    for line in proc.stderr:
        tail = [*tail[-60:], line]
        m = re.match(r"#(\d+)\s+(\w+)\s+cov: (\d+)", line)
        if m:
            runs, cov = int(m.group(1)), max(cov, int(m.group(3)))
            if verbose or m.group(2) in ("INITED", "pulse", "DONE"):
                print(f"  {target}: {line.rstrip()}", flush=True)
        elif m2 := re.match(r"stat::number_of_executed_units: (\d+)", line):
            runs = int(m2.group(1))
        elif verbose:
            print(f"  {target}: {line.rstrip()}", flush=True)
    code = proc.wait()
    after = set(out.glob("crash-*")) | set(out.glob("timeout-*")) | set(out.glob("oom-*"))
    crashes = sorted(after - before)
    return Result(target, code == 0 and not crashes, runs, cov, time.monotonic() - t0, crashes,
                  "".join(tail))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=60, help="fuzzing time per target")
    ap.add_argument("-v", "--verbose", action="store_true", help="all of libFuzzer's output")
    ap.add_argument("targets", nargs="*", choices=[*TARGETS, []], metavar="TARGET",
                    help=f"default: all ({', '.join(TARGETS)})")
    args = ap.parse_args(argv)
    results = []
    for target in args.targets or TARGETS:
        print(f"fuzz: {target} for {args.seconds}s", flush=True)
        try:
            res = fuzz(target, args.seconds, args.verbose)
        except BuildError as e:
            print(f"fuzz: {e}", flush=True)
            res = Result(target, False, 0, 0, 0.0, [], str(e))
        if not res.ok:
            print(res.tail, flush=True)
        results.append(res)
    print("\nfuzz summary:")
    for r in results:
        verdict = "ok" if r.ok else "FAILED " + " ".join(str(c.relative_to(ROOT))
                                                         for c in r.crashes)
        print(f"  {r.target:<12} {r.runs:>10} runs  cov {r.cov:>5}  {r.seconds:6.1f}s  {verdict}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
