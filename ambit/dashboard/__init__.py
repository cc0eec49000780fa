"""``ambit dashboard``: a live, read-only web view of the mesh (issue 16).

Why a package of its own: the view needs a gatherer (what the controller, every node's agent
and ztunnel and every waypoint already expose), a pure model built from what was gathered (the
graph, nodes, policies), an aiohttp server with server-sent events, and the static page with
its graph library. Each lives in its own module here: ``gather`` (bounded fetches, also inside
the dev cluster's network namespaces through ``netns_http``), ``model`` (pure, table-tested),
``promtext`` (bounded Prometheus text parsing), ``server`` and ``cli``; the page is ``web/``.
"""
