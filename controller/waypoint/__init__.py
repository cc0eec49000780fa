"""Waypoints: per-service L7 proxies (Envoy) that the controller configures over xDS."""
