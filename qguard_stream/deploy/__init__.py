"""Deployments past one process: Ray Serve (`qguard_stream.deploy.ray`, the `ray` extra)."""
