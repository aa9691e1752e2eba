"""HTTP/WebSocket moderation server over the batched Engine (`qguard-stream serve`)."""

from qguard_stream.server.app import add_arguments, create_app, run

__all__ = ["add_arguments", "create_app", "run"]
