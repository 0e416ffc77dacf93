"""Captures: what a session relayed, as pcapng files in the capture directory."""
