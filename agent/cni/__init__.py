"""The ``ambit-cni`` chained CNI plugin: tells the node agent about pods as they are wired."""
