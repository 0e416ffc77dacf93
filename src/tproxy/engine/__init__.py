"""The asyncio engine: listeners, upstream connect, relay, the session runner."""
