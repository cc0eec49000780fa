"""Local development tooling: network-namespace topologies for tests, the demo and benches."""
