"""What a ztunnel process loads: ``cryptography`` (about 8 MiB resident) only where the CA
client needs it, never in a ``--workers`` child or a ztunnel reading an identity directory
(issue 14 P6: idle memory)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("modules", [
    "ztunnel.workers",  # a --workers child
    "ztunnel.app, ztunnel.cli, ztunnel.identity",  # one process, --identity-dir or --state
])
def test_the_data_path_does_not_import_cryptography(modules: str) -> None:
    # A fresh interpreter: this one has imported cryptography for other tests long ago.
    code = (f"import sys, {modules}\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'cryptography')\n"
            "print(','.join(loaded))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.strip()
    assert out == ""


def test_the_ca_client_does_import_it() -> None:
    # The positive control: the check above can see cryptography when it is there.
    code = "import sys, ztunnel.ca_client; print('cryptography' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.strip()
    assert out == "True"
