"""The Gateway API Mesh conformance tier: the upstream MESH-HTTP and MESH-GRPC tests, run
against the dev cluster's real Envoy waypoint (results and how to run: docs/waypoints.md)."""
