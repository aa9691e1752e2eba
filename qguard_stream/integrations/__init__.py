"""Wiring the guard into the loops that generate: token iterators (sync and async), transformers
generate(), the rollback-and-regenerate (CARE) loop, and text streams from any LLM."""
