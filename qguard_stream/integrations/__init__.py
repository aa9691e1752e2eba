"""Adapters between qguard_stream and other software: text streams from any LLM, generators."""
