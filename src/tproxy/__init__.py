"""tproxy: a transparent TCP proxy for Linux (TPROXY interception, exact relay, session logs)."""

__version__ = "0.1.0"
