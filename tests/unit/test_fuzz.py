"""The fuzz targets (fuzz/): a short run of each, and the replay of every input that once
crashed one (``fuzz/corpus/<target>/crash-*``: the inputs of fixed findings).

Each short run first replays the target's whole committed corpus, then fuzzes for a few
seconds in a subprocess, one at a time (``make fuzz`` runs each for a minute). The C target
needs clang and libFuzzer (hack/setup.sh installs them).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz import run

SECONDS = 4


def _crashes(root: Path) -> list[tuple[str, Path]]:
    return [(f.parent.name, f) for f in sorted(root.glob("*/crash-*"))]


@pytest.mark.parametrize("target", run.TARGETS)
def test_short_fuzz_run(target: str, tmp_path: Path) -> None:
    # A fixed seed: the same exploration each time, so a failure here is reproducible
    # (make fuzz explores with fresh seeds).
    res = run.fuzz(target, SECONDS, scratch=tmp_path, seed=1)
    assert res.ok, f"{target} found {[str(c) for c in res.crashes]}:\n{res.tail}"
    assert res.runs > 0, res.tail


@pytest.mark.parametrize(("target", "path"), _crashes(run.CORPUS),
                         ids=lambda v: v.name if isinstance(v, Path) else v)
def test_fixed_crash_replays(target: str, path: Path) -> None:
    res = run.replay(target, [path])
    assert res.returncode == 0, res.stderr[-4000:]


def test_every_target_has_seeds() -> None:
    for target in run.TARGETS:
        seeds = list((run.CORPUS / target).glob("seed-*"))
        assert len(seeds) >= 5, target
        assert sum(f.stat().st_size for f in seeds) < 64 * 1024, target
    assert sorted(run.TARGETS) == sorted(
        p.stem for p in run.FUZZ.glob("*.[pc]*")
        if p.stem not in ("__init__", "run", "make_seeds")), "a target is missing from TARGETS"
