"""The Ambit controller: registry, mesh CA, and configuration push to ztunnels and waypoints."""

# Well-known ports, istiod's numbers: gRPC (state push and CA) and monitoring.
GRPC_PORT = 15012
MONITORING_PORT = 15014
