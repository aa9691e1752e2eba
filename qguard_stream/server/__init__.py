"""HTTP/WebSocket moderation server over the batched Engine (run by `qguard-stream serve`)."""

from qguard_stream.server.app import create_app

__all__ = ["create_app"]
