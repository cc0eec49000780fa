"""CNI results the CNI tests feed to ``ambit-cni`` (the Python plugin and the static binary).

Why shared: the unit, component and netns tests of the plugin compare answers for the same
``prevResult`` documents; one definition keeps them comparing the same thing.
"""

from __future__ import annotations

from typing import Any

# A main plugin's 1.0.0 result: the host veth, then the pod's eth0 with its address.
PREV_RESULT: dict[str, Any] = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "veth12345678", "mac": "aa:bb:cc:dd:ee:01"},
        {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/var/run/netns/x"},
    ],
    "ips": [{"interface": 1, "address": "10.244.1.5/24", "gateway": "10.244.1.1"}],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}],
    "dns": {},
}

# A 0.4.0 (and 0.3.x) result without its own cniVersion: the plugin adds the config's on
# pass-through.
PREV_040: dict[str, Any] = {
    "interfaces": [{"name": "vethabcdef01"}, {"name": "eth0", "sandbox": "/var/run/netns/y"}],
    "ips": [{"version": "4", "interface": 1, "address": "10.244.2.7/24"}],
}
