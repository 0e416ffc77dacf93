"""Capture: what a chosen session relayed, written as a pcapng file Wireshark follows byte for byte.

`pcapng` is the pure encoder (bytes and timestamps in, file bytes out); `files` names, writes and
renames the files, `prune` keeps the directory within its limits, `setup` checks the options at
start-up, and `recorder` joins them to the relay of one session.
"""
