"""The Triton backend of resampler_attention (run on the CPU under TRITON_INTERPRET=1)
against the float64 reference (DESIGN.md section 3): forward and every gradient, fresh
random inputs, poisoned outputs, S = 1 / 49 / 256 / 257 / 300, head dims 64 / 96 / 128,
non-contiguous inputs, fp32 and bf16.

The interpreter is slow, so L (latents) is small here (8-16); the GPU check runs L = 64.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from flamingo_rt.ops import backend as be
from flamingo_rt.ops import resampler_attention
from flamingo_rt.ops.reference import resampler as ref

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="the triton backend runs on the CPU only under TRITON_INTERPRET=1"),
]

OP = "resampler_attention"


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(n, L, S, H, dh, dtype, noncontig):
    """q, k_x, v_x, k_l, v_l; non-contiguous ones are views of a fused [K | V] projection
    (as the resampler makes them) and a head-major q."""
    if noncontig:
        q = (2 * torch.randn(n, H, L, dh)).transpose(1, 2)
        k_x, v_x = torch.randn(n, S, 2, H, dh).unbind(2)
        k_l, v_l = torch.randn(n, L, 2, H, dh).unbind(2)
    else:
        q = 2 * torch.randn(n, L, H, dh)
        k_x, v_x = torch.randn(n, S, H, dh), torch.randn(n, S, H, dh)
        k_l, v_l = torch.randn(n, L, H, dh), torch.randn(n, L, H, dh)
    return [t.to(dtype).requires_grad_() for t in (q, k_x, v_x, k_l, v_l)]


@pytest.fixture
def poisoned(monkeypatch):
    """Every torch.empty the kernels' launchers allocate starts as NaN."""
    from flamingo_rt.kernels import resampler as K

    real_empty, real_empty_like = torch.empty, torch.empty_like

    class _Torch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(*a, **k):
            return real_empty(*a, **k).fill_(float("nan"))

        @staticmethod
        def empty_like(*a, **k):
            return real_empty_like(*a, **k).fill_(float("nan"))

    monkeypatch.setattr(K, "torch", _Torch())
    return K


CASES = [  # n, L, S, H, dh
    (3, 8, 1, 2, 64),
    (2, 16, 49, 1, 96),
    (1, 8, 256, 2, 64),
    (2, 9, 257, 1, 128),
    (1, 16, 300, 1, 96),
]


@pytest.mark.parametrize("case", CASES, ids=[f"S{c[2]}-dh{c[4]}" for c in CASES])
@pytest.mark.parametrize("dtype,noncontig", [(torch.float32, False), (torch.float32, True),
                                             (torch.bfloat16, True)],
                         ids=["fp32", "fp32-noncontig", "bf16-noncontig"])
def test_against_float64_reference(case, dtype, noncontig, poisoned):
    xs = _inputs(*case, dtype, noncontig)
    out = resampler_attention(*xs, backend="triton")
    go = torch.randn(out.shape).to(dtype)
    grads = torch.autograd.grad(out, xs, go)
    d = [t.detach().double() for t in xs]
    want = ref.resampler_attention(*d)
    want_g = ref.resampler_attention_backward(go.double(), *d)
    assert out.dtype == dtype and out.shape == xs[0].shape and torch.isfinite(out).all()
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


def test_fp16_and_two_query_tiles_forward(poisoned):
    """fp16 inputs; L > 128 runs the forward over two query tiles (its backward goes to
    the reference)."""
    xs = _inputs(1, 130, 5, 1, 64, torch.float16, False)
    out = resampler_attention(*xs, backend="triton")
    want = ref.resampler_attention(*[t.detach().double() for t in xs])
    assert torch.isfinite(out).all() and rel_err(out, want) < 2e-3
    go = torch.randn(out.shape).half()
    g = torch.autograd.grad(out, xs, go)
    want_g = ref.resampler_attention_backward(go.double(), *[t.detach().double() for t in xs])
    for a, w in zip(g, want_g):
        assert a.shape == w.shape and a.dtype == torch.float16 and rel_err(a, w) < 5e-3


def test_float64_goes_to_reference_and_gradcheck():
    xs = [t.detach().double().requires_grad_() for t in _inputs(2, 3, 5, 2, 4, torch.float32, True)]
    assert torch.autograd.gradcheck(lambda *t: resampler_attention(*t, backend="triton"), xs)


def test_backward_is_deterministic():
    xs = _inputs(2, 8, 70, 1, 64, torch.float32, False)
    out = resampler_attention(*xs, backend="triton")
    go = torch.randn(out.shape)
    g1 = torch.autograd.grad(out, xs, go, retain_graph=True)
    g2 = torch.autograd.grad(out, xs, go)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_registered_and_auto_on_cuda():
    assert "triton" in be.implemented(OP) and "triton" in be.implemented(OP + ".backward")
    assert be.AUTO_ORDER["cuda"][0] == "triton"
    assert be.resolve(OP, "auto", torch.device("cuda")) == "triton"


def test_compile_fullgraph():
    xs = _inputs(2, 8, 7, 2, 64, torch.float32, False)
    fn = torch.compile(lambda *t: resampler_attention(*t, backend="triton"), fullgraph=True,
                       backend="aot_eager")
    out = fn(*xs)
    want = ref.resampler_attention(*[t.detach().double() for t in xs])
    assert rel_err(out, want) < 2e-6
    out.sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in xs)


def test_no_feature_tokens(poisoned):
    """S = 0: the latents attend to themselves only; dk_x / dv_x are empty."""
    xs = _inputs(2, 8, 0, 1, 64, torch.float32, False)
    out = resampler_attention(*xs, backend="triton")
    go = torch.randn(out.shape)
    grads = torch.autograd.grad(out, xs, go)
    d = [t.detach().double() for t in xs]
    assert rel_err(out, ref.resampler_attention(*d)) < 2e-6
    for g, w in zip(grads, ref.resampler_attention_backward(go.double(), *d)):
        assert g.shape == w.shape and (g.numel() == 0 or rel_err(g, w) < 1e-5)


def test_small_problems_run_untuned_with_a_configuration_of_the_space(monkeypatch):
    """Autotuning compiles every configuration per key: only problems of at least
    AUTOTUNE_MIN_ROWS rows are tuned (the GPU check's correctness cases are not), and
    FLAMINGO_RT_TRITON_AUTOTUNE=0 turns it off; the heuristic configuration is one that
    the tuning space's pruning keeps."""
    from flamingo_rt.ops._kernel_modules import kernel_module

    K = kernel_module("resampler")
    assert not K._autotune(3 * 2 * 64) and K._autotune(32 * 8 * 64)
    monkeypatch.setenv("FLAMINGO_RT_TRITON_AUTOTUNE", "0")
    assert not K._autotune(32 * 8 * 64)
    for which, space in (("fwd", K._FWD_CONFIGS), ("bwd", K._BWD_CONFIGS)):
        for S in (1, 49, 257, 300):
            for bd in (64, 128, 256):
                c = K._heuristic(which, S, 64, bd)
                keys = {(x.kwargs["BLOCK_S"], x.num_warps, x.num_stages)
                        for x in K._prune(space, {"S": S, "L": 64}, BLOCK_D=bd)}
                assert (c["BLOCK_S"], c["num_warps"], c["num_stages"]) in keys, (which, S, bd, c)
