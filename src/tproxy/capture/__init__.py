"""Capture: what a chosen session relayed, written as a pcapng file Wireshark follows byte for byte.

`pcapng` is the pure encoder (bytes and timestamps in, file bytes out); the files and their
limits are handled apart from it.
"""
