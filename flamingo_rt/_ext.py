"""Loader of the compiled extension :mod:`flamingo_rt._C`.

Importing ``flamingo_rt._C`` runs its ``TORCH_LIBRARY`` registrations, which define the
ops in ``torch.ops.flamingo_rt_C`` (C++ CPU kernels, CUDA kernels when compiled in; their fake/meta
kernels are registered from Python, :mod:`flamingo_rt._cpp_fakes`). The package works without it (the ``reference`` and ``triton`` backends), so
a missing or broken build is not an import error: :func:`load` says whether it loaded
and :func:`error` why not. ``FLAMINGO_RT_NO_EXT=1`` pretends it is absent.
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Optional

_module: Optional[ModuleType] = None
_error: Optional[str] = None
_tried = False


def load() -> bool:
    """Import ``flamingo_rt._C`` once; True when it (and so its torch ops) is available."""
    global _module, _error, _tried
    if not _tried:
        _tried = True
        if os.environ.get("FLAMINGO_RT_NO_EXT", "") not in ("", "0"):
            _error = "disabled by FLAMINGO_RT_NO_EXT"
        else:
            try:
                import torch  # noqa: F401  (libtorch must be loaded before _C)

                from . import _C
                from . import _cpp_fakes

                _module = _C
                _cpp_fakes.register()  # fake kernels (symbolic-shape friendly) of the C++ ops
            except Exception as e:  # not built, built against another torch, registered twice
                _error = f"{type(e).__name__}: {e}"
    return _module is not None


def error() -> Optional[str]:
    """Why :func:`load` returned False (None when it loaded or was not tried)."""
    return _error


def with_cuda() -> bool:
    """True when ``flamingo_rt._C`` loaded and was compiled with the CUDA kernels."""
    return load() and bool(getattr(_module, "WITH_CUDA", 0))
