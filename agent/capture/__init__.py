"""Traffic capture: steering enrolled pods' TCP into the node's ztunnel (TPROXY; eBPF later)."""
