"""Triton kernels of flamingo_rt, installed as ``flamingo_rt.kernels``.

Each module holds the kernels of one op and their launch helpers (no autograd; the ops
in :mod:`flamingo_rt.ops` register them as their ``triton`` backend). Triton is
imported lazily by those modules, so ``import flamingo_rt`` works without it.
"""
