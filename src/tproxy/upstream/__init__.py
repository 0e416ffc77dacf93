"""Upstream proxies: the client side of the SOCKS5 and HTTP CONNECT handshakes (`handshake.py`)."""
