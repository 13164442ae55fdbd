"""How the kernels' host code launches: interpreted on the CPU, or compiled, autotuned or not.

- :func:`interpreting`: ``TRITON_INTERPRET=1`` is set (the kernels then run in Triton's CPU
  interpreter, each in one small fixed configuration).
- :func:`autotune`: whether a problem of ``rows`` rows runs a kernel's autotuned form on
  the GPU: at least ``min_rows`` rows (autotuning compiles every configuration of the
  space per key, which small problems never repay) and ``FLAMINGO_RT_TRITON_AUTOTUNE`` is
  not ``0``; otherwise the kernel's heuristic configuration.

Both read the environment at each call.
"""
from __future__ import annotations

import os


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotune(rows: int, min_rows: int) -> bool:
    """``rows >= min_rows`` and FLAMINGO_RT_TRITON_AUTOTUNE is not 0."""
    return rows >= min_rows and os.environ.get("FLAMINGO_RT_TRITON_AUTOTUNE", "1") != "0"
