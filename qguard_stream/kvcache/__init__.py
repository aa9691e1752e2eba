"""KV storage: one growing buffer per StreamGuard session (session.py) and the paged block pool
the engine shares between sessions (paged.py). Knows nothing of heads, roles or verdicts."""
