"""flamingo_rt.kernels from an uninstalled source checkout (ops/_kernel_modules.py).

An install maps ``kernels/`` to ``flamingo_rt.kernels``; a bare checkout (repository root
on sys.path, extension built in place, as bench/gpu_check.py runs on a fresh GPU machine)
has no such mapping, and every Triton backend raised ModuleNotFoundError there."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=300)


def test_kernels_load_from_the_source_tree_without_an_install():
    pytest.importorskip("triton")
    r = _run(f"""
        import sys
        # no install: drop the editable-install finder, the checkout's root on sys.path
        sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        sys.path.insert(0, {str(ROOT)!r})
        import importlib.util
        assert importlib.util.find_spec("flamingo_rt.kernels") is None, "test setup: still installed"
        from flamingo_rt.ops._kernel_modules import kernel_module
        m = kernel_module("xattn")
        assert m.__name__ == "flamingo_rt.kernels.xattn", m.__name__
        assert m.__file__.startswith({str(ROOT / "kernels")!r}), m.__file__
        assert kernel_module("xattn") is m and sys.modules["flamingo_rt.kernels.xattn"] is m
        r = kernel_module("resampler")
        assert r.__name__ == "flamingo_rt.kernels.resampler"
        assert "kernels" not in sys.modules, "a second, top-level copy of the kernels"
        try:
            kernel_module("no_such_kernel")
        except ModuleNotFoundError as e:
            assert e.name == "flamingo_rt.kernels.no_such_kernel", e.name
        else:
            raise AssertionError("a missing kernel module imported")
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def test_installed_layout_is_used_as_is():
    pytest.importorskip("triton")
    import importlib.util

    if importlib.util.find_spec("flamingo_rt.kernels") is None:
        pytest.skip("flamingo_rt is not installed here")
    from flamingo_rt.ops._kernel_modules import kernel_module

    import flamingo_rt.kernels.conv as conv

    assert kernel_module("conv") is conv
