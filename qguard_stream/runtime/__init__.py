"""The fast forward: fused weights (weights.py), the one decoder layer (layer.py), the eager
single-session step (fused.py), the paged runner with CUDA graphs per token bucket (paged.py),
attention backends (attention.py) and the C decode step for CPU (cpu_step.py).

Computes what qguard_stream.models computes, faster; owns no session state.
"""
