"""The Ambit controller: registry, mesh CA, and configuration push to ztunnels and waypoints."""
