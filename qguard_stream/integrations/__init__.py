"""Wiring the guard into the loops that generate: token iterators (sync and async), transformers
generate(), and the rollback-and-regenerate (CARE) loop."""
