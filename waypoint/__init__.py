"""The per-waypoint agent (``ambit waypoint run``), Ambit's counterpart of Istio's pilot-agent.

Why it exists: a waypoint is a stock Envoy that takes its L7 configuration from the controller
over ADS, but Envoy cannot obtain its own mesh certificate, and its metrics are Envoy's, not the
Istio-shaped ones every dashboard expects. So one small Python process per waypoint pod:

* gets the waypoint's certificate from the mesh CA (key generated here, CSR + bearer token) and
  renews it at half life (``certs``);
* serves it to Envoy over SDS on a private unix socket, and receives Envoy's HTTP access logs
  over ALS on the same socket, turning them into ``istio_*`` metrics (``sds``, ``als``);
* writes Envoy's bootstrap (``bootstrap``), runs Envoy and drains it on SIGTERM
  (``envoy_proc``);
* serves ``/metrics`` (its own registry plus Envoy's) and ``/healthz/ready`` (``runner``).
"""
