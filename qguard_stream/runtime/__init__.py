"""The fast forward: fused weights and the eager step (fused.py), attention backends
(attention.py), CUDA-graph replay (graphs.py) and the C decode step for CPU (cpu_step.py).

Computes what qguard_stream.models computes, faster; owns no session state.
"""
