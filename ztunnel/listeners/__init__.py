"""One module per listener (outbound, inbound plaintext, inbound HBONE, SOCKS5, admin, stats;
their ports are in ``mesh.ports``), on top of the generic ``mesh.listener.Listener``."""
