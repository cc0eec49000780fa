"""The Ambit controller: registry, mesh CA, and configuration push to ztunnels and waypoints."""

# Well-known ports, istiod's numbers: gRPC (state push and CA) and monitoring.
GRPC_PORT = 15012
MONITORING_PORT = 15014
# The same gRPC services with a REQUIRED client certificate: Envoy waypoints' ADS, which must
# prove the waypoint's identity (grpcio cannot make a client certificate optional on 15012).
XDS_PORT = 15011
