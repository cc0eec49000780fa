"""``ambit install``, ``ambit uninstall`` and ``ambit status``: Ambit on a real cluster.

Why a package of its own: rendering the manifests (``render``, pure), writing them with
server-side apply and waiting for the rollout (``apply``), removing everything in the order
the node agents need (``uninstall``) and reading the installation back for troubleshooting
(``status``) share the pinned names (``names``) and one small API layer (``kube``), and none of
it belongs to a running component.
"""
