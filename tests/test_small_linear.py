"""The small-batch linear kernel (decode projections) against the float64 reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flamingo_rt import _ext
from flamingo_rt.ops.linear import MAX_ROWS, Linear, linear
from conftest import cpu_has, rel_err

needs_ext = pytest.mark.skipif(not _ext.load(), reason="flamingo_rt._C not built")


@needs_ext
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 8e-3), (torch.float64, 1e-12)])
@pytest.mark.parametrize("B", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("N,K", [(5, 7), (33, 120), (257, 96), (1024, 130)])  # K tails 7, 24, 0, 2
def test_kernel_matches_reference(dtype, tol, B, N, K):
    x, w, b = torch.randn(B, K, dtype=dtype), torch.randn(N, K, dtype=dtype), torch.randn(N, dtype=dtype)
    want = x.double() @ w.double().t() + b.double()
    got = torch.ops.flamingo_rt_C.small_linear(x, w, b)
    assert got.dtype == dtype and got.shape == (B, N) and torch.isfinite(got).all()
    assert rel_err(got, want) < tol
    # every element (not just the norm): a row or column the kernel skipped would show here
    scale = (x.double().abs() @ w.double().abs().t() + b.double().abs()).clamp_min(1.0)
    assert ((got.double() - want).abs() / scale).max() < tol
    # no worse than torch's own linear in the same dtype (2x plus a floor)
    assert rel_err(got, want) <= 2 * rel_err(F.linear(x, w, b), want) + tol / 4
    assert rel_err(torch.ops.flamingo_rt_C.small_linear(x, w, None), x.double() @ w.double().t()) < tol


@needs_ext
def test_strided_rows_and_errors():
    w = torch.randn(64, 2 * 48)[:, ::2]  # K stride 2: rejected
    with pytest.raises(RuntimeError, match="unit stride"):
        torch.ops.flamingo_rt_C.small_linear(torch.randn(2, 48), w, None)
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        torch.ops.flamingo_rt_C.small_linear(torch.randn(17, 8), torch.randn(4, 8), None)
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.flamingo_rt_C.small_linear(torch.randn(2, 9), torch.randn(4, 8), None)
    big = torch.randn(40, 3, 32)[:, 1]  # row-strided weight (stride 96 in N): accepted
    x = torch.randn(2, 32)
    assert rel_err(torch.ops.flamingo_rt_C.small_linear(x, big, None), x.double() @ big.double().t()) < 2e-6


def test_linear_dispatch_keeps_autograd_and_shapes():
    layer = Linear(24, 40)
    x = torch.randn(2, 3, 24)
    with torch.no_grad():
        y = layer(x)  # 6 rows, no grad: the kernel (when built)
    assert y.shape == (2, 3, 40)
    assert rel_err(y, F.linear(x, layer.weight, layer.bias)) < 2e-6
    xg = torch.randn(1, 24, requires_grad=True)
    out = layer(xg)  # grads needed: F.linear
    out.sum().backward()
    assert xg.grad is not None and layer.weight.grad is not None
    many = torch.randn(MAX_ROWS + 1, 24)
    with torch.no_grad():
        assert torch.equal(layer(many), F.linear(many, layer.weight, layer.bias))
    assert isinstance(layer, torch.nn.Linear) and set(layer.state_dict()) == {"weight", "bias"}
    assert linear(torch.randn(3, 24, dtype=torch.float64), layer.weight.double()).dtype == torch.float64


@needs_ext
def test_compiled_graph_calls_the_kernel_for_static_small_rows():
    """Under torch.compile a decode-sized input (static row count <= 16) still runs the C++
    kernel, as an extern op in the graph; a larger or symbolic row count is F.linear."""
    seen = []

    def recorder(gm, example_inputs):
        seen.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    w, b = torch.randn(96, 40), torch.randn(96)
    f = torch.compile(lambda x: linear(x, w, b), backend=recorder, fullgraph=True)
    with torch.no_grad():
        x1 = torch.randn(1, 1, 40)
        torch.testing.assert_close(f(x1), F.linear(x1, w, b), rtol=1e-5, atol=1e-5)
        assert any("flamingo_rt_C.small_linear" in t for t in seen[-1]), seen[-1]
        x64 = torch.randn(64, 40)
        torch.testing.assert_close(f(x64), F.linear(x64, w, b), rtol=1e-5, atol=1e-5)
        assert not any("small_linear" in t for t in seen[-1]), seen[-1]
    # with a gradient needed the kernel is not used (it has no backward)
    x = torch.randn(1, 40, requires_grad=True)
    torch.compile(lambda x: linear(x, w, b), backend=recorder, fullgraph=True)(x).sum().backward()
    assert not any("small_linear" in t for t in seen[-1]) and x.grad is not None


def _same_sums(got, want, scale=None):
    """The bf16-weight kernel against the float32 kernel on the widened weight: the same
    products (the widening is exact) summed alike -- bit for bit where the compiler vectorizes
    both loops alike (the AVX-512 clone), else (AVX2) within float32 rounding of each other."""
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert torch.equal(got, want)
    else:
        scale = want.double().abs().clamp_min(1.0) if scale is None else scale
        assert ((got.double() - want.double()).abs() / scale).max() < 2e-6


@needs_ext
@pytest.mark.parametrize("B", [1, 2, 4, 5, 16])
@pytest.mark.parametrize("N,K", [(5, 7), (13, 40), (257, 96), (1536, 130)])
def test_bf16_weight_kernel_equals_the_widened_weight(B, N, K):
    """float32 x against a bfloat16 weight: the same products and sums as the float32 kernel on
    the widened weight (:func:`_same_sums`), float32 out, within float32 rounding of the
    float64 reference."""
    x, w, b = torch.randn(B, K), torch.randn(N, K).bfloat16(), torch.randn(N)
    got = torch.ops.flamingo_rt_C.small_linear(x, w, b)
    assert got.dtype == torch.float32 and got.shape == (B, N)
    want = x.double() @ w.double().t() + b.double()
    scale = (x.double().abs() @ w.double().abs().t() + b.double().abs()).clamp_min(1.0)
    _same_sums(got, torch.ops.flamingo_rt_C.small_linear(x, w.float(), b), scale)
    assert ((got.double() - want).abs() / scale).max() < 2e-6
    _same_sums(torch.ops.flamingo_rt_C.small_linear(x, w, None),
               torch.ops.flamingo_rt_C.small_linear(x, w.float(), None), scale)


@needs_ext
def test_bf16_weight_kernel_rejects_other_mixes():
    with pytest.raises(RuntimeError, match="float32 x with a bfloat16 w"):
        torch.ops.flamingo_rt_C.small_linear(torch.randn(2, 8).bfloat16(), torch.randn(4, 8), None)
    with pytest.raises(RuntimeError, match="float32 x with a bfloat16 w"):
        torch.ops.flamingo_rt_C.small_linear(torch.randn(2, 8).double(), torch.randn(4, 8).bfloat16(), None)
    with pytest.raises(RuntimeError, match="bias of dtype Float"):
        torch.ops.flamingo_rt_C.small_linear(torch.randn(2, 8), torch.randn(4, 8).bfloat16(),
                                             torch.randn(4).bfloat16())


@pytest.mark.parametrize("shape", [(3, 40), (2, 5, 40), (MAX_ROWS + 1, 40), (3 * MAX_ROWS + 2, 40), (0, 40)])
def test_linear_bf16_weight_any_rows(shape):
    """Any number of rows (the kernel takes 16 at a time), leading dims kept; equal to F.linear on
    the widened weight within float32 rounding, and to the float32 kernel's result as
    :func:`_same_sums` says."""
    from flamingo_rt.ops.linear import linear_bf16_weight
    x, w, b = torch.randn(*shape), torch.randn(24, 40).bfloat16(), torch.randn(24)
    with torch.no_grad():
        got = linear_bf16_weight(x, w, b)
        assert got.shape == (*shape[:-1], 24) and got.dtype == torch.float32
        torch.testing.assert_close(got, F.linear(x, w.float(), b), rtol=2e-6, atol=2e-6)
        if _ext.load() and x.numel():
            rows = x.reshape(-1, 40)
            want = torch.cat([torch.ops.flamingo_rt_C.small_linear(rows[i:i + MAX_ROWS], w.float(), b)
                              for i in range(0, rows.shape[0], MAX_ROWS)])
            _same_sums(got.reshape(-1, 24), want)
        assert torch.equal(linear_bf16_weight(x, w), linear_bf16_weight(x, w, torch.zeros(24)))


def test_linear_bf16_weight_autograd_compile_and_errors():
    from flamingo_rt.ops.linear import linear_bf16_weight
    w, b = torch.randn(24, 40).bfloat16(), torch.randn(24)
    x = torch.randn(3, 40, requires_grad=True)
    y = linear_bf16_weight(x, w, b)  # a gradient wanted: F.linear on the widened weight
    y.sum().backward()
    torch.testing.assert_close(x.grad, w.float().sum(0).expand(3, 40))
    f = torch.compile(lambda t: linear_bf16_weight(t, w, b), backend="eager", fullgraph=True)
    with torch.no_grad():
        xs = torch.randn(5, 40)
        torch.testing.assert_close(f(xs), F.linear(xs, w.float(), b), rtol=2e-6, atol=2e-6)
    with pytest.raises(TypeError, match="float32 x and a bfloat16 weight"):
        linear_bf16_weight(torch.randn(2, 40).bfloat16(), w)
    with pytest.raises(TypeError, match="float32 x and a bfloat16 weight"):
        linear_bf16_weight(torch.randn(2, 40), w.float())
    with pytest.raises(TypeError, match="float32 bias"):
        linear_bf16_weight(torch.randn(2, 40), w, b.bfloat16())


_BF16_CASES = [(1, 257, 96), (2, 64, 7), (3, 130, 1030), (5, 33, 64), (16, 300, 130)]


def _bf16_outputs(seed: int = 0):
    """small_linear on bfloat16 x (row-strided: rows of a wider tensor) and weights, the
    cases of _BF16_CASES, with and without a bias."""
    g = torch.Generator().manual_seed(seed)
    outs = []
    for B, N, K in _BF16_CASES:
        x = torch.randn(B, K + 9, generator=g).bfloat16()[:, 3:K + 3]
        w, b = torch.randn(N, K, generator=g).bfloat16(), torch.randn(N, generator=g).bfloat16()
        outs.append((x, w, b, torch.ops.flamingo_rt_C.small_linear(x, w, b),
                     torch.ops.flamingo_rt_C.small_linear(x, w, None)))
    return outs


@needs_ext
def test_bf16_dot_product_path_and_the_portable_one(tmp_path):
    """bfloat16 x and weights: the vdpbf16ps path (CPUs with AVX512_BF16) and the portable
    float32-FMA path (forced by FLAMINGO_RT_NO_AVX512_BF16=1, in a subprocess: the switch is
    read once) both equal the float64 reference within bfloat16 rounding, element by element,
    for row-strided x, K tails (7, 130, 1030: not multiples of 32) and 1..16 rows."""
    import subprocess
    import sys
    import textwrap

    here = _bf16_outputs()
    out = tmp_path / "portable.pt"
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        from flamingo_rt import _ext
        assert _ext.load()
        from test_small_linear import _bf16_outputs
        torch.save([(o[3], o[4]) for o in _bf16_outputs()], {str(out)!r})
    """)
    env = dict(__import__("os").environ, FLAMINGO_RT_NO_AVX512_BF16="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    portable = torch.load(out)
    differ = False
    for (x, w, b, got, got_nb), (p, p_nb) in zip(here, portable):
        for y, yp, bias in ((got, p, b), (got_nb, p_nb, None)):
            want = x.double() @ w.double().t() + (0 if bias is None else bias.double())
            scale = x.double().abs() @ w.double().abs().t() + (0 if bias is None else bias.double().abs())
            for v in (y, yp):
                assert v.dtype == torch.bfloat16 and v.shape == want.shape
                # float32 sums (error ~K * 2^-24 of the scale) then one bfloat16 rounding
                assert ((v.double() - want).abs() <= want.abs() * 2 ** -8 + scale * 1e-6).all()
            differ |= not torch.equal(y, yp)
    if cpu_has("avx512_bf16"):
        assert differ, "FLAMINGO_RT_NO_AVX512_BF16=1 did not switch to the portable path (equal results everywhere)"
