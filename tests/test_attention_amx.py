"""The bfloat16 attention forward and backward on Intel AMX tiles (csrc/cpu/attention_amx.cpp)
and the AVX-512 / AVX2 float32 kernels they replace on such CPUs: both against float64,
on the resampler's and the cross-attention's shapes; FLAMINGO_RT_CPU_AMX=0 picks the
float32 kernel (read at every call). On a CPU without AMX both runs take the float32 kernel."""
from __future__ import annotations

import pytest
import torch

from flamingo_rt.ops import _cpp_backends
from flamingo_rt.ops.reference import xattn as ref
from conftest import cpu_has

pytestmark = pytest.mark.skipif(not _cpp_backends.AVAILABLE, reason="flamingo_rt._C not built")

OP = torch.ops.flamingo_rt_C


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture
def paths(monkeypatch):
    """Run f(...) once with the AMX path allowed and once with FLAMINGO_RT_CPU_AMX=0."""
    def run(f):
        monkeypatch.setenv("FLAMINGO_RT_CPU_AMX", "1")
        a = f()
        monkeypatch.setenv("FLAMINGO_RT_CPU_AMX", "0")
        b = f()
        monkeypatch.delenv("FLAMINGO_RT_CPU_AMX")
        return a, b
    return run


def test_enabled_follows_cpu_and_environment(monkeypatch):
    monkeypatch.delenv("FLAMINGO_RT_CPU_AMX", raising=False)
    assert OP.cpu_amx_enabled() == cpu_has("amx_bf16", "amx_tile")
    monkeypatch.setenv("FLAMINGO_RT_CPU_AMX", "0")
    assert OP.cpu_amx_enabled() is False


def _resampler_inputs(N, L, S, H, dh, seed):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: (torch.randn(*s, generator=g) * 1.5).bfloat16()  # noqa: E731
    return t(N, L, H, dh), t(N, S, H, dh), t(N, S, H, dh), t(N, L, H, dh), t(N, L, H, dh)


def _resampler_ref(q, kx, vx, kl, vl, scale):
    k = torch.cat([kx, kl], 1).double()
    v = torch.cat([vx, vl], 1).double()
    s = torch.einsum("nlhd,nshd->nhls", q.double(), k) * scale
    return torch.einsum("nhls,nshd->nlhd", s.softmax(-1), v)


@pytest.mark.parametrize("S", [0, 1, 49, 256, 257, 300])
@pytest.mark.parametrize("dh", [32, 64, 96, 128])
def test_resampler_attention_both_paths_against_float64(paths, S, dh):
    """Keys/values from two sources (features, then latents), N = S + L not a multiple of
    16/32/64, 64 latents (four full query blocks) and 17 (a partial one)."""
    for L in (64, 17):
        q, kx, vx, kl, vl = _resampler_inputs(2, L, S, 2, dh, seed=S * 1000 + dh + L)
        scale = dh ** -0.5
        want = _resampler_ref(q, kx, vx, kl, vl, scale)
        amx, f32 = paths(lambda: OP.resampler_attention(q, kx, vx, kl, vl, scale))
        e_round = rel_err(want.bfloat16(), want)  # the output's own bf16 rounding
        assert rel_err(f32, want) <= 1.2 * e_round + 1e-4
        # AMX rounds the probabilities to bf16 for P V (as autocast attention does)
        assert rel_err(amx, want) <= 1.5 * e_round + 1e-4, (S, dh, L)
        assert amx.dtype == torch.bfloat16 and amx.shape == q.shape


def test_image_causal_both_paths_against_float64(paths):
    """Text before any image (rows of zeros), 0- and 1-token segments, rows with different
    image counts, a segment longer than one task's chunk (128 tokens), dh 64 and 128."""
    for dh, N in ((64, 64), (128, 49)):
        B, T, H, M = 3, 300, 2, 3
        g = torch.Generator().manual_seed(dh)
        idx = torch.full((B, T), -1, dtype=torch.int32)
        idx[0, 5:] = 0
        idx[0, 6:] = 1        # image 0 seen by one token
        idx[0, 150:] = 2
        idx[1, 1:] = 0        # one long segment (299 tokens: three chunks)
        # row 2: no image at all
        q = (torch.randn(B, T, H, dh, generator=g) * 2).bfloat16()
        k = torch.randn(B, M, N, H, dh, generator=g).bfloat16()
        v = torch.randn(B, M, N, H, dh, generator=g).bfloat16()
        scale = dh ** -0.5
        want = ref.image_causal_attention(q.double(), k.double(), v.double(), idx, False, scale)
        amx, f32 = paths(lambda: OP.image_causal_attention(q, k, v, idx, False, scale))
        for out in (amx, f32):
            assert (out[idx < 0] == 0).all()
            assert rel_err(out, want) <= 1.5 * rel_err(want.bfloat16(), want) + 1e-4


def test_nan_propagates_and_noncontiguous_falls_back(paths):
    q, kx, vx, kl, vl = _resampler_inputs(2, 64, 49, 2, 64, seed=3)
    q[1, 7, 1, 3] = float("nan")
    amx, f32 = paths(lambda: OP.resampler_attention(q, kx, vx, kl, vl, 0.125))
    for out in (amx, f32):
        assert torch.isnan(out[1, 7, 1]).all()
        out[1, 7, 1] = 0
        assert torch.isfinite(out).all()
    # a non-unit element stride takes the float32 kernel either way: same values as contiguous
    q2 = torch.randn(2, 64, 2, 128).bfloat16()[..., ::2]
    c, _ = paths(lambda: OP.resampler_attention(q2, kx, vx, kl, vl, 0.125))
    f, _ = paths(lambda: OP.resampler_attention(q2.contiguous(), kx, vx, kl, vl, 0.125))
    want = _resampler_ref(q2, kx, vx, kl, vl, 0.125)
    assert rel_err(c, want) <= 1.5 * rel_err(want.bfloat16(), want) + 1e-4
    assert rel_err(f, want) <= 1.5 * rel_err(want.bfloat16(), want) + 1e-4


def _resampler_ref_grads(q, kx, vx, kl, vl, scale, go):
    leaves = [t.double().requires_grad_() for t in (q, kx, vx, kl, vl)]
    out = _resampler_ref(*leaves, scale)
    return torch.autograd.grad(out, leaves, go.double())


@pytest.mark.parametrize("S", [0, 1, 49, 256, 257, 300])
@pytest.mark.parametrize("dh", [32, 64, 96, 128])
def test_resampler_backward_both_paths_against_float64(paths, S, dh):
    """dq, dk/dv of the features and of the latents; 64 latents and 17 (rows padded to 32)."""
    for L in (64, 17):
        q, kx, vx, kl, vl = _resampler_inputs(2, L, S, 2, dh, seed=S * 1000 + dh + L + 7)
        go = (torch.randn(q.shape, generator=torch.Generator().manual_seed(S + dh)) * 0.5).bfloat16()
        scale = dh ** -0.5
        want = _resampler_ref_grads(q, kx, vx, kl, vl, scale, go)
        amx, f32 = paths(lambda: OP.resampler_attention_backward(go, q, kx, vx, kl, vl, scale))
        for name, a, f, w in zip(["dq", "dk_x", "dv_x", "dk_l", "dv_l"], amx, f32, want):
            assert a.dtype == torch.bfloat16 and a.shape == w.shape, name
            if w.numel() == 0:
                continue
            e_round = rel_err(w.bfloat16(), w)
            assert rel_err(f, w) <= 1.3 * e_round + 1e-4, (name, S, dh, L)
            # AMX also rounds P and dS to bf16 for its products
            assert rel_err(a, w) <= 2.0 * e_round + 1e-4, (name, S, dh, L)


def test_image_causal_backward_both_paths(paths):
    """Images nobody attends to (zero dk, dv), text rows before any image (zero dq), a
    segment of 299 rows (three blocks accumulated into one image's dk, dv)."""
    B, T, H, M, N, dh = 2, 300, 2, 3, 49, 64
    g = torch.Generator().manual_seed(11)
    idx = torch.full((B, T), -1, dtype=torch.int32)
    idx[0, 1:] = 0  # one long segment; images 1, 2 of row 0 unseen
    idx[1, 10:] = 1
    idx[1, 200:] = 2  # image 0 of row 1 unseen
    q = (torch.randn(B, T, H, dh, generator=g) * 2).bfloat16()
    k = torch.randn(B, M, N, H, dh, generator=g).bfloat16()
    v = torch.randn(B, M, N, H, dh, generator=g).bfloat16()
    go = torch.randn(B, T, H, dh, generator=g).bfloat16()
    scale = dh ** -0.5
    want = ref.image_causal_attention_backward(go.double(), q.double(), k.double(), v.double(), idx, False, scale)
    amx, f32 = paths(lambda: OP.image_causal_attention_backward(go, q, k, v, idx, False, scale))
    for grads in (amx, f32):
        dq, dk, dv = grads
        assert (dq[idx < 0] == 0).all()
        assert (dk[0, 1:] == 0).all() and (dv[0, 1:] == 0).all() and (dk[1, 0] == 0).all()
        for a, w in zip(grads, want):
            assert rel_err(a, w) <= 2.0 * rel_err(w.bfloat16(), w) + 1e-4
