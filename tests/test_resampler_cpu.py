"""The C++ CPU backend of resampler_attention (the image-causal kernel reading the feature
and the latent keys from their own tensors, no concatenation) vs the float64 reference
(DESIGN.md section 3)."""
from __future__ import annotations

import pytest
import torch

from flamingo_rt.ops import _cpp_backends, resampler_attention
from flamingo_rt.ops.reference import resampler as ref

pytestmark = pytest.mark.skipif(not _cpp_backends.AVAILABLE, reason="flamingo_rt._C not built")


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(n, L, S, H, dh, dtype, noncontig):
    """q, k_x, v_x, k_l, v_l; non-contiguous ones are views of a fused [K | V] projection
    output, as the resampler makes them."""
    q = 2 * torch.randn(n, L, H, dh)
    if noncontig:
        k_x, v_x = torch.randn(n, S, 2, H, dh).unbind(2)
        k_l, v_l = torch.randn(n, L, 2, H, dh).unbind(2)
    else:
        k_x, v_x = torch.randn(n, S, H, dh), torch.randn(n, S, H, dh)
        k_l, v_l = torch.randn(n, L, H, dh), torch.randn(n, L, H, dh)
    return [t.to(dtype).requires_grad_() for t in (q, k_x, v_x, k_l, v_l)]


CASES = [  # n, L, S, H, dh
    (3, 8, 1, 2, 64),
    (2, 16, 49, 2, 96),
    (4, 64, 257, 2, 64),
    (1, 5, 300, 1, 128),
]


@pytest.mark.parametrize("case", CASES, ids=[f"S{c[2]}-dh{c[4]}" for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("noncontig", [False, True])
def test_against_float64_reference(case, dtype, noncontig):
    xs = _inputs(*case, dtype, noncontig)
    out = resampler_attention(*xs, backend="cpu")
    go = torch.randn(out.shape).to(dtype)
    grads = torch.autograd.grad(out, xs, go)
    d = [t.detach().double() for t in xs]
    want = ref.resampler_attention(*d)
    want_g = ref.resampler_attention_backward(go.double(), *d)
    assert out.dtype == dtype and torch.isfinite(out).all()
    for g, x in zip(grads, xs):
        assert g.shape == x.shape and g.dtype == dtype and torch.isfinite(g).all()
    if dtype == torch.float32:
        assert rel_err(out, want) < 2e-6
        for g, w in zip(grads, want_g):
            assert rel_err(g, w) < 1e-5
    else:  # within 2x (grads 3x) of the same-dtype reference's own error, + a floor
        base = ref.resampler_attention(*[t.detach() for t in xs])
        base_g = ref.resampler_attention_backward(go, *[t.detach() for t in xs])
        assert rel_err(out, want) <= 2 * rel_err(base, want) + 2e-3
        for g, w, bg in zip(grads, want_g, base_g):
            assert rel_err(g, w) <= 3 * rel_err(bg, w) + 4e-3


@pytest.mark.parametrize("strided", ["keys", "values", "latents"])
def test_mixed_layouts_some_read_in_place_some_copied(strided):
    """float32 keys / values / latent rows with a unit element stride are read in place; one
    tensor with a non-unit element stride (here a transposed (dh, H) pair) is copied: the
    products then see runs of rows split differently for keys and values."""
    torch.manual_seed(3)
    n, L, S, H, dh = 3, 40, 70, 2, 64
    xs = [torch.randn(n, L, H, dh) * 2] + [torch.randn(n, r, H, dh) for r in (S, S, L, L)]
    pick = {"keys": 1, "values": 2, "latents": 4}[strided]
    xs[pick] = xs[pick].transpose(2, 3).contiguous().transpose(2, 3)
    assert xs[pick].stride(3) != 1
    xs = [t.requires_grad_() for t in xs]
    out = resampler_attention(*xs, backend="cpu")
    go = torch.randn(out.shape)
    grads = torch.autograd.grad(out, xs, go)
    d = [t.detach().double() for t in xs]
    assert rel_err(out, ref.resampler_attention(*d)) < 2e-6
    for g, w in zip(grads, ref.resampler_attention_backward(go.double(), *d)):
        assert rel_err(g, w) < 1e-5


def test_gradcheck_cpu_backend_and_auto_picks_it():
    from flamingo_rt.ops import backend as be

    assert be.resolve("resampler_attention", "auto", torch.device("cpu")) == "cpu"
    xs = [t.detach().double().requires_grad_() for t in _inputs(2, 3, 5, 2, 4, torch.float32, True)]
    assert torch.autograd.gradcheck(lambda *t: resampler_attention(*t, backend="cpu"), xs)


def test_fp16_falls_back_to_reference():
    xs = _inputs(2, 4, 7, 2, 8, torch.float16, False)
    out = resampler_attention(*xs, backend="cpu")
    want = ref.resampler_attention(*[t.detach().float() for t in xs])
    assert out.dtype == torch.float16 and rel_err(out, want) < 2e-3


def test_ops_read_features_and_latents_in_place_and_pass_opcheck():
    """The C++ ops take k_x/v_x and k_l/v_l as they are (strided views of the fused K|V
    projections, no copies) and match the float64 reference; their schema and fake kernels
    agree with the real ones (opcheck)."""
    OP = torch.ops.flamingo_rt_C
    q, k_x, v_x, k_l, v_l = [t.detach() for t in _inputs(3, 8, 21, 2, 64, torch.float32, True)]
    assert not k_x.is_contiguous() and not k_l.is_contiguous()
    out = OP.resampler_attention(q, k_x, v_x, k_l, v_l, 0.125)
    want = ref.resampler_attention(*[t.double() for t in (q, k_x, v_x, k_l, v_l)], scale=0.125)
    assert rel_err(out, want) < 2e-6
    go = torch.randn(q.shape)
    grads = OP.resampler_attention_backward(go, q, k_x, v_x, k_l, v_l, 0.125)
    want_g = ref.resampler_attention_backward(go.double(), *[t.double() for t in (q, k_x, v_x, k_l, v_l)], scale=0.125)
    for g, w, x in zip(grads, want_g, (q, k_x, v_x, k_l, v_l)):
        assert g.shape == x.shape and rel_err(g, w) < 1e-5
    for args in ((q, k_x, v_x, k_l, v_l, 0.125), (go, q, k_x, v_x, k_l, v_l, 0.125)):
        name = "resampler_attention" if len(args) == 6 else "resampler_attention_backward"
        torch.library.opcheck(getattr(OP, name), args, test_utils=("test_schema", "test_faketensor"))


def test_latents_only_and_errors():
    """S = 0 (keys from the latents alone) works; mismatched shapes are refused with the
    expected and the received shapes."""
    OP = torch.ops.flamingo_rt_C
    q, k_x, v_x, k_l, v_l = [t.detach() for t in _inputs(2, 4, 0, 2, 16, torch.float32, False)]
    out = OP.resampler_attention(q, k_x, v_x, k_l, v_l, 0.25)
    want = ref.resampler_attention(*[t.double() for t in (q, k_x, v_x, k_l, v_l)], scale=0.25)
    assert rel_err(out, want) < 2e-6
    dq, dkx, dvx, dkl, dvl = OP.resampler_attention_backward(torch.randn(q.shape), q, k_x, v_x, k_l, v_l, 0.25)
    assert dkx.shape == k_x.shape and dkl.shape == k_l.shape and torch.isfinite(dkl).all()
    with pytest.raises(RuntimeError, match=r"expected k_x and k_l of shape \(N, S, H, dh\)"):
        OP.resampler_attention(q, k_x[:1], v_x[:1], k_l, v_l, 0.25)
