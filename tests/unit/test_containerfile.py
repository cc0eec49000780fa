"""The Containerfile, checked without building it.

Why: tests/images builds the images and runs them, which takes podman, root and minutes; what
can be checked from the text is checked here, in milliseconds, so a typo fails before any
build: every instruction is a real one, every file it copies exists in the repository and is
not excluded by .containerignore, every stage it builds from exists, every Debian package it
installs is pinned, the node agent's image installs what it needs at run time (the packages
hack/setup.sh installs for it) and no final image carries a compiler, each image puts its
pieces where the manifests and the code look for them, runs as its manifest's user, and
carries the names and tag the manifests use (one image per component).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import agent
import ambit
from agent.capture.ebpf_programs import DEFAULT_SOURCE_DIR
from ambit.install.render import IMAGE_MANIFESTS_DIR

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "Containerfile"
IGNORE = ROOT / ".containerignore"
BASE = ROOT / "deploy" / "daemonset"

# Every Dockerfile instruction (https://docs.docker.com/reference/dockerfile/; Buildah/Podman
# read the same set). MAINTAINER is deprecated and refused here.
KEYWORDS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
            "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}
# What the node agent needs at run time: bcc and kernel headers for eBPF mode, the routing
# and packet-filter tools for capture.
AGENT_RUNTIME = {"python3-bpfcc", "linux-headers-amd64", "iproute2", "iptables", "nftables"}
CNI_BINARY = "/opt/ambit/cni/ambit-cni"
# The images (Containerfile targets) and the users they run as ("" = root: the node pods need
# it, their manifest grants only the capabilities they use).
TARGETS = {"ztunnel": "", "agent": "", "controller": "65532:65532", "waypoint": "65532:65532"}
BUILD_TOOLS = {"gcc", "libc6-dev", "make", "binutils", "python3-venv"}
PINS = ROOT / "containers" / "debian-packages.txt"


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    rest: str


def instructions(text: str) -> list[Instruction]:
    """Logical instructions: continuation lines joined, comments and blank lines dropped
    (a comment inside a continued instruction is dropped too, as Docker does)."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not buf:
            start = no
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line)
        keyword, _, rest = " ".join(buf).partition(" ")
        out.append(Instruction(start, keyword, rest.strip()))
        buf = []
    assert not buf, "the Containerfile ends inside a continued instruction"
    return out


INSTRUCTIONS = instructions(CONTAINERFILE.read_text())


@dataclass
class Stage:
    name: str
    base: str
    body: list[Instruction]


def global_args() -> dict[str, str]:
    """ARGs before the first FROM, with their defaults (usable in FROM lines)."""
    out: dict[str, str] = {}
    for ins in INSTRUCTIONS:
        if ins.keyword == "FROM":
            break
        assert ins.keyword == "ARG", f"line {ins.line}: only ARG may come before FROM"
        name, _, default = ins.rest.partition("=")
        out[name] = default
    return out


def stages() -> list[Stage]:
    args = global_args()
    out: list[Stage] = []
    for ins in INSTRUCTIONS:
        if ins.keyword == "FROM":
            words = ins.rest.split()
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)],
                          words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            assert len(words) in (1, 3), f"line {ins.line}: FROM IMAGE [AS NAME]"
            out.append(Stage(name or f"stage-{len(out)}", base, []))
        elif out:
            out[-1].body.append(ins)
    if out and out[-1].name.startswith("stage-"):
        out[-1].name = "final"
    return out


def stage(name: str) -> Stage:
    (found,) = [s for s in stages() if s.name == name]
    return found


def chain(name: str) -> list[Stage]:
    """The stage and the stages it is built from, down to its base image: FROM, or for a
    flattened stage (FROM scratch, then COPY --from=X / /) X."""
    names = {s.name for s in stages()}
    out = [stage(name)]
    while True:
        base = out[-1].base
        if base == "scratch":
            whole = [src for src, paths, dest in copies(out[-1]) if paths == ["/"] and dest == "/"]
            base = whole[0] if whole and whole[0] is not None else base
        if base not in names:
            return out
        out.append(stage(base))


def copies(stage: Stage) -> list[tuple[str | None, list[str], str]]:
    """(from-stage or None, sources, destination) of each COPY in ``stage``."""
    out: list[tuple[str | None, list[str], str]] = []
    for ins in stage.body:
        if ins.keyword != "COPY":
            continue
        words = shlex.split(ins.rest)
        source_stage = None
        while words and words[0].startswith("--"):
            opt = words.pop(0)
            if opt.startswith("--from="):
                source_stage = opt.removeprefix("--from=")
        assert len(words) >= 2, f"line {ins.line}: COPY SRC... DEST"
        out.append((source_stage, words[:-1], words[-1]))
    return out


def apt_packages(stage: Stage) -> set[str]:
    """The packages of every ``apt-install`` (containers/apt-install) in the stage's RUNs."""
    out: set[str] = set()
    for ins in stage.body:
        if ins.keyword != "RUN":
            continue
        lexer = shlex.shlex(ins.rest, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
        for i, word in enumerate(words):
            if not word.endswith("/apt-install"):
                continue
            for w in words[i + 1:]:
                if w in ("&&", "||", ";", "|", "&"):
                    break
                if not w.startswith(("-", '"', "$")):
                    out.add(w)
    return out


def pins() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in PINS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("=")
            out[name] = version
    return out


def setup_packages() -> set[str]:
    """The PACKAGES array of hack/setup.sh."""
    text = (ROOT / "hack" / "setup.sh").read_text()
    block = re.search(r"^PACKAGES=\((.*?)\)", text, re.S | re.M)
    assert block is not None, "hack/setup.sh has no PACKAGES=(...)"
    return set(block.group(1).split())


def ignore_patterns() -> list[str]:
    return [line.strip() for line in IGNORE.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .containerignore excludes ``path`` (or a directory above it). Patterns are
    matched like Docker's: relative to the context root, ``**`` any number of directories."""
    parts = Path(path.rstrip("/")).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        p = pattern.strip("/")
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, p):
                return True
            if p.startswith("**/"):
                tail = p.removeprefix("**/")
                segs = prefix.split("/")
                if any(fnmatch.fnmatchcase("/".join(segs[i:]), tail) for i in range(len(segs))):
                    return True
    return False


def manifest_images() -> set[str]:
    images: set[str] = set()
    for doc in yaml.safe_load_all("\n---\n".join(p.read_text() for p in BASE.glob("*.yaml"))):
        if doc and doc.get("kind") in ("Deployment", "DaemonSet"):
            spec = doc["spec"]["template"]["spec"]
            for c in [*spec.get("initContainers", []), *spec["containers"]]:
                images.add(c["image"])
    return images


def labels(stage: Stage) -> dict[str, str]:
    out: dict[str, str] = {}
    for ins in stage.body:
        if ins.keyword == "LABEL":
            for word in shlex.split(ins.rest):
                key, _, value = word.partition("=")
                out[key] = value
    return out


# --- tests --------------------------------------------------------------------------------------


def test_every_instruction_is_a_real_one() -> None:
    assert INSTRUCTIONS
    for ins in INSTRUCTIONS:
        assert ins.keyword in KEYWORDS, f"line {ins.line}: {ins.keyword!r} is not an instruction"
        assert ins.keyword.isupper(), f"line {ins.line}: write instructions in upper case"
        assert ins.rest, f"line {ins.line}: {ins.keyword} without arguments"


def test_the_parser_sees_continuations_and_rejects_junk() -> None:
    parsed = instructions("FROM x\n# c\nRUN a \\\n  # inner comment\n  && b\nFORM y\n")
    assert [(i.keyword, i.rest) for i in parsed] == [("FROM", "x"), ("RUN", "a && b"),
                                                      ("FORM", "y")]
    assert parsed[2].keyword not in KEYWORDS


def test_stages() -> None:
    s = stages()
    names = [x.name for x in s]
    assert len(set(names)) == len(names), "stage names are unique"
    assert set(TARGETS) <= set(names), "one target per component image"
    for i, st in enumerate(s):
        assert st.base in ("docker.io/library/debian:bookworm-slim", "scratch", *names[:i]), \
            f"FROM {st.base}: neither the Debian base, scratch nor an earlier stage"
        for source_stage, _, _ in copies(st):
            if source_stage is not None:
                assert source_stage in names[:i], f"COPY --from={source_stage}: no such " \
                    "earlier stage"


@pytest.mark.parametrize("stage", [s.name for s in stages()])
def test_every_copied_file_is_in_the_build_context(stage: str) -> None:
    (st,) = [s for s in stages() if s.name == stage]
    patterns = ignore_patterns()
    assert not any(p.startswith("!") for p in patterns), "no re-includes: keep it simple"
    for source_stage, sources, _ in copies(st):
        if source_stage is not None:
            continue
        for src in sources:
            assert not src.startswith(("/", "..")), f"{src}: relative to the context"
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            assert not ignored(src, patterns), f"COPY {src}: excluded by .containerignore"


def test_the_ignore_matcher() -> None:
    patterns = [".git", "**/__pycache__", "agent/cni/shim/ambit-cni"]
    assert ignored(".git/config", patterns)
    assert ignored("agent/capture/__pycache__/x.pyc", patterns)
    assert ignored("agent/cni/shim/ambit-cni", patterns)
    assert not ignored("agent/cni/shim/", patterns)
    assert not ignored("agent", patterns)


def test_the_context_leaves_out_local_state() -> None:
    patterns = ignore_patterns()
    for path in (".git", ".venv/bin/python", "ambit/__pycache__/cli.cpython-311.pyc",
                 "agent/cni/shim/ambit-cni"):
        assert ignored(path, patterns), path


def test_the_agent_runtime_packages_are_installed() -> None:
    assert setup_packages() >= AGENT_RUNTIME, "hack/setup.sh no longer installs the agent's " \
        "runtime packages under these names: update both"
    installed = set().union(*(apt_packages(x) for x in chain("agent")))
    fetched = apt_packages(stage("headers"))  # unpacked into the image, not installed
    assert installed | fetched >= AGENT_RUNTIME, f"missing: {AGENT_RUNTIME - installed}"
    assert "python3" in installed
    assert {"gcc", "libc6-dev", "make"} <= apt_packages(stage("cni")), "the CNI stage builds C"


@pytest.mark.parametrize("target", TARGETS)
def test_no_build_tools_in_an_image(target: str) -> None:
    installed = set().union(*(apt_packages(x) for x in chain(target)))
    assert not BUILD_TOOLS & installed, f"{target} installs {BUILD_TOOLS & installed}"
    assert installed <= {"python3", "python3-bpfcc", "iproute2", "iptables", "nftables"}


def test_every_debian_package_is_pinned() -> None:
    pinned = pins()
    used = set().union(*(apt_packages(x) for x in stages()))
    assert used, "the parser found no apt-install"
    assert used <= set(pinned), f"not in containers/debian-packages.txt: {used - set(pinned)}"
    assert all(re.fullmatch(r"[0-9][\w.:~+-]*", v) for v in pinned.values()), pinned
    assert set(pinned) <= used, f"pinned but never installed: {set(pinned) - used}"


def test_the_apt_parser() -> None:
    st = Stage("t", "x", instructions(
        "RUN /b/apt-install a b && rm -rf x; echo '/b/apt-install c; d'\n"
        "RUN /b/apt-install --download e && /b/apt-install --download \"$f\"\n"))
    assert apt_packages(st) == {"a", "b", "e"}


def test_the_tags_match_the_manifests() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert version == ambit.__version__
    for target in TARGETS:
        assert labels(stage(target))["org.opencontainers.image.version"] == version, target
        assert labels(stage(target))["org.opencontainers.image.title"] == f"ambit-{target}"
    header = re.search(r"--target (\w+) -t (\S+) -f Containerfile \.", CONTAINERFILE.read_text())
    assert header is not None, "the header says how to build an image, with its tag"
    assert header.group(2) == f"localhost/ambit-{header.group(1)}:{version}"
    assert 'prefix="${IMAGE_PREFIX:-localhost/ambit-}"' in (ROOT / "hack" / "images.sh"
                                                            ).read_text()
    assert manifest_images() == {f"localhost/ambit-{c}:{version}"
                                 for c in ("agent", "ztunnel", "controller")}, \
        "the manifests run the images hack/images.sh makes"


@pytest.mark.parametrize(("target", "user"), TARGETS.items())
def test_the_entrypoint_and_the_user(target: str, user: str) -> None:
    body = [i for st in chain(target) for i in st.body]
    entry = [i for i in stage(target).body if i.keyword == "ENTRYPOINT"]
    assert len(entry) == 1
    assert json.loads(entry[0].rest) == ["ambit"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "ambit" in scripts
    env = " ".join(i.rest for i in body if i.keyword == "ENV")
    assert re.search(r"PATH=/opt/ambit/venv/bin:", env), "ambit on PATH"
    assert "PYTHONDONTWRITEBYTECODE=1" in env, "read-only roots: Python must not try to write"
    users = [i.rest for i in stage(target).body if i.keyword == "USER"]
    assert users == ([user] if user else []), f"{target} runs as {users or 'root'}"


def test_the_pieces_are_where_the_manifests_and_the_code_look() -> None:
    for target in TARGETS:
        assert (f"venv-{target}", ["/opt/ambit/venv"], "/opt/ambit/venv") in copies(
            stage(target)), f"{target} gets its own venv"
        assert (None, [f"requirements/{target}.txt"], "/src/requirements/") in copies(
            stage(f"deps-{target}")), f"{target}'s venv installs its own lock subset"
    assert ("cni", ["/src/agent/cni/shim/ambit-cni"], CNI_BINARY) in copies(stage("agent"))
    assert (None, ["deploy/"], "/opt/ambit/deploy/") in copies(stage("controller"))
    assert Path("/opt/ambit/deploy") / "daemonset" == IMAGE_MANIFESTS_DIR, \
        "`ambit install` in the controller image reads the copied manifests"
    node = yaml.safe_load((BASE / "node.yaml").read_text())
    for c in [*node["spec"]["template"]["spec"]["initContainers"],
              *node["spec"]["template"]["spec"]["containers"]]:
        if "--binary" in c["args"]:
            assert c["args"][c["args"].index("--binary") + 1] == CNI_BINARY, c["name"]
    # The agent compiles ebpf/*.c found beside its packages; pip does not install them.
    assert Path(agent.__file__).resolve().parents[1] / "ebpf" == DEFAULT_SOURCE_DIR
    assert 'cp -r "$src/ebpf" "$site/ebpf"' in (ROOT / "containers" / "build-venv").read_text()
    text = "\n".join(i.rest for i in stage("agent").body)
    assert "ln -s /usr/lib/python3/dist-packages/bcc \"$site/bcc\"" in text
