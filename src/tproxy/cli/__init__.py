"""Argument parsing and human output only."""
