"""The NFNet C++ ops (flamingo_rt_C::ws_standardize / se_residual and their backwards):
direct calls, error messages, fake kernels, thread-count independence, and the CUDA
sources compile-checked with nvcc for sm_90 (no GPU needed)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from flamingo_rt import _ext
from flamingo_rt.ops.reference import nfnet as ref
from conftest import rel_err

ROOT = Path(__file__).resolve().parents[1]

needs_ext = pytest.mark.skipif(
    not (_ext.load() and hasattr(torch.ops.flamingo_rt_C, "ws_standardize")),
    reason="flamingo_rt._C not built with the NFNet ops")


@needs_ext
def test_direct_calls_match_reference_float64():
    C = torch.ops.flamingo_rt_C
    w, g = torch.randn(10, 7, 3, 3, dtype=torch.float64), 1 + 0.1 * torch.randn(10, 1, 1, 1, dtype=torch.float64)
    go = torch.randn_like(w)
    assert rel_err(C.ws_standardize(w, g, 1e-5), ref.ws_standardize(w, g, 1e-5)) < 1e-13
    for got, want in zip(C.ws_standardize_backward(go, w, g, 1e-5), ref.ws_standardize_backward(go, w, g, 1e-5)):
        assert rel_err(got, want) < 1e-12
    x, s = torch.randn(3, 5, 4, 6, dtype=torch.float64), torch.randn(3, 5, 4, 6, dtype=torch.float64)
    gl, sc = torch.randn(3, 5, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    assert rel_err(C.se_residual(x, gl, s, sc), ref.se_residual(x, gl, s, sc)) < 1e-14
    gy = torch.randn_like(x)
    for got, want in zip(C.se_residual_backward(gy, x, gl, sc), ref.se_residual_backward(gy, x, gl, s, sc)):
        assert got.shape == want.shape and rel_err(got, want) < 1e-12


@needs_ext
def test_results_independent_of_thread_count():
    C = torch.ops.flamingo_rt_C
    x = torch.randn(4, 96, 20, 20).to(memory_format=torch.channels_last)
    go = torch.randn_like(x)
    gl, sc = torch.randn(4, 96), torch.tensor(0.7)
    w, g = torch.randn(256, 64, 3, 3), torch.randn(256, 1, 1, 1)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = (C.se_residual_backward(go, x, gl, sc), C.ws_standardize_backward(w, w, g, 1e-5))
        torch.set_num_threads(2)
        b = (C.se_residual_backward(go, x, gl, sc), C.ws_standardize_backward(w, w, g, 1e-5))
    finally:
        torch.set_num_threads(n)
    for ta, tb in zip(list(a[0]) + list(a[1]), list(b[0]) + list(b[1])):
        assert torch.equal(ta, tb)


@needs_ext
def test_errors_say_expected_and_got():
    C = torch.ops.flamingo_rt_C
    with pytest.raises(RuntimeError, match=r"expected gain with 4 elements, got shape \[3\]"):
        C.ws_standardize(torch.randn(4, 2, 1, 1), torch.randn(3), 1e-5)
    with pytest.raises(RuntimeError, match="expected dtype float32, bfloat16 or float64 on CPU, got Half"):
        C.ws_standardize(torch.randn(4, 2, 1, 1).half(), torch.randn(4).half(), 1e-5)
    with pytest.raises(RuntimeError, match=r"expected gate_logits of shape \(N, C\) = \(2, 3\)"):
        C.se_residual(torch.randn(2, 3, 4, 4), torch.randn(2, 4), torch.randn(2, 3, 4, 4), torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="expected shortcut of x's shape"):
        C.se_residual(torch.randn(2, 3, 4, 4), torch.randn(2, 3), torch.randn(2, 3, 4, 5), torch.tensor(1.0))


@needs_ext
def test_fake_kernels_follow_memory_format():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 8, 5, 5).to(memory_format=torch.channels_last)
        y = torch.ops.flamingo_rt_C.se_residual(x, torch.empty(2, 8), x, torch.empty(()))
        assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
        w = torch.ops.flamingo_rt_C.ws_standardize(torch.empty(4, 3, 3, 3), torch.empty(4, 1, 1, 1), 1e-5)
        assert w.shape == (4, 3, 3, 3)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_sources_compile_for_sm90(tmp_path):
    src = ROOT / "csrc" / "cuda" / "nfnet.cu"
    proc = subprocess.run(
        ["nvcc", "-std=c++17", "-arch=sm_90", "-O2", f"-I{ROOT / 'csrc' / 'include'}", "-c", str(src),
         "-o", str(tmp_path / "nfnet.o")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
