"""Suite-wide rules: netns tests need root, and a skipped netns test fails the run; and the
static ``ambit-cni`` binary, built once for the unit, component and netns tests that run it.

Why: the netns tests are the only proof that capture and the ztunnel work against the real
kernel. A CI machine that silently lost root, or a test that skipped itself because some tool
was missing, would otherwise turn the suite green while proving nothing. So:

* a test marked ``netns`` is skipped (with the reason) when not running as root, and then
* any skipped ``netns`` test makes the session fail, listing the tests.

On a developer machine without root, ``AMBIT_ALLOW_NETNS_SKIP=1`` accepts the skips; it is
ignored whenever ``CI`` is set.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.cni import shim as shim_build

_skipped_netns: list[str] = []


def _skips_allowed() -> bool:
    return not os.environ.get("CI") and os.environ.get("AMBIT_ALLOW_NETNS_SKIP") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="netns test needs root (it creates network namespaces)")
    for item in items:
        if item.get_closest_marker("netns") is not None:
            item.add_marker(skip)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # An expected failure is reported as "skipped" too; that is a result, not a skip.
    if report.skipped and "netns" in report.keywords and not hasattr(report, "wasxfail"):
        _skipped_netns.append(report.nodeid)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    # A whole module skipped at import (pytest.importorskip, allow_module_level) has no items
    # to carry the marker, so judge it by where it lives.
    where = report.nodeid.replace(os.sep, "/")
    if report.skipped and where.startswith(("tests/netns/", "tests/e2e/", "tests/hostile/",
                                            "tests/conformance/")):
        _skipped_netns.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Only turn success into failure; a run that already failed or errored keeps its status.
    passing = (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)
    if _skipped_netns and not _skips_allowed() and session.exitstatus in passing:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _skipped_netns:
        return
    if _skips_allowed():
        terminalreporter.write_line(
            f"note: {len(_skipped_netns)} netns test(s) skipped (AMBIT_ALLOW_NETNS_SKIP=1)"
        )
        return
    terminalreporter.write_sep("=", "netns tests were skipped: failing the run", red=True)
    for nodeid in _skipped_netns:
        terminalreporter.write_line(f"SKIPPED (not allowed) {nodeid}")
    terminalreporter.write_line(
        "netns tests must run (as root) and never skip; run `sudo make test`. "
        "Without CI, AMBIT_ALLOW_NETNS_SKIP=1 accepts the skips."
    )


@pytest.fixture(scope="session")
def shim() -> Path:
    """The static ``ambit-cni`` host binary, (re)built from agent/cni/shim; a build failure
    fails the tests that need it (never a skip: hack/setup.sh installs the compiler)."""
    try:
        return shim_build.build()
    except shim_build.ShimBuildError as e:
        pytest.fail(str(e))
