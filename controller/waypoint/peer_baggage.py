"""The waypoint's Envoy keeps the CONNECT's ``baggage`` header for its access log.

Why it exists: a ztunnel puts the source workload's peer metadata on each HBONE CONNECT as a
W3C ``baggage`` header (``ztunnel/peer_metadata.py``, as Istio's ztunnel does). The waypoint's
request metrics are computed from the access log of the *inner* requests (``main_internal``),
which never see the CONNECT's headers, so ``connect_terminate`` copies the header into a
filter state object shared with the internal listener's connection (like the peer principal),
and the access log sends it to the waypoint agent (``waypoint/als.py``), which parses it.
``%REQ(baggage):1024%`` bounds what is copied (a longer header is cut; the parser drops a
cut entry).
"""

from __future__ import annotations

PEER_BAGGAGE_KEY = "ambit.peer_baggage"
BAGGAGE_FORMAT = "%REQ(baggage):1024%"
