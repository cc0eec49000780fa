"""The Ambit controller: registry, mesh CA, and configuration push to ztunnels and waypoints.

Its ports (gRPC 15012, xDS 15011 with a required client certificate, monitoring 15014) are in
``mesh.ports``, where the agent, the waypoint agent and the install manifests read them too.
"""
