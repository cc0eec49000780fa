# Entry points for developers and CI. Every target first runs hack/setup.sh, which installs
# missing Debian packages and (re)builds .venv only when pyproject.toml or requirements/lock.txt
# changed.

.PHONY: setup test lint demo bench fuzz lock lock-upgrade images

setup:
	hack/setup.sh

# The whole suite: unit, component and netns tests (netns tests need root and never skip).
test: setup
	.venv/bin/pytest -q tests

# ruff lint everywhere, mypy --strict over the packages listed in pyproject [tool.mypy], and the
# layer check (mesh <- ztunnel/controller/agent/waypoint <- ambit/bench; docs/architecture.md).
lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy
	.venv/bin/python hack/check_layers.py
	.venv/bin/python hack/lock.py check

# The pinned, hashed Python dependencies (requirements/*.txt, from pyproject.toml by uv): lock
# re-resolves keeping every pin that still fits (run it after editing pyproject's dependencies),
# lock-upgrade takes the newest of everything. Both need PyPI and an existing .venv (uv), not
# setup: setup stops on a lock that disagrees with pyproject.toml. Commit requirements/ after.
lock:
	.venv/bin/python hack/lock.py update

lock-upgrade:
	.venv/bin/python hack/lock.py update --upgrade

# One image per component (the Containerfile's targets: ztunnel, agent, controller, waypoint),
# tagged localhost/ambit-<component>:<version>: IMAGE_PREFIX, TAG and DEBIAN_IMAGE change that
# (hack/images.sh). Bootstraps the Debian base with debootstrap when it cannot be pulled; builds
# use the host's network and create none. tests/images (in make test) builds and smoke-runs them.
images: setup
	hack/images.sh

# A 2-node dev cluster in network namespaces (controller, agents, ztunnels, CNI-wired pods):
# cross-node HBONE, a denied client, node metrics; torn down at the end. KEEP=1 leaves it
# running with `ambit dashboard` on http://127.0.0.1:15090/ (docs/dashboard.md).
demo: setup
	.venv/bin/ambit dev demo $(if $(KEEP),--keep)

# bench: direct, two Envoy pairs (TLS TCP and HBONE) and the ztunnels (TPROXY, eBPF and in-pod
# capture) side by side, goals P1-P7 of docs/performance.md (about 17 minutes); bench.push: state
# push latency over TLS (about a minute); bench.churn: pods added to one node back to back then
# deleted (10, 100, 250; both node-level redirect modes) in dev clusters of its own; per-pod
# agent/ztunnel CPU, CNI ADD/DEL latency, first connection (docs/performance.md, "Pod churn").
# About 5 minutes.
bench: setup
	.venv/bin/python -m bench
	.venv/bin/python -m bench.push
	.venv/bin/python -m bench.churn

# Coverage-guided fuzzing (fuzz/): each target (atheris for Python, libFuzzer + ASan/UBSan for
# the C CNI shim) replays its corpus then fuzzes for FUZZ_SECONDS, one at a time; progress, a
# summary, and crash inputs under fuzz/out/<target>/. `make test` runs each for a few seconds.
FUZZ_SECONDS ?= 60
fuzz: setup
	.venv/bin/python -m fuzz.run --seconds $(FUZZ_SECONDS)
