"""KV storage: one growing buffer per StreamGuard session on CPU (session.py) and the paged block
pool (paged.py) that the engine, and StreamGuard on CUDA, share between sessions. Knows nothing of
heads, roles or verdicts."""
