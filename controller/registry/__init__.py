"""The controller's registry: what exists in the cluster, before it becomes mesh state.

Two sources fill the same model (``model.py``): the embedded SQLite registry managed with
``ambit`` commands (``sqlite.py``, ``commands.py``) for hosts without Kubernetes, and the
Kubernetes API. ``translate.py`` turns either one's snapshot into the ``MeshConfig`` the
ztunnels act on, so the membership rules exist exactly once.
"""
