"""The Ambit node agent: enrolls pods and captures their traffic into the node's ztunnel."""
