"""Which kernel headers the agent gives bcc in its container (agent/capture/kernel_headers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.capture import kernel_headers

REL = "6.1.0-18-amd64"


def _headers(path: Path) -> Path:
    (path / "include").mkdir(parents=True)
    return path


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    r = {name: tmp_path / name for name in ("modules", "host_modules", "host_usr_src",
                                            "image_usr_src")}
    for p in r.values():
        p.mkdir()
    return r


def _plan(roots: dict[str, Path]) -> kernel_headers.Plan | str | None:
    return kernel_headers.plan(REL, modules=roots["modules"],
                               host_modules=roots["host_modules"],
                               host_usr_src=roots["host_usr_src"],
                               image_usr_src=roots["image_usr_src"])


def test_headers_already_in_place_are_left_alone(roots: dict[str, Path]) -> None:
    _headers(roots["modules"] / REL / "build")
    assert _plan(roots) is None


@pytest.mark.parametrize("target", [f"/usr/src/linux-headers-{REL}",
                                    f"../../../usr/src/linux-headers-{REL}"])
def test_the_hosts_links_are_rerooted_under_host_usr_src(roots: dict[str, Path],
                                                         target: str) -> None:
    build = _headers(roots["host_usr_src"] / f"linux-headers-{REL}")
    common = _headers(roots["host_usr_src"] / "linux-headers-6.1.0-18-common")
    (roots["host_modules"] / REL).mkdir()
    os.symlink(target, roots["host_modules"] / REL / "build")
    os.symlink("/usr/src/linux-headers-6.1.0-18-common", roots["host_modules"] / REL / "source")
    _headers(roots["image_usr_src"] / "linux-headers-6.1.0-40-amd64")
    assert _plan(roots) == kernel_headers.Plan(build, common, "the node's headers")


def test_without_a_source_link_build_serves_both(roots: dict[str, Path]) -> None:
    build = _headers(roots["host_usr_src"] / f"linux-headers-{REL}")
    (roots["host_modules"] / REL).mkdir()
    os.symlink(f"/usr/src/linux-headers-{REL}", roots["host_modules"] / REL / "build")
    assert _plan(roots) == kernel_headers.Plan(build, build, "the node's headers")


def test_the_newest_image_headers_are_the_fallback(roots: dict[str, Path]) -> None:
    (roots["host_modules"] / REL).mkdir()
    os.symlink("/opt/elsewhere/headers", roots["host_modules"] / REL / "build")  # not mounted
    for version in ("6.1.0-9", "6.1.0-40", "6.1.0-18"):
        _headers(roots["image_usr_src"] / f"linux-headers-{version}-amd64")
        _headers(roots["image_usr_src"] / f"linux-headers-{version}-common")
    _headers(roots["image_usr_src"] / "linux-headers-6.9.0-1-amd64")  # no -common: unusable
    assert _plan(roots) == kernel_headers.Plan(
        roots["image_usr_src"] / "linux-headers-6.1.0-40-amd64",
        roots["image_usr_src"] / "linux-headers-6.1.0-40-common", "the image's Debian headers")


def test_no_headers_anywhere_says_where_it_looked(roots: dict[str, Path]) -> None:
    reason = _plan(roots)
    assert isinstance(reason, str)
    assert f"no kernel headers for {REL}" in reason and str(roots["host_usr_src"]) in reason
    with pytest.raises(LookupError, match="no kernel headers"):
        kernel_headers.ensure(REL, modules=roots["modules"], host_modules=roots["host_modules"],
                              host_usr_src=roots["host_usr_src"],
                              image_usr_src=roots["image_usr_src"])


def test_ensure_links_and_is_idempotent(roots: dict[str, Path]) -> None:
    build = _headers(roots["image_usr_src"] / "linux-headers-6.1.0-40-amd64")
    common = _headers(roots["image_usr_src"] / "linux-headers-6.1.0-40-common")
    kw = {k: roots[k] for k in ("modules", "host_modules", "host_usr_src", "image_usr_src")}
    said = kernel_headers.ensure(REL, **kw)
    assert said is not None and "image's Debian headers" in said
    assert os.readlink(roots["modules"] / REL / "build") == str(build)
    assert os.readlink(roots["modules"] / REL / "source") == str(common)
    assert kernel_headers.ensure(REL, **kw) is None  # now in place
    assert sorted(p.name for p in (roots["modules"] / REL).iterdir()) == ["build", "source"]
