"""The ztunnel: Ambit's per-node proxy.

One asyncio process per node carries every mesh workload's TCP traffic over HBONE (HTTP/2
CONNECT inside mutual TLS) and enforces L4 authorization, following Istio's ztunnel.
"""
