# Entry points for developers and CI. Every target first runs hack/setup.sh, which installs
# missing Debian packages and (re)builds .venv only when pyproject.toml changed.

.PHONY: setup test lint demo bench

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

# A 2-node dev cluster in network namespaces (controller, agents, ztunnels, CNI-wired pods):
# cross-node HBONE, a denied client, node metrics; torn down at the end.
demo: setup
	.venv/bin/ambit dev demo

bench: setup
	.venv/bin/python -m bench
	.venv/bin/python -m bench.push
