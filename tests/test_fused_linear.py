"""flamingo_rt.ops.fused_linear: inference linears with the activation / residual add as
oneDNN post-ops, against the plain expressions in float64 (the specification), the fused path
taken where it should be and nowhere else, and the models' inference paths through it."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from flamingo_rt.ops import cpu_gemm
from flamingo_rt.ops import fused_linear as fl
from flamingo_rt.models.ff import FeedForward
from conftest import rel_err

needs_onednn = pytest.mark.skipif(
    not cpu_gemm.bf16_available(),
    reason="oneDNN runs no bf16 products here (a CPU without AVX-512 bf16 support, or torch without oneDNN)")


def _case(rows=48, k=40, n=72, dtype=torch.bfloat16, bias=True):
    g = torch.Generator().manual_seed(rows * 1000 + k)
    x = torch.randn(2, rows // 2, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    r = torch.randn(2, rows // 2, n, generator=g).to(dtype)
    return x, w, b, r


def _ref_linear(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts calls of the fused oneDNN primitives: those with a post-op. A call with the
    post-op "none" is a plain product (cpu_gemm's float32 product where the policy sends
    float32 to oneDNN, as on AMD CPUs with AVX-512; linear_packed), not a fused epilogue."""
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    class Spy:
        def __call__(self, *a, **k):
            attr = a[3] if len(a) > 3 else k.get("attr")
            if attr != "none":
                calls.append("act")
            return real(*a, **k)

        def binary(self, *a, **k):
            calls.append("add")
            return real.binary(*a, **k)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", Spy())
    return calls


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_linear_act_bf16_fused_matches_float64(fused_calls, act, bias):
    """bf16 inference: one fused primitive; within bf16 rounding of the float64 expression and
    no less accurate than the unfused ops (the epilogue sees the float32 accumulator)."""
    x, w, b, _ = _case(bias=bias)
    with torch.no_grad():
        got = fl.linear_act(x, w, b, act)
    assert fused_calls == ["act"]
    ref_fn = F.gelu if act == "gelu" else F.relu
    want = ref_fn(_ref_linear(x, w, b))
    unfused = ref_fn(F.linear(x, w, b))
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert rel_err(got, want) < 8e-3
    assert rel_err(got, want) <= rel_err(unfused, want) * 1.05 + 1e-6


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_linear_residual_bf16_fused_matches_float64(fused_calls, bias):
    x, w, b, r = _case(bias=bias)
    with torch.no_grad():
        got = fl.linear_residual(x, w, b, r)
    assert fused_calls == ["add"]
    want = r.double() + _ref_linear(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == r.shape
    assert rel_err(got, want) < 8e-3
    assert rel_err(got, want) <= rel_err(r + F.linear(x, w, b), want) * 1.05 + 1e-6


@needs_onednn
def test_float32_fused_only_under_the_onednn_policy(fused_calls):
    """float32: fused where float32 products go to oneDNN, else torch's product and the
    separate ops; the same values within float32 rounding either way."""
    x, w, b, r = _case(dtype=torch.float32)
    want_act = F.gelu(_ref_linear(x, w, b))
    want_res = r.double() + _ref_linear(x, w, b)
    with torch.no_grad():
        with cpu_gemm.use("torch"):
            a0, r0 = fl.linear_act(x, w, b, "gelu"), fl.linear_residual(x, w, b, r)
        assert fused_calls == []
        with cpu_gemm.use("onednn"):
            a1, r1 = fl.linear_act(x, w, b, "gelu"), fl.linear_residual(x, w, b, r)
        assert fused_calls == ["act", "add"]
    for got, want in ((a0, want_act), (a1, want_act), (r0, want_res), (r1, want_res)):
        assert got.dtype == torch.float32 and rel_err(got, want) < 1e-5


@needs_onednn
def test_not_fused_with_gradients_decode_rows_or_other_dtypes(fused_calls):
    """A gradient to take, <= 16 rows (the small-batch decode kernel) or float16 / float64:
    the unfused ops, differentiable, equal to the plain expressions."""
    x, w, b, r = _case()
    xg = x.float().requires_grad_()
    wf, bf_, rf = w.float(), b.float(), r.float()
    y = fl.linear_act(xg, wf, bf_, "gelu")
    z = fl.linear_residual(xg, wf, bf_, rf)
    (y.sum() + z.sum()).backward()
    assert fused_calls == []
    xd = xg.detach().double().requires_grad_()
    (F.gelu(F.linear(xd, wf.double(), bf_.double())).sum()
     + (rf.double() + F.linear(xd, wf.double(), bf_.double())).sum()).backward()
    assert rel_err(xg.grad, xd.grad) < 1e-5
    xs = x[:1, :8]  # 8 rows
    with torch.no_grad():
        small = fl.linear_act(xs, w, b, "gelu")
        for dt in (torch.float16, torch.float64):
            fl.linear_residual(x.to(dt), w.to(dt), b.to(dt), r.to(dt))
    assert fused_calls == []
    assert rel_err(small, F.gelu(_ref_linear(xs, w, b))) < 8e-3


def test_linear_act_rejects_unknown_activation():
    x, w, b, _ = _case(dtype=torch.float32)
    with pytest.raises(ValueError, match="gelu"):
        fl.linear_act(x, w, b, "tanh")


def test_linear_residual_broadcast_residual_is_not_fused(fused_calls):
    """A residual that only broadcasts to the output takes the unfused add (same values)."""
    x, w, b, r = _case()
    r1 = r[:1]
    with torch.no_grad():
        got = fl.linear_residual(x, w, b, r1)
    assert fused_calls == []
    assert rel_err(got, r1.double() + _ref_linear(x, w, b)) < 8e-3


@pytest.mark.parametrize("kind", ["gelu", "sqrelu"])
def test_feed_forward_inference_equals_training_path(kind):
    """FeedForward (bf16 weights): inference through the fused linears (forward and
    forward_residual) agrees with the differentiable path within bf16 rounding, and with
    float64; forward_residual is x + forward(x)."""
    torch.manual_seed(0)
    ff = FeedForward(64, 4, kind)
    with torch.no_grad():
        ff.norm.weight.normal_(1.0, 0.1)
        ff.norm.bias.normal_(0.0, 0.1)
    x = torch.randn(3, 20, 64)
    ff64 = copy.deepcopy(ff).double()
    want = ff64(x.double())
    ff16, x16 = copy.deepcopy(ff).to(torch.bfloat16), x.bfloat16()
    with torch.no_grad():
        got = ff16(x16)
        got_res = ff16.forward_residual(x16)
    train = ff16(x16.requires_grad_())  # the differentiable path
    assert rel_err(got, want) < 2e-2 and rel_err(train.detach(), want) < 2e-2
    assert rel_err(got_res, x.double() + want) < 1e-2


@needs_onednn
def test_flop_counter_counts_fused_products_as_the_matmul():
    """torch's FlopCounterMode (the benches' GFLOP/s) counts both oneDNN overloads -- the
    activation one and the binary add (x, other, w, ...) -- as the 2*M*K*N of the product,
    as it counts cpu_gemm.mm_add's binary product under the oneDNN policy."""
    from torch.utils.flop_counter import FlopCounterMode

    x, w, b, r = _case()
    want = 2 * 48 * 40 * 72

    def flops(fn):
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops()

    with torch.no_grad():
        assert flops(lambda: fl.linear_act(x, w, b, "gelu")) == want
        assert flops(lambda: fl.linear_residual(x, w, b, r)) == want
        c = torch.zeros(48, 72)
        with cpu_gemm.use("onednn"):
            assert flops(lambda: cpu_gemm.mm_add(c, x.float().reshape(48, 40), w.float().t())) == want


# ------------------------------------------------------------------ packed weights


@pytest.fixture
def reorders(monkeypatch):
    """Counts the weight packings (oneDNN reorders) and starts from an empty cache with the
    default budget."""
    calls = []
    real = torch.ops.mkldnn._reorder_linear_weight

    class Spy:
        def __call__(self, *a, **k):
            calls.append(tuple(a[0].shape))
            return real(*a, **k)

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", Spy())
    monkeypatch.setattr(fl, "PACK_BUDGET_BYTES", 1 << 30)
    fl.clear_packed()
    yield calls
    fl.clear_packed()


@needs_onednn
@pytest.mark.parametrize("op", ["act", "residual", "plain"])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_weight_bitwise_the_unpacked_product(reorders, monkeypatch, op, bias):
    """The packed weight gives bitwise the unpacked primitive's output (bf16 inference), is
    made once for the weight and reused by the next calls."""
    x, w, b, r = _case(rows=64, k=96, n=160, bias=bias)
    run = {"act": lambda: fl.linear_act(x, w, b, "gelu"), "residual": lambda: fl.linear_residual(x, w, b, r),
           "plain": lambda: fl.linear_packed(x, w, b)}[op]
    with torch.no_grad():
        monkeypatch.setattr(fl, "PACK_BUDGET_BYTES", 0)
        want = run()
        assert reorders == [] and fl.packed_bytes() == 0
        monkeypatch.setattr(fl, "PACK_BUDGET_BYTES", 1 << 30)
        got = [run() for _ in range(3)]
    assert reorders == [(160, 96)] and fl.packed_bytes() == w.numel() * 2
    for g in got:
        assert torch.equal(g, want)
    ref = {"act": F.gelu(_ref_linear(x, w, b)), "residual": r.double() + _ref_linear(x, w, b),
           "plain": _ref_linear(x, w, b)}[op]
    assert rel_err(want, ref) < 8e-3


@needs_onednn
def test_packed_weight_follows_in_place_updates_and_new_storage(reorders):
    """An in-place update of the weight (a training step, load_state_dict) or new storage
    (``.data =``) is seen: the weight is packed again and the product uses the new values."""
    x, w, b, _ = _case(rows=64, k=96, n=160)
    lin = torch.nn.Linear(96, 160).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
        y0 = fl.linear_packed(x, lin.weight, lin.bias)
        lin.weight.mul_(2)
        y1 = fl.linear_packed(x, lin.weight, lin.bias)
        lin.weight.data = w.clone() * 3
        y2 = fl.linear_packed(x, lin.weight, lin.bias)
    assert len(reorders) == 3
    assert fl.packed_bytes() == w.numel() * 2  # the stale copies were dropped
    for got, scale in ((y0, 1), (y1, 2), (y2, 3)):
        assert rel_err(got, _ref_linear(x, w * scale, b)) < 8e-3


@needs_onednn
def test_packing_stays_within_the_budget_and_goes_with_the_weight(reorders, monkeypatch):
    """Weights past the budget run unpacked (same values); a packed copy is dropped with its
    weight; budget 0 packs nothing; inference tensors (no version counter) are not packed."""
    import gc

    x, w, b, _ = _case(rows=64, k=96, n=160)
    w2 = w.clone()
    monkeypatch.setattr(fl, "PACK_BUDGET_BYTES", w.numel() * 2 + 10)  # room for one
    with torch.no_grad():
        y = fl.linear_packed(x, w, b)
        y2 = fl.linear_packed(x, w2, b)
    assert reorders == [(160, 96)] and torch.equal(y, y2)
    del w
    gc.collect()
    assert fl.packed_bytes() == 0
    with torch.no_grad():
        fl.linear_packed(x, w2, b)
    assert len(reorders) == 2
    with torch.inference_mode():
        wi = w2.clone()
        yi = fl.linear_packed(x, wi, b)
    assert len(reorders) == 2 and torch.equal(yi, y)


@needs_onednn
def test_linear_packed_with_gradients_is_the_differentiable_linear(reorders):
    """With a gradient to take linear_packed is linear.linear: nothing packed, gradients
    equal to F.linear's."""
    x, w, b, _ = _case(rows=64, k=96, n=160, dtype=torch.float32)
    xg = x.clone().requires_grad_()
    wg = w.clone().requires_grad_()
    fl.linear_packed(xg, wg, b).square().sum().backward()
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    F.linear(xd, wd, b.double()).square().sum().backward()
    assert reorders == []
    assert rel_err(xg.grad, xd.grad) < 1e-5 and rel_err(wg.grad, wd.grad) < 1e-5


@needs_onednn
def test_resampler_bf16_inference_packs_its_weights_bitwise(reorders, monkeypatch):
    """The resampler's bf16 forward in bf16 weights packs its query, key/value (the folded
    feature projections too), output and FF weights once, and is bitwise its unpacked forward."""
    from flamingo_rt.models.config import ResamplerConfig
    from flamingo_rt.models.resampler import PerceiverResampler

    torch.manual_seed(0)
    m = PerceiverResampler(ResamplerConfig(dim=64, depth=2, heads=2, dim_head=32, num_latents=16)).to(torch.bfloat16)
    x = torch.randn(1, 3, 1, 20, 64).to(torch.bfloat16)
    with torch.no_grad():
        monkeypatch.setattr(fl, "PACK_BUDGET_BYTES", 0)
        want = m(x)
        monkeypatch.setattr(fl, "PACK_BUDGET_BYTES", 1 << 30)
        got = m(x)
        n = len(reorders)
        again = m(x)
    # per layer: to_q, to_kv, the folded feature K/V weight, to_out, fc1, fc2
    assert n == 2 * 6 and len(reorders) == n
    assert torch.equal(got, want) and torch.equal(again, want)


# ------------------------------------------------------------------ MKL-packed float32 weights

needs_mkl = pytest.mark.skipif(not fl._mkl_available(), reason="this torch build has no MKL packed linear")


@pytest.fixture
def mkl_packs(monkeypatch):
    """Counts MKL weight packings, (rows, shape) each; an empty cache, the default budget,
    the torch float32 policy (MKL products) and no size bound (small test weights)."""
    calls = []
    real = torch.ops.mkl._mkl_reorder_linear_weight

    class Spy:
        def __call__(self, w, rows):
            calls.append((rows, tuple(w.shape)))
            return real(w, rows)

    monkeypatch.setattr(torch.ops.mkl, "_mkl_reorder_linear_weight", Spy())
    monkeypatch.setattr(fl, "PACK_BUDGET_BYTES", 1 << 30)
    monkeypatch.setattr(fl, "MKL_MAX_GROWTH", 1e9)
    monkeypatch.setenv("FLAMINGO_RT_MKL_PACK", "1")  # (auto: Intel CPUs only)
    fl.clear_packed()
    with cpu_gemm.use("torch"):
        yield calls
    fl.clear_packed()


@needs_mkl
@pytest.mark.parametrize("op", ["act", "residual", "plain"])
def test_float32_inference_reads_an_mkl_packed_weight(mkl_packs, op):
    """float32 inference products (torch's policy: MKL) read the weight packed once by MKL
    for their row count, with the float64 expression's values."""
    x, w, b, r = _case(rows=64, k=96, n=160, dtype=torch.float32)
    run = {"act": lambda: fl.linear_act(x, w, b, "gelu"), "residual": lambda: fl.linear_residual(x, w, b, r),
           "plain": lambda: fl.linear_packed(x, w, b)}[op]
    want = {"act": F.gelu(_ref_linear(x, w, b)), "residual": r.double() + _ref_linear(x, w, b),
            "plain": _ref_linear(x, w, b)}[op]
    with torch.no_grad():
        got = [run() for _ in range(3)]
    assert mkl_packs == [(64, (160, 96))] and fl.packed_bytes() > 0
    for g in got:
        assert g.dtype == torch.float32 and g.shape == want.shape and rel_err(g, want) < 1e-6
    fl.clear_packed()
    assert fl.packed_bytes() == 0


@needs_mkl
def test_mkl_packing_one_row_count_updates_and_where_it_is_not_used(mkl_packs, monkeypatch):
    """One row count packed per weight (other counts run unpacked, the same values); an
    in-place update packs again; no packing with gradients, under autocast, for decode rows
    or under the oneDNN policy."""
    x, w, b, _ = _case(rows=64, k=96, n=160, dtype=torch.float32)
    x2 = torch.cat([x, x], 1)  # 128 rows
    lin = torch.nn.Linear(96, 160)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
        y64 = fl.linear_packed(x, lin.weight, lin.bias)
        y128 = fl.linear_packed(x2, lin.weight, lin.bias)
        assert mkl_packs == [(64, (160, 96))]
        assert rel_err(y128, _ref_linear(x2, w, b)) < 1e-6 and rel_err(y64, _ref_linear(x, w, b)) < 1e-6
        lin.weight.mul_(2)
        y = fl.linear_packed(x, lin.weight, lin.bias)
        assert len(mkl_packs) == 2 and rel_err(y, _ref_linear(x, 2 * w, b)) < 1e-6
    # not packed: a gradient to take, autocast, decode rows, oneDNN's policy
    fl.clear_packed()
    mkl_packs.clear()
    fl.linear_packed(x, w.clone().requires_grad_(), b)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fl.linear_packed(x, w, b)
        fl.linear_packed(x[:, :1], w, b)
        with cpu_gemm.use("onednn"):
            fl.linear_packed(x, w, b)
    assert mkl_packs == []


@needs_mkl
def test_mkl_packing_on_intel_cpus_by_default(mkl_packs, monkeypatch):
    """FLAMINGO_RT_MKL_PACK=auto packs on Intel CPUs only (on an AMD EPYC the packed products
    ran no faster and the forwards slower); 1 / 0 force it; other values are an error. The
    values are the plain product's either way."""
    x, w, b, _ = _case(rows=64, k=96, n=160, dtype=torch.float32)
    monkeypatch.setenv("FLAMINGO_RT_MKL_PACK", "auto")
    for vendor, packs in (("GenuineIntel", True), ("AuthenticAMD", False)):
        monkeypatch.setattr(cpu_gemm, "intel_cpu", lambda v=vendor: v == "GenuineIntel")
        fl.clear_packed()
        mkl_packs.clear()
        with torch.no_grad():
            y = fl.linear_packed(x, w, b)
        assert bool(mkl_packs) == packs == fl.mkl_packing_active(), vendor
        assert rel_err(y, _ref_linear(x, w, b)) < 1e-6
    monkeypatch.setenv("FLAMINGO_RT_MKL_PACK", "1")
    assert fl.mkl_packing_active()
    monkeypatch.setenv("FLAMINGO_RT_MKL_PACK", "0")
    monkeypatch.setattr(cpu_gemm, "intel_cpu", lambda: True)
    assert not fl.mkl_packing_active()
    monkeypatch.setenv("FLAMINGO_RT_MKL_PACK", "sometimes")
    with pytest.raises(ValueError, match="FLAMINGO_RT_MKL_PACK"):
        fl.mkl_packing_active()


@needs_mkl
def test_mkl_packing_skips_weights_it_would_pad_heavily(mkl_packs, monkeypatch):
    """A weight whose packed copy would be more than MKL_MAX_GROWTH times its size is not
    kept packed, and not packed again at the next call."""
    monkeypatch.setattr(fl, "MKL_MAX_GROWTH", 1.5)  # the default bound
    x, w, b, _ = _case(rows=64, k=96, n=160, dtype=torch.float32)  # MKL pads it ~100x
    with torch.no_grad():
        ys = [fl.linear_packed(x, w, b) for _ in range(3)]
    assert mkl_packs == [(64, (160, 96))] and fl.packed_bytes() == 0
    assert all(rel_err(y, _ref_linear(x, w, b)) < 1e-6 for y in ys)
