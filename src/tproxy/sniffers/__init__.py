"""Sniffers: a client's first bytes in, facts (or "need more") out. Pure code, no I/O.

Each sniffer takes everything the client has sent so far (the bytes accumulate; a sniffer never
keeps state between calls) and answers with its protocol's facts, `NEED_MORE` when the prefix is
a valid start but not yet complete, or `NotThis` when the bytes cannot be its protocol (or break
its rules: a malformed message only ends its own sniffing, and the session is then `unknown`).
Everything here parses bytes an attacker controls: bounded, fuzzed, and never trusted for where
to connect.
"""
