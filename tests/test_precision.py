"""flamingo_rt.ops.precision: the shared dtype rules and the blockwise widening reductions
(column sums of a bf16 matrix in float32, a bf16 matrix added into a float32 accumulator)."""
from __future__ import annotations

import pytest
import torch

from flamingo_rt import _ext
from flamingo_rt.ops import precision


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def test_acc_dtype():
    assert precision.acc_dtype(torch.bfloat16) == torch.float32
    assert precision.acc_dtype(torch.float16) == torch.float32
    assert precision.acc_dtype(torch.float32) == torch.float32
    assert precision.acc_dtype(torch.float64) == torch.float64


def test_compute_dtype_follows_autocast():
    x = torch.randn(2, 3)
    assert precision.compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert precision.compute_dtype(x) == torch.bfloat16
        assert precision.compute_dtype(x.double()) == torch.float64  # float64 is never cast down
        assert precision.compute_dtype(torch.ones(2, dtype=torch.long)) == torch.long
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert precision.compute_dtype(x.bfloat16()) == torch.bfloat16


def _inputs(R, C, dtype, seed, transposed=False):
    g = torch.Generator().manual_seed(seed)
    if transposed:
        return torch.randn(C, R, generator=g).to(dtype).t()
    return torch.randn(R, C + 3, generator=g).to(dtype)[:, 1:C + 1]  # a strided slice


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("R,C", [(1, 1), (7, 5), (300, 33)])
@pytest.mark.parametrize("transposed", [False, True])
def test_column_sum_matches_float64_in_blocks(monkeypatch, dtype, R, C, transposed):
    """Blocks shrunk to 4 rows: every row is summed exactly once, in float32."""
    monkeypatch.setattr(precision, "WIDEN_BLOCK_BYTES", 4 * C * 4)
    a = _inputs(R, C, dtype, R * 100 + C, transposed)
    s = precision.column_sum(a)
    assert s.dtype == torch.float32 and s.shape == (C,)
    ref = a.double().sum(0)
    assert torch.allclose(s.double(), ref, rtol=1e-6, atol=1e-5 * max(1, R) ** 0.5)


def test_column_sum_dtype_and_errors():
    a = torch.randn(10, 4).bfloat16()
    assert precision.column_sum(a, torch.float64).dtype == torch.float64
    assert torch.allclose(precision.column_sum(a, torch.float64), a.double().sum(0))
    with pytest.raises(ValueError, match=r"2-D .* got shape \(10,\)"):
        precision.column_sum(torch.randn(10))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("transposed", [False, True])
def test_add_widened_matches_float64_in_blocks(monkeypatch, dtype, transposed):
    R, C = 37, 19
    monkeypatch.setattr(precision, "WIDEN_BLOCK_BYTES", 5 * C * 4)
    a = _inputs(R, C, dtype, 3, transposed)
    acc = torch.randn(R, C, generator=torch.Generator().manual_seed(4))
    ref = acc.double() + a.double()
    out = precision.add_widened_(acc, a)
    assert out is acc and acc.dtype == torch.float32
    assert torch.allclose(acc.double(), ref, rtol=1e-6, atol=1e-6)


def test_add_widened_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"one shape, got \(3, 4\) and \(4, 3\)"):
        precision.add_widened_(torch.zeros(3, 4), torch.zeros(4, 3, dtype=torch.bfloat16))


def test_widening_makes_no_whole_float32_copy():
    """The point of the blocks: no float32 copy of the whole bf16 matrix is allocated (the
    plain ``a.sum(0, dtype=float32)`` and ``acc.add_(a)`` each make one)."""
    assert precision.WIDEN_BLOCK_BYTES == 8 << 20  # the shape below is sized for it
    R, C = 16384, 256  # 16 MiB in float32: two blocks of WIDEN_BLOCK_BYTES (8 MiB)
    a = torch.randn(R, C).bfloat16()
    acc = torch.zeros(R, C)
    whole = R * C * 4

    def largest_allocation(fn):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as p:
            fn()
        return max((e.cpu_memory_usage for e in p.events() if e.cpu_memory_usage > 0), default=0)

    assert largest_allocation(lambda: a.sum(0, dtype=torch.float32)) >= whole  # what is avoided
    assert largest_allocation(lambda: precision.column_sum(a)) < whole
    assert largest_allocation(lambda: precision.add_widened_(acc, a)) < whole


def test_layer_norm_in_row_blocks_equals_the_whole(monkeypatch):
    """LayerNorm into bf16 a block of rows at a time (here 3 rows of 24 floats per block; the
    FF's forward input and norm_project's xhat): bitwise the whole LayerNorm rounded to bf16,
    with and without the affine, and the same mean / rstd; in float32 the plain LayerNorm.
    (The torch path: where the C++ row kernel runs, test_layer_norm_rows_kernel covers it.)"""
    monkeypatch.setattr(precision, "_ln_kernel_fits", lambda *a: False)
    monkeypatch.setattr(precision, "WIDEN_BLOCK_BYTES", 3 * 24 * 4)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(10, 24, generator=g) * 3
    gamma, beta = torch.randn(24, generator=g), torch.randn(24, generator=g)
    for w, b in ((gamma, beta), (None, None)):
        got, mean, rstd = precision.layer_norm_in(x, 1e-5, torch.bfloat16, w, b)
        want, wm, wr = torch.native_layer_norm(x, [24], w, b, 1e-5)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16))
        assert torch.equal(mean, wm) and torch.equal(rstd, wr)
    assert torch.equal(precision.layer_norm_in(x, 1e-5, torch.float32, gamma, beta)[0],
                       torch.nn.functional.layer_norm(x, (24,), gamma, beta, 1e-5))



@pytest.mark.skipif(not _ext.load(), reason="flamingo_rt._C not built")
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_rows_kernel(x_dtype, out_dtype):
    """layer_norm_in through flamingo_rt_C::layer_norm_rows: y, mean and rstd against float64
    (within float32 rounding, plus the output's own bf16 rounding), with and without the affine,
    rows with a row stride (a column slice), an offset far larger than the spread, rows whose
    variance is 0 or far below eps, D not a multiple of the vector width; errors say what was
    expected."""
    g = torch.Generator().manual_seed(6)
    R, D = 37, 203
    base = torch.randn(R, D + 5, generator=g) * 2 + 50.0
    base[0] = 50.0  # a constant row: var 0, so rstd = 1 / sqrt(eps)
    base[1] = torch.randn(D + 5, generator=g) * 1e-4  # var 1e-8 << eps
    x = base.to(x_dtype)[:, 3:3 + D]  # row stride D + 5
    assert x.stride(0) == D + 5
    w, b = torch.randn(D, generator=g), torch.randn(D, generator=g)
    xd = x.double()
    for wt, bt in ((w, b), (None, None)):
        y, mean, rstd = precision.layer_norm_in(x, 1e-5, out_dtype, wt, bt)
        want = torch.nn.functional.layer_norm(xd, (D,), None if wt is None else wt.double(),
                                              None if bt is None else bt.double(), 1e-5)
        assert y.dtype == out_dtype and y.shape == (R, D) and mean.shape == rstd.shape == (R, 1)
        assert mean.dtype == rstd.dtype == torch.float32
        tol = 2 * rel(want.to(out_dtype), want) + 1e-5
        assert rel(y, want) <= tol
        assert rel(mean, xd.mean(-1, keepdim=True)) < 1e-6
        assert rel(rstd, (xd.var(-1, unbiased=False, keepdim=True) + 1e-5).rsqrt()) < 1e-5
    with pytest.raises(RuntimeError, match="both weight and bias or neither"):
        torch.ops.flamingo_rt_C.layer_norm_rows(x, w, None, 1e-5, torch.float32)
    with pytest.raises(RuntimeError, match="expected out_dtype float32 or bfloat16"):
        torch.ops.flamingo_rt_C.layer_norm_rows(x, None, None, 1e-5, torch.float16)
