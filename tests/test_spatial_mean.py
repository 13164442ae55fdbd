"""flamingo_rt.ops.spatial_mean (the squeeze of the frozen NFNet's squeeze-excite) and its C++
kernel flamingo_rt_C::spatial_mean: against the float64 mean on every layout and dtype, thread
count independence, empty shapes, errors, the fake kernel, opcheck, and the torch fallbacks
(autograd, compile)."""
from __future__ import annotations

import pytest
import torch

from flamingo_rt import _ext
from flamingo_rt.ops import spatial_mean
from conftest import every_other_row

needs_ext = pytest.mark.skipif(
    not (_ext.load() and hasattr(torch.ops.flamingo_rt_C, "spatial_mean")),
    reason="flamingo_rt._C not built with spatial_mean")


def _layouts(x: torch.Tensor):
    """x as NCHW, channels-last, a strided view (every other column), a permuted copy, and
    every other row of a taller tensor, NCHW (dense rows, planes not dense) and channels-last
    (pixels C apart within a row, rows not W*C apart)."""
    N, C, H, W = x.shape
    yield "nchw", x.contiguous()
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    wide = torch.zeros(N, C, H, 2 * W, dtype=x.dtype)
    wide[..., ::2] = x
    yield "strided", wide[..., ::2]
    yield "hw_transposed", x.transpose(2, 3).contiguous().transpose(2, 3)
    yield "rows_strided", every_other_row(x)
    yield "cl_rows_strided", every_other_row(x, channels_last=True)


@needs_ext
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-14), (torch.float32, 2e-6), (torch.bfloat16, 2e-6)])
@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (3, 70, 5, 7), (2, 130, 13, 11), (1, 64, 33, 40)])
def test_matches_float64_mean_on_every_layout(dtype, tol, shape):
    torch.manual_seed(hash(shape) % 1000)
    x = (torch.randn(shape, dtype=torch.float64) + 0.5).to(dtype)
    want = x.double().mean(dim=(2, 3))
    for name, xv in _layouts(x):
        got = spatial_mean(xv)
        assert got.shape == want.shape, name
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), name
        err = ((got.double() - want).abs() / want.abs().clamp_min(1e-3)).max().item()
        assert err < tol, (name, err)


@needs_ext
def test_calls_the_kernel_without_a_cast_of_x():
    x = torch.randn(2, 96, 9, 9, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.profiler.profile() as prof:
        spatial_mean(x)
    names = {e.name for e in prof.events()}
    assert "flamingo_rt_C::spatial_mean" in names
    assert "aten::copy_" not in names and "aten::_to_copy" not in names


@needs_ext
def test_independent_of_thread_count():
    x = torch.randn(4, 200, 30, 30).contiguous(memory_format=torch.channels_last)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = [spatial_mean(xv) for _, xv in _layouts(x)]
        torch.set_num_threads(2)
        b = [spatial_mean(xv) for _, xv in _layouts(x)]
    finally:
        torch.set_num_threads(n)
    for ta, tb in zip(a, b):
        assert torch.equal(ta, tb)


@needs_ext
def test_empty_shapes_as_torch():
    assert spatial_mean(torch.randn(0, 5, 3, 3)).shape == (0, 5)
    assert spatial_mean(torch.randn(2, 0, 3, 3)).shape == (2, 0)
    got = spatial_mean(torch.randn(2, 3, 0, 4, dtype=torch.bfloat16))
    assert got.shape == (2, 3) and got.dtype == torch.float32 and torch.isnan(got).all()


@needs_ext
def test_errors_say_expected_and_got():
    C = torch.ops.flamingo_rt_C
    with pytest.raises(ValueError, match=r"expected x of shape \(N, C, H, W\), got \(2, 3, 4\)"):
        spatial_mean(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="expected a floating-point x, got torch.int64"):
        spatial_mean(torch.ones(1, 2, 3, 3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"expected x of shape \(N, C, H, W\), got \[2, 3\]"):
        C.spatial_mean(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="expected dtype float32, bfloat16 or float64 on CPU, got Half"):
        C.spatial_mean(torch.randn(1, 2, 3, 3).half())


@needs_ext
def test_fake_kernel_and_opcheck():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = torch.ops.flamingo_rt_C.spatial_mean(torch.empty(2, 8, 5, 5, dtype=torch.bfloat16))
        assert y.shape == (2, 8) and y.dtype == torch.float32
    torch.library.opcheck(torch.ops.flamingo_rt_C.spatial_mean.default,
                          (torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last),),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_path_for_gradients_and_half():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    y = spatial_mean(x)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 1 / 20))
    h = spatial_mean(torch.randn(2, 3, 4, 5).half())
    assert h.dtype == torch.float32


def test_compiles_fullgraph():
    x = torch.randn(2, 16, 6, 6, dtype=torch.bfloat16)
    f = torch.compile(spatial_mean, fullgraph=True, backend="eager")
    assert torch.allclose(f(x), x.double().mean(dim=(2, 3)).float(), rtol=1e-5, atol=1e-6)
