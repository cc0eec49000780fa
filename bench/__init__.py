"""Ambit's benchmarks: direct vs. an Envoy mTLS chain vs. ambit ztunnels (``python -m bench``).

A package so the pieces (latency tool, setups, report) can be run as ``python -m bench.rr``
inside pod namespaces and unit-tested; see docs/performance.md.
"""
