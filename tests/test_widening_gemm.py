"""bf16 x bf16 -> float32 products (flamingo_rt.ops.widening_gemm): MKL's float32-accumulating
product (the default on x86-64 Intel with torch's MKL; forced on here on any x86-64 CPU whose
torch carries it) and torch's bf16 product widened (the default elsewhere;
FLAMINGO_RT_WIDENING_GEMM=0 forces it), both against float64."""
from __future__ import annotations

import platform

import pytest
import torch

from flamingo_rt.ops import _cpp_backends, cpu_gemm, widening_gemm
from flamingo_rt.ops.precision import column_sum
from conftest import use_bf16_products

MKL_EXPECTED = (_cpp_backends.AVAILABLE and platform.machine() == "x86_64"
                and cpu_gemm.intel_cpu())


@pytest.fixture(autouse=True)
def _torch_half_products(monkeypatch):
    """torch's bf16 products beside MKL's, as on CPUs with bf16 kernels: on one without them
    flamingo_rt's would run widened to float32 (tests/test_half_widening.py tests that)."""
    monkeypatch.setenv("FLAMINGO_RT_WIDEN_HALF", "0")


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _force_mkl(monkeypatch) -> None:
    """MKL's product on, wherever torch carries its symbol (on a non-Intel CPU it runs, just
    not faster than torch's bf16 product, so it is off by default there)."""
    assert use_bf16_products("widening", monkeypatch)


@pytest.fixture(params=["mkl", "torch"])
def path(request, monkeypatch):
    if request.param == "mkl":
        _force_mkl(monkeypatch)
    else:
        use_bf16_products("rounded", monkeypatch)
    return request.param


def test_available_where_expected(monkeypatch):
    """On an Intel x86-64 CPU with the extension built, torch's MKL carries the product (its
    absence there would silently cost the speed); FLAMINGO_RT_WIDENING_GEMM=0 turns it off."""
    monkeypatch.delenv("FLAMINGO_RT_WIDENING_GEMM", raising=False)
    if MKL_EXPECTED:
        assert widening_gemm.available()
    monkeypatch.setenv("FLAMINGO_RT_WIDENING_GEMM", "0")
    assert not widening_gemm.available()


@pytest.mark.parametrize("layout", ["NN", "TN", "NT", "TT", "strided"])
@pytest.mark.parametrize("M,K,N", [(37, 53, 29), (64, 300, 128), (1, 257, 33), (5, 0, 7)])
def test_addmm_against_float64(path, layout, M, K, N):
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    a = torch.randn(K, M, generator=g).bfloat16().t() if layout[0] == "T" else torch.randn(M, K, generator=g).bfloat16()
    b = torch.randn(N, K, generator=g).bfloat16().t() if layout[1:] == "T" else torch.randn(K, N, generator=g).bfloat16()
    if layout == "strided":  # neither stride 1: copied, same values
        a = torch.randn(M, 2 * K, generator=g).bfloat16()[:, ::2]
    c0 = torch.randn(M, N, generator=g)
    want = 0.5 * c0.double() + 1.5 * (a.double() @ b.double())
    c = c0.clone()
    got = widening_gemm.addmm_(c, a, b, alpha=1.5, beta=0.5)
    assert got.data_ptr() == c.data_ptr() and got.dtype == torch.float32
    # float32 accumulation (MKL) or one bf16 rounding of the product (torch's path)
    tol = 1e-6 if path == "mkl" else 8e-3
    assert rel_err(got, want) <= tol or (want.abs().max() == 0 and got.abs().max() == 0)
    fresh = torch.full((M, N), float("nan"))  # beta 0: c is not read (NaN must not leak)
    widening_gemm.addmm_(fresh, a, b, alpha=1.0, beta=0.0)
    assert torch.isfinite(fresh).all()
    assert rel_err(widening_gemm.mm(a, b), a.double() @ b.double()) <= tol or K == 0


def test_mkl_product_is_more_accurate_than_the_widened_bf16_one(monkeypatch):
    _force_mkl(monkeypatch)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 512, generator=g).bfloat16(), torch.randn(512, 96, generator=g).bfloat16()
    exact = a.double() @ b.double()
    mkl = widening_gemm.mm(a, b)
    monkeypatch.setenv("FLAMINGO_RT_WIDENING_GEMM", "0")
    widened = widening_gemm.mm(a, b)
    assert rel_err(mkl, exact) < 1e-6 < rel_err(widened, exact) < 5e-3


def test_column_sum_both_paths(path):
    g = torch.Generator().manual_seed(5)
    a = torch.randn(300, 70, generator=g).bfloat16()
    got = column_sum(a, torch.float32)
    assert got.dtype == torch.float32 and got.shape == (70,)
    assert rel_err(got, a.double().sum(0)) < 1e-6


def test_errors_say_expected_and_got():
    with pytest.raises(ValueError, match="expects c"):
        widening_gemm.addmm_(torch.zeros(3, 4), torch.zeros(3, 5).bfloat16(), torch.zeros(6, 4).bfloat16())
    if _cpp_backends.AVAILABLE and torch.ops.flamingo_rt_C.widening_gemm_available():
        with pytest.raises(RuntimeError, match="expected a float32 c"):
            torch.ops.flamingo_rt_C.widening_addmm_(torch.zeros(3, 4).double(), torch.zeros(3, 5).bfloat16(),
                                                    torch.zeros(5, 4).bfloat16(), 1.0, 0.0)


def test_feed_forward_weight_gradients_use_it(monkeypatch):
    """The FF backward's weight-gradient accumulation (_acc_mm) goes through addmm_ when it
    runs MKL: float32-exact against float64, the accumulator updated in place."""
    import importlib

    _force_mkl(monkeypatch)
    ffm = importlib.import_module("flamingo_rt.ops.feed_forward")
    calls = []
    orig = widening_gemm.addmm_
    monkeypatch.setattr(widening_gemm, "addmm_", lambda *a, **k: calls.append(a[0].shape) or orig(*a, **k))
    g = torch.Generator().manual_seed(1)
    a = torch.randn(40, 24, generator=g).bfloat16().t()
    b = torch.randn(40, 80, generator=g).bfloat16()
    c = torch.randn(24, 80, generator=g)
    want = c.double() + a.double() @ b.double()
    got = ffm._acc_mm(c, a, b, torch.float32)
    assert got.data_ptr() == c.data_ptr() and calls == [(24, 80)]
    assert rel_err(got, want) < 1e-6


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_under_bf16_autocast_uses_it_for_the_weight_gradient(with_bias, monkeypatch):
    """flamingo_rt.ops.linear under CPU bf16 autocast with a trainable float32 weight: the
    output and the input's gradient as autocast's F.linear makes them, the weight's (and
    bias's) gradient float32-accumulated: at least as close to float64 as autocast's."""
    from flamingo_rt.ops import linear as linmod

    _force_mkl(monkeypatch)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 50, 96, generator=g)
    w0 = torch.randn(40, 96, generator=g) * 0.1
    b0 = torch.randn(40, generator=g) if with_bias else None
    go = torch.randn(3, 50, 40, generator=g)
    calls = []
    orig = linmod._AutocastBf16Linear.apply
    monkeypatch.setattr(linmod._AutocastBf16Linear, "apply", lambda *a: calls.append(1) or orig(*a))

    def run(fn):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        b = None if b0 is None else b0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x, w, b)
        grads = torch.autograd.grad(y, [x, w] + ([b] if b is not None else []), go.to(y.dtype))
        return y, grads

    y, (dx, dw, *db) = run(linmod.linear)
    assert calls == [1]
    ya, (dxa, dwa, *dba) = run(torch.nn.functional.linear)
    assert y.dtype == torch.bfloat16 and torch.equal(y, ya)
    assert dx.dtype == torch.float32 and torch.equal(dx, dxa)
    exact_dw = go.bfloat16().reshape(-1, 40).double().t() @ x0.bfloat16().double().reshape(-1, 96)
    assert dw.dtype == torch.float32 and rel_err(dw, exact_dw) < 1e-6 <= rel_err(dwa, exact_dw) + 1e-6
    assert rel_err(dw, exact_dw) <= rel_err(dwa, exact_dw)
    if with_bias:
        exact_db = go.bfloat16().double().reshape(-1, 40).sum(0)
        assert rel_err(db[0], exact_db) < 1e-6
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # no gradient: autocast's own
        calls.clear()
        linmod.linear(x0, w0.requires_grad_(), None)
        assert calls == []


@pytest.mark.parametrize("block_bytes", [None, 7 * 96 * 2])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_linear_under_bf16_autocast_with_a_frozen_weight_keeps_no_cast(with_bias, x_dtype, block_bytes, monkeypatch):
    """flamingo_rt.ops.linear under CPU bf16 autocast with a frozen float32 weight and an input
    that needs its gradient: output and input gradient bitwise autocast's F.linear, and the
    only tensor kept for the backward is the float32 parameter itself (autocast keeps its
    bf16 copy); with small cast blocks (7 of the weight's 40 rows in the forward, 16 of its
    96 columns in the backward) the same values (bitwise here; one bf16 ulp allowed)."""
    from flamingo_rt.ops import cast_blocks
    from flamingo_rt.ops import linear as linmod

    if block_bytes is not None:
        monkeypatch.setattr(cast_blocks, "BLOCK_BYTES", block_bytes)

    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 37, 96, generator=g).to(x_dtype)
    w = torch.randn(40, 96, generator=g) * 0.1
    b = torch.randn(40, generator=g) if with_bias else None
    go = torch.randn(2, 37, 40, generator=g).bfloat16()

    def run(fn):
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x, w, b)
        return y, torch.autograd.grad(y, x, go)[0]

    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = linmod.linear(x0.clone().requires_grad_(), w, b)
    assert type(kept.grad_fn).__name__ == "CastLinearBackward"
    saved = [t for t in kept.grad_fn.saved_tensors if t is not None]  # no rounded x: w is frozen
    assert len(saved) == 1 and saved[0].data_ptr() == w.data_ptr() and saved[0].dtype == torch.float32
    y, dx = run(linmod.linear)
    ya, dxa = run(torch.nn.functional.linear)
    assert y.dtype == ya.dtype == torch.bfloat16 and dx.dtype == dxa.dtype == x_dtype
    if block_bytes is None:
        assert torch.equal(y, ya) and torch.equal(dx, dxa)
    else:  # each element one dot product as before; a kernel's summation order may follow its width
        torch.testing.assert_close(y, ya, rtol=2 ** -7, atol=1e-3)
        torch.testing.assert_close(dx, dxa, rtol=2 ** -7, atol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an input without a gradient: autocast's own
        assert linmod.linear(x0, w, b).grad_fn is None
