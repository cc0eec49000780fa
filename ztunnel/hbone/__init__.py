"""HBONE: TCP streams tunnelled as HTTP/2 CONNECT over mutual TLS (Istio's ambient protocol).

``core`` is the sans-I/O protocol (bytes in, events out); ``conn`` and ``pool`` are the thin
asyncio adapters that move bytes between sockets and the core.
"""
