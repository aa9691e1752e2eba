"""Triton kernels and their plain-PyTorch references, installed as `qguard_stream.kernels`."""
