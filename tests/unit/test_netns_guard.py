"""tests/conftest.py turns a skipped netns test into a failed run; check it on a scratch suite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).parents[1] / "conftest.py"

SUITE = """
import pytest

@pytest.mark.netns
def test_skips_itself():
    pytest.skip("tool missing")

def test_plain():
    pass

@pytest.mark.netns
@pytest.mark.xfail(reason="known")
def test_expected_failure():
    assert False
"""


def _run(tmp_path: Path, body: str, **env: str) -> subprocess.CompletedProcess[str]:
    netns_dir = tmp_path / "tests" / "netns"
    netns_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(CONFTEST, tmp_path / "tests" / "conftest.py")
    (netns_dir / "test_scratch.py").write_text(body)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    netns: scratch\n")
    clean = {k: v for k, v in os.environ.items() if k not in ("CI", "AMBIT_ALLOW_NETNS_SKIP")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=tmp_path,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_skipped_netns_test_fails_the_run(tmp_path: Path) -> None:
    res = _run(tmp_path, SUITE)
    assert res.returncode == pytest.ExitCode.TESTS_FAILED, res.stdout
    assert "netns tests were skipped" in res.stdout
    assert "test_skips_itself" in res.stdout
    assert "test_expected_failure" not in res.stdout.split("failing the run")[1]


def test_opt_out_works_only_outside_ci(tmp_path: Path) -> None:
    allowed = _run(tmp_path, SUITE, AMBIT_ALLOW_NETNS_SKIP="1")
    assert allowed.returncode == 0, allowed.stdout
    in_ci = _run(tmp_path, SUITE, AMBIT_ALLOW_NETNS_SKIP="1", CI="true")
    assert in_ci.returncode == pytest.ExitCode.TESTS_FAILED, in_ci.stdout


def test_a_module_skipped_at_import_counts(tmp_path: Path) -> None:
    body = 'import pytest\npytest.skip("no tool", allow_module_level=True)\n'
    res = _run(tmp_path, body)
    assert res.returncode == pytest.ExitCode.TESTS_FAILED, res.stdout


def test_no_skips_no_failure(tmp_path: Path) -> None:
    body = "import pytest\n\n@pytest.mark.netns\ndef test_ok():\n    pass\n"
    assert _run(tmp_path, body).returncode == 0
