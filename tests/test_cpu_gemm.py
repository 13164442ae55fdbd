"""flamingo_rt.ops.cpu_gemm (float32 CPU products through oneDNN) and ops.linear's use of it.

Every product is checked against float64 under both policies (``onednn`` and ``torch``),
whatever this machine's ``auto`` picks, and the profiler shows which library ran."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from flamingo_rt import _ext
from flamingo_rt.ops import cpu_gemm, feed_forward, norm_project
from flamingo_rt.ops.linear import linear
from flamingo_rt.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

needs_onednn = pytest.mark.skipif(not cpu_gemm.available(), reason="torch built without oneDNN")
POLICIES = [pytest.param("onednn", marks=needs_onednn), "torch"]


def _ops_run(fn) -> set:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def _close(a, b, rtol=2e-5):
    b = b.to(a.dtype) if a.dtype != b.dtype else b
    scale = b.abs().max().clamp_min(1.0)
    assert (a - b).abs().max() <= rtol * scale, f"max err {(a - b).abs().max().item():.3e} vs scale {scale.item():.3e}"


def _layouts(M, K, N, g):
    """(a, b) pairs of shapes (M, K), (K, N): contiguous, transposed views, and strided slices."""
    a = torch.randn(M, K, generator=g)
    b = torch.randn(K, N, generator=g)
    yield a, b
    yield torch.randn(K, M, generator=g).t(), b  # column-major a (a weight gradient's dy^T)
    yield a, torch.randn(N, K, generator=g).t()  # b = W^T view (a forward product)
    yield torch.randn(M, 2 * K, generator=g)[:, ::2], torch.randn(K, 3 * N, generator=g)[:, N:2 * N]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("M,K,N", [(1, 7, 5), (33, 64, 17), (128, 96, 200)])
def test_mm_matches_float64_on_every_layout(policy, M, K, N):
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    for a, b in _layouts(M, K, N, g):
        with cpu_gemm.use(policy):
            out = cpu_gemm.mm(a, b)
        assert out.shape == (M, N) and out.dtype == torch.float32
        _close(out, a.double() @ b.double())


@needs_onednn
def test_mm_writes_into_a_dead_buffer_on_torchs_path():
    """mm(a, b, out=buf) is a @ b; torch's BLAS writes it into buf (no fresh tensor), and a
    buffer that does not fit (shape, dtype, layout, aliasing an operand) is left alone."""
    torch.manual_seed(0)
    a, b = torch.randn(12, 7), torch.randn(7, 9)
    want = a @ b
    with cpu_gemm.use("torch"):
        buf = torch.full((12, 9), float("nan"))
        got = cpu_gemm.mm(a, b, out=buf)
        assert got.data_ptr() == buf.data_ptr() and torch.equal(got, want)
        for bad in (torch.zeros(9, 12), torch.zeros(12, 9, dtype=torch.float64), torch.zeros(9, 12).t()):
            got = cpu_gemm.mm(a, b, out=bad)
            assert got.data_ptr() != bad.data_ptr() and torch.equal(got, want)
            assert not bad.any()  # untouched
        sq = torch.randn(7, 7)
        got = cpu_gemm.mm(sq, sq, out=sq)  # the output may not be an operand
        assert got.data_ptr() != sq.data_ptr() and torch.allclose(got, sq @ sq)
    if cpu_gemm.available():
        with cpu_gemm.use("onednn"):  # oneDNN returns its own tensor
            assert torch.allclose(cpu_gemm.mm(a, b, out=torch.empty(12, 9)), want, rtol=1e-5, atol=1e-5)


def test_mm_copies_a_large_transposed_operand_in_blocks(monkeypatch):
    """A column-major a above BLOCK_BYTES is copied and multiplied a block of rows at a time
    (here the block is shrunk to 10 rows of a (53, 40) a): same product, every row written."""
    monkeypatch.setattr(cpu_gemm, "BLOCK_BYTES", 10 * 40 * 4)
    g = torch.Generator().manual_seed(9)
    a = torch.randn(40, 53, generator=g).t()
    b = torch.randn(40, 31, generator=g)
    with cpu_gemm.use("onednn"):
        out = cpu_gemm.mm(a, b)
        assert "mkldnn::_linear_pointwise" in _ops_run(lambda: cpu_gemm.mm(a, b))
    assert out.shape == (53, 31)
    _close(out, a.double() @ b.double())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocked", [False, True])
@pytest.mark.parametrize("with_out", [False, True])
def test_low_precision_transposed_a_is_copied_to_rows(dtype, blocked, with_out, monkeypatch):
    """bf16 / fp16 ``mm`` of a column-major a with enough output columns copies a to rows
    (whole, or a block of rows at a time) before torch's product: the product of the
    copied rows exactly, every row written, ``out`` used when it fits (forced on where
    oneDNN does not run bf16 products: the mechanics are the same)."""
    monkeypatch.setattr(cpu_gemm, "ROWS_FIRST_MIN_N", 16)
    monkeypatch.setattr(cpu_gemm, "bf16_available", lambda: True)
    monkeypatch.setenv("FLAMINGO_RT_WIDEN_HALF", "0")  # torch's products, not widened ones (fp16 here)
    if blocked:
        monkeypatch.setattr(cpu_gemm, "BLOCK_BYTES", 7 * 40 * 2)  # 7 rows of a (53, 40) a per block
    g = torch.Generator().manual_seed(11)
    a = torch.randn(40, 53, generator=g).to(dtype).t()
    b = torch.randn(40, 31, generator=g).to(dtype)
    assert cpu_gemm.rows_first(a, b)
    buf = torch.full((53, 31), float("nan"), dtype=dtype) if with_out else None
    got = cpu_gemm.mm(a, b, out=buf)
    if with_out:
        assert got.data_ptr() == buf.data_ptr()
    want = torch.cat([a[r:r + 7].contiguous() @ b for r in range(0, 53, 7)]) if blocked else a.contiguous() @ b
    assert got.shape == (53, 31) and got.dtype == dtype and torch.equal(got, want)
    _close(got.float(), a.double() @ b.double(), rtol=2e-2)
    if _ext.load():
        assert "flamingo_rt_C::transpose_copy" in _ops_run(lambda: cpu_gemm.mm(a, b))


def test_rows_first_only_where_it_pays(monkeypatch):
    """Rows first: bf16 / fp16 CPU products of a transposed a with at least ROWS_FIRST_MIN_N
    output columns where oneDNN runs torch's bf16 products; not float32 (torch's / oneDNN's
    own rules), a contiguous a, fewer columns, mixed dtypes, under compile (mm is then
    torch's), or on a CPU whose bf16 products are torch's own loops (AVX2 only)."""
    n = cpu_gemm.ROWS_FIRST_MIN_N
    at = torch.randn(64, 32).bfloat16().t()
    b = torch.randn(64, n).bfloat16()
    assert cpu_gemm.rows_first(at, b) == cpu_gemm.bf16_available()
    monkeypatch.setattr(cpu_gemm, "bf16_available", lambda: False)
    assert not cpu_gemm.rows_first(at, b)
    monkeypatch.setattr(cpu_gemm, "bf16_available", lambda: True)
    assert cpu_gemm.rows_first(at, b)
    assert not cpu_gemm.rows_first(at.contiguous(), b)
    assert not cpu_gemm.rows_first(at, b[:, : n - 1])
    assert not cpu_gemm.rows_first(at.float(), b.float())
    assert not cpu_gemm.rows_first(at, b.half())
    seen = []
    compiled = torch.compile(lambda x, y: (seen.append(cpu_gemm.rows_first(x, y)), cpu_gemm.mm(x, y))[1],
                             backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(at, b), at @ b) and seen == [False]


@pytest.mark.parametrize("policy", POLICIES)
def test_linear_matches_float64_with_bias_batch_dims_and_strides(policy):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 10, 2 * 48, generator=g)[..., ::2]  # (3, 10, 48), last dim strided
    w = torch.randn(40, 48, generator=g)
    b = torch.randn(40, generator=g)
    with cpu_gemm.use(policy):
        out = cpu_gemm.linear(x, w, b)
        out_nb = cpu_gemm.linear(x.contiguous(), w)
    _close(out, F.linear(x.double(), w.double(), b.double()))
    _close(out_nb, F.linear(x.double(), w.double()))


@needs_onednn
def test_the_policy_picks_the_library(monkeypatch):
    monkeypatch.setenv("FLAMINGO_RT_WIDEN_HALF", "0")  # bf16 as torch runs it (not widened to float32)
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    with cpu_gemm.use("onednn"):
        assert cpu_gemm.onednn_active()
        assert "mkldnn::_linear_pointwise" in _ops_run(lambda: cpu_gemm.mm(a, b))
        assert "mkldnn::_linear_pointwise" in _ops_run(lambda: linear(a, b.t()))
        # Not float32, or not the CPU's float32 product: torch's own.
        assert "mkldnn::_linear_pointwise" not in _ops_run(lambda: cpu_gemm.mm(a.bfloat16(), b.bfloat16()))
        assert "mkldnn::_linear_pointwise" not in _ops_run(lambda: cpu_gemm.mm(a.double(), b.double()))
    with cpu_gemm.use("torch"):
        assert not cpu_gemm.onednn_active()
        assert "mkldnn::_linear_pointwise" not in _ops_run(lambda: cpu_gemm.mm(a, b))
        assert "mkldnn::_linear_pointwise" not in _ops_run(lambda: linear(a, b.t()))


@pytest.mark.parametrize("policy", POLICIES)
def test_empty_products(policy):
    with cpu_gemm.use(policy):
        z = cpu_gemm.mm(torch.randn(4, 0), torch.randn(0, 3))
        assert z.shape == (4, 3) and bool((z == 0).all())
        assert cpu_gemm.mm(torch.randn(0, 5), torch.randn(5, 3)).shape == (0, 3)
        assert cpu_gemm.linear(torch.randn(2, 5), torch.randn(0, 5)).shape == (2, 0)


def test_policy_errors(monkeypatch):
    monkeypatch.setenv("FLAMINGO_RT_CPU_GEMM", "mkl")
    with pytest.raises(ValueError, match=r"FLAMINGO_RT_CPU_GEMM='mkl': expected one of \('auto', 'onednn', 'torch'\)"):
        cpu_gemm.policy()
    with pytest.raises(ValueError, match="unknown CPU GEMM policy 'fast'"):
        with cpu_gemm.use("fast"):
            pass
    monkeypatch.setenv("FLAMINGO_RT_CPU_GEMM", "torch")
    assert cpu_gemm.policy() == "torch" and not cpu_gemm.onednn_active()
    with cpu_gemm.use("auto"):
        assert cpu_gemm.policy() == "auto"
    monkeypatch.setattr(cpu_gemm, "available", lambda: False)
    monkeypatch.setenv("FLAMINGO_RT_CPU_GEMM", "onednn")
    with pytest.raises(RuntimeError, match="this torch build has no oneDNN"):
        cpu_gemm.onednn_active()


def test_auto_is_onednn_only_off_intel_with_avx512(monkeypatch):
    cpu_gemm._auto.cache_clear()
    try:
        monkeypatch.setattr(cpu_gemm, "_cpu_vendor", lambda: "GenuineIntel")
        assert not cpu_gemm._auto()
        cpu_gemm._auto.cache_clear()
        monkeypatch.setattr(cpu_gemm, "_cpu_vendor", lambda: "AuthenticAMD")
        expect = (cpu_gemm.available() and torch.backends.cpu.get_cpu_capability() == "AVX512"
                  and __import__("platform").machine().lower() in ("x86_64", "amd64"))
        assert cpu_gemm._auto() == expect
    finally:
        cpu_gemm._auto.cache_clear()


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("need", ["x", "w", "xwb", "b"])
def test_linear_autograd_matches_float64(policy, need):
    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(2, 9, 24, generator=g)
    w0, b0 = torch.randn(30, 24, generator=g), torch.randn(30, generator=g)
    dy = torch.randn(2, 9, 30, generator=g)
    x, w, b = (t.clone().requires_grad_(k in need) for t, k in zip((x0, w0, b0), "xwb"))
    with cpu_gemm.use(policy):
        y = linear(x, w, b)
        y.backward(dy)
    x64, w64, b64 = (t.double().requires_grad_(k in need) for t, k in zip((x0, w0, b0), "xwb"))
    y64 = F.linear(x64, w64, b64)
    y64.backward(dy.double())
    _close(y, y64)
    for t, r, k in zip((x, w, b), (x64, w64, b64), "xwb"):
        if k in need:
            _close(t.grad, r.grad)
        else:
            assert t.grad is None


@needs_onednn
def test_linear_keeps_the_input_only_for_a_weight_gradient():
    x = torch.randn(8, 16, requires_grad=True)
    with cpu_gemm.use("onednn"):
        frozen = linear(x, torch.randn(4, 16))  # a frozen layer: only dx, from the weight
        trained = linear(x.detach(), torch.randn(4, 16, requires_grad=True))  # only dw, from x
    assert type(frozen.grad_fn).__name__ == "_CpuLinearBackward"
    kept = [t is not None for t in frozen.grad_fn.saved_tensors]
    assert kept == [False, True]
    assert [t is not None for t in trained.grad_fn.saved_tensors] == [True, False]


@needs_onednn
def test_linear_under_autocast_compile_and_vmap_is_torchs():
    x, w = torch.randn(5, 16), torch.randn(8, 16)
    with cpu_gemm.use("onednn"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            # Few rows (the small-batch kernel's range) and many: autocast's bfloat16 product.
            assert linear(x, w).dtype == torch.bfloat16
            assert linear(torch.randn(40, 16), w).dtype == torch.bfloat16
        compiled = torch.compile(lambda a, b: linear(a, b), backend="aot_eager", fullgraph=True)
        _close(compiled(x, w), x.double() @ w.double().t())
        batched = torch.func.vmap(lambda a: linear(a, w))(x[:, None].expand(5, 3, 16))
        _close(batched, (x.double() @ w.double().t())[:, None].expand(5, 3, 8))
        gx = torch.func.grad(lambda a: linear(a, w).sum())(x)
        _close(gx, w.double().sum(0).expand(5, 16))


@pytest.mark.parametrize("policy", POLICIES)
def test_fused_ops_match_their_references_under_each_policy(policy):
    """feed_forward, norm_project and linear_cross_entropy route their products through
    cpu_gemm: forward and every gradient against float64."""
    g = torch.Generator().manual_seed(5)
    D, inner, R = 32, 96, 40
    x = torch.randn(R, D, generator=g)
    gamma, beta = 1 + 0.1 * torch.randn(D, generator=g), 0.1 * torch.randn(D, generator=g)
    w1, w2 = torch.randn(inner, D, generator=g) / 6, torch.randn(D, inner, generator=g) / 10
    wk = [torch.randn(48, D, generator=g) / 6 for _ in range(2)]
    head = torch.randn(50, D, generator=g) / 6
    targets = torch.randint(0, 50, (R,), generator=g)
    targets[::7] = -100

    def run(dtype, fused):
        ps = [t.to(dtype).requires_grad_() for t in (x, gamma, beta, w1, w2, *wk, head)]
        xx, ga, be, a1, a2, k0, k1, hd = ps
        if fused:
            y = feed_forward(xx, ga, be, a1, a2)
            kv = norm_project(xx, [ga, ga], [be, be], [k0, k1])
            loss = linear_cross_entropy(y, hd, targets)
        else:
            ln = F.layer_norm(xx, (D,), ga, be, 1e-5)
            y = F.linear(F.gelu(F.linear(ln, a1)), a2)
            kv = [F.linear(ln, k0), F.linear(ln, k1)]
            loss = linear_cross_entropy_reference(y, hd, targets)
        total = loss + sum((t * t).sum() for t in kv) * 1e-2
        grads = torch.autograd.grad(total, ps)
        return [y, *kv, loss, *grads]

    with cpu_gemm.use(policy):
        got = run(torch.float32, True)
    want = run(torch.float64, False)
    for a, b in zip(got, want):
        _close(a, b, rtol=5e-5)


needs_ext = pytest.mark.skipif(not __import__("flamingo_rt._ext", fromlist=["load"]).load(),
                               reason="flamingo_rt._C not built")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int16, torch.int64])
@pytest.mark.parametrize("R,C", [(1, 1), (63, 65), (130, 7), (200, 300), (1024, 96)])
def test_transpose_copy_equals_torch_on_every_stride(dtype, R, C):
    g = torch.Generator().manual_seed(R * C)
    n = max(R, C)
    base = (torch.randn(2 * n + 3, 2 * n + 5, generator=g) * 100).to(dtype)
    sources = [base[:R, :C], base[:C, :R].t(), base[1:2 * R + 1:2, 3:3 + 2 * C:2], base[:R, :C].contiguous()]
    for a in sources:
        out = torch.ops.flamingo_rt_C.transpose_copy(a)
        assert out.is_contiguous() and out.shape == (C, R) and out.dtype == dtype
        assert torch.equal(out, a.t().contiguous())
        assert torch.equal(cpu_gemm.transpose_rows(a.t()), a.t().contiguous())


@needs_ext
def test_transpose_copy_edges_and_errors():
    tc = torch.ops.flamingo_rt_C.transpose_copy
    assert tc(torch.empty(0, 5)).shape == (5, 0) and tc(torch.empty(4, 0)).shape == (0, 4)
    with pytest.raises(RuntimeError, match=r"transpose_copy: expected a 2-D tensor, got 3 dims"):
        tc(torch.zeros(2, 3, 4))
    with pytest.raises(RuntimeError, match=r"expected 2-, 4- or 8-byte elements, got Byte"):
        tc(torch.zeros(2, 3, dtype=torch.uint8))
    torch.library.opcheck(tc, (torch.randn(37, 21).t(),))


@needs_onednn
def test_tensor_subclasses_take_torchs_path():
    """A subclass (here a minimal __torch_function__ one, as DTensor is one) never reaches
    the oneDNN op, which subclasses have no rules for."""
    class Tagged(torch.Tensor):
        pass

    a = torch.randn(32, 16).as_subclass(Tagged)
    w = torch.randn(8, 16)
    with cpu_gemm.use("onednn"):
        assert "mkldnn::_linear_pointwise" not in _ops_run(lambda: linear(a, w))
        assert "mkldnn::_linear_pointwise" not in _ops_run(lambda: cpu_gemm.mm(w, a.t()))
        _close(linear(a, w).as_subclass(torch.Tensor), a.as_subclass(torch.Tensor).double() @ w.double().t())
        assert "mkldnn::_linear_pointwise" in _ops_run(lambda: linear(torch.nn.Parameter(a.as_subclass(torch.Tensor)), w))


def test_use_is_per_thread():
    import threading

    seen = {}
    with cpu_gemm.use("torch"):
        t = threading.Thread(target=lambda: seen.setdefault("other", cpu_gemm.policy()))
        t.start()
        t.join()
        seen["this"] = cpu_gemm.policy()
    assert seen["this"] == "torch"
    assert seen["other"] == cpu_gemm.policy()  # the other thread saw the environment's policy


@pytest.mark.parametrize("rows,most,want", [(1024, 1020, 512), (1024, 1024, 1024), (5, 2, 2), (7, 3, 3), (9, 3, 3),
                                            (10, 3, 3), (1, 0, 1), (0, 8, 1), (4112, 1000, 823)])
def test_block_rows_balanced(rows, most, want):
    """The fewest blocks of at most ``most`` rows, of equal size but the last."""
    got = cpu_gemm.block_rows(rows, most)
    assert got == want
    if rows:
        n = -(-rows // got)
        assert got <= max(1, most) and n == -(-rows // max(1, most))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("block", [None, 7 * 40 * 4])  # whole, or a transposed a in blocks of 7 rows
def test_mm_add_matches_float64_and_runs_on_onednn(policy, block, monkeypatch):
    """c + a @ b on every layout of a and b, whole and with a transposed a copied in blocks
    (the accumulator's rows added block by block); on oneDNN the add is the product's post-op
    (the profiler shows its op and no addmm); c itself is not modified."""
    if block is not None:
        monkeypatch.setattr(cpu_gemm, "BLOCK_BYTES", block)
    g = torch.Generator().manual_seed(11)
    for a, b in _layouts(53, 40, 29, g):
        c = torch.randn(53, 29, generator=g)
        c0 = c.clone()
        with cpu_gemm.use(policy):
            out = cpu_gemm.mm_add(c, a, b)
            ran = _ops_run(lambda: cpu_gemm.mm_add(c, a, b))
        assert out.shape == (53, 29) and torch.equal(c, c0)
        _close(out, c.double() + a.double() @ b.double())
        if policy == "onednn":
            assert "mkldnn::_linear_pointwise" in ran and "aten::addmm" not in ran, ran


def test_mm_add_other_dtypes_and_errors():
    g = torch.Generator().manual_seed(12)
    a, b, c = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((6, 5), (5, 4), (6, 4)))
    _close(cpu_gemm.mm_add(c, a, b), c + a @ b, rtol=1e-12)  # float64: torch.addmm
    ab, bb, cb = a.bfloat16(), b.bfloat16(), c.bfloat16()
    assert cpu_gemm.mm_add(cb, ab, bb).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="expected c of shape"):
        cpu_gemm.mm_add(c[:, :3], a, b)
    with pytest.raises(ValueError, match="expected c of shape"):
        cpu_gemm.mm_add(c.float(), a, b)


def test_half_products_slow_names_the_cpus_without_half_kernels(monkeypatch):
    """bf16 products are slow exactly where oneDNN runs none (torch's reference loops: an
    AVX2-only CPU); never for float32 or off the CPU. There flamingo_rt's products run widened
    to float32 (ops.half_widening), so the warning (once per caller and dtype, saying what was
    asked and what to do) is given only with FLAMINGO_RT_WIDEN_HALF=0; load_pretrained and the
    Trainer give it."""
    import warnings

    assert not cpu_gemm.half_products_slow("cpu", torch.float32)
    assert not cpu_gemm.half_products_slow("meta", torch.bfloat16)
    assert cpu_gemm.half_products_slow("cpu", torch.bfloat16) == (not cpu_gemm.bf16_available())
    monkeypatch.setattr(cpu_gemm, "bf16_available", lambda: False)
    monkeypatch.setattr(cpu_gemm, "_WARNED_SLOW", set())
    monkeypatch.delenv("FLAMINGO_RT_WIDEN_HALF", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not cpu_gemm.warn_if_half_products_slow("cpu", torch.bfloat16, "asked here")  # widened
    monkeypatch.setenv("FLAMINGO_RT_WIDEN_HALF", "0")
    with pytest.warns(RuntimeWarning, match=r"asked here: bfloat16 matrix products .*FLAMINGO_RT_WIDEN_HALF=0 keeps "
                                            r"them there; unset it .* or use float32 here"):
        assert cpu_gemm.warn_if_half_products_slow("cpu", torch.bfloat16, "asked here")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_gemm.warn_if_half_products_slow("cpu", torch.bfloat16, "asked here")  # once
    monkeypatch.setattr(cpu_gemm, "bf16_available", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not cpu_gemm.warn_if_half_products_slow("cpu", torch.bfloat16, "elsewhere")


def test_load_pretrained_warns_about_slow_bf16(monkeypatch, tmp_path):
    from flamingo_rt.io.pretrained import load_pretrained, save_pretrained
    from flamingo_rt.models.config import get_preset
    from flamingo_rt.models.flamingo import Flamingo

    monkeypatch.setattr(cpu_gemm, "bf16_available", lambda: False)
    monkeypatch.setattr(cpu_gemm, "_WARNED_SLOW", set())
    torch.manual_seed(0)
    save_pretrained(Flamingo(get_preset("tiny")), tmp_path / "m")
    with warnings.catch_warnings():  # by default its products run widened to float32: no warning
        warnings.simplefilter("error")
        load_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    monkeypatch.setenv("FLAMINGO_RT_WIDEN_HALF", "0")
    with pytest.warns(RuntimeWarning, match=r"load_pretrained\(dtype=torch.bfloat16\): bfloat16 matrix products"):
        model, _ = load_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
