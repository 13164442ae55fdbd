"""Import of the Triton kernel modules, ``flamingo_rt.kernels.<name>``.

An install (``pip install [-e] .``) maps the repository's ``kernels/`` folder to the
subpackage ``flamingo_rt.kernels``. A source checkout used without an install (the
repository root on ``sys.path``, the extension built with ``setup.py build_ext --inplace``,
as ``bench/gpu_check.py`` may run on a bare GPU machine) has no such subpackage; there
``kernels/`` beside the package is registered under that name on first use, so the
kernels are the same modules in both layouts (never a second copy as top-level
``kernels``).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_PKG = "flamingo_rt.kernels"


def _register_source_tree() -> bool:
    src = Path(__file__).resolve().parents[2] / "kernels"
    init = src / "__init__.py"
    if not init.is_file():
        return False
    spec = importlib.util.spec_from_file_location(_PKG, init, submodule_search_locations=[str(src)])
    if spec is None or spec.loader is None:
        return False
    mod = importlib.util.module_from_spec(spec)
    sys.modules[_PKG] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[_PKG]
        raise
    return True


def kernel_module(name: str) -> ModuleType:
    """``flamingo_rt.kernels.<name>`` (``xattn``, ``resampler``, ``nfnet``, ``conv``), from
    the installed package or, in an uninstalled source checkout, from ``kernels/``.
    Raises ModuleNotFoundError when neither exists (and whatever the module itself raises,
    e.g. when triton is missing)."""
    full = f"{_PKG}.{name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as e:
        if e.name not in (_PKG, full) or _PKG in sys.modules or not _register_source_tree():
            raise
    return importlib.import_module(full)
