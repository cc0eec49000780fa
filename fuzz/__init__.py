"""Coverage-guided fuzz targets (atheris for Python, libFuzzer + ASan for the C CNI shim).

One target per module; each module's docstring says what it feeds, which invariants it checks
and which exceptions count as a rejection rather than a finding. ``python -m fuzz.run`` runs
them (``make fuzz``); ``tests/unit/test_fuzz.py`` runs each briefly. Seeds are committed under
``fuzz/corpus/<target>/``; a ``crash-*`` file there is a fixed finding, replayed by the tests.
"""
