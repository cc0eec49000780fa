"""One module per listener (outbound 15001, inbound plaintext 15006, inbound HBONE 15008,
SOCKS5 15080, admin 15000, stats 15020/15021), on top of the generic ``base.Listener``."""
