"""tproxy: a transparent TCP proxy for Linux (TPROXY interception, byte-exact relay, session logs)."""

__version__ = "0.1.0"
