"""KV storage: the paged block pool (paged.py), the one KV store every session lives in, for
StreamGuard, the engine and Gen decoding alike. Knows nothing of heads, roles or verdicts."""
