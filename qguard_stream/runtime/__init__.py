"""The fast forward: fused weights (weights.py), the one decoder layer and guard head (layer.py),
the paged runner with CUDA graphs per token bucket (paged.py), its C step for fp32 and bf16 CPU
(cpu_step.py) and the attention backends for gathered contexts (attention.py).

Computes what qguard_stream.models computes, faster; owns no session state.
"""
