"""The decode-attention kernel (``flamingo_rt_C::decode_attention``, one query per sequence
against the static KV cache) against a float64 plain-torch reference: masks with left
padding and holes, grouped-query heads, strided caches, float32 and bfloat16; the routing of
``cached_attention`` (kernel only where it applies); and the op under torch.compile."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flamingo_rt import _ext
from flamingo_rt.ops import decode_attention as da

pytestmark = pytest.mark.skipif(not _ext.load(), reason="the C++ extension is not built")

TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-2}


def reference(q, k, v, mask, scale):
    """float64 softmax attention over the visible slots; a row with none gives 0."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


def _inputs(B, H, Hkv, S, D, dtype, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, H, D, generator=g).transpose(1, 2).to(dtype)  # (B, H, 1, D), strided heads
    if strided:  # a view into a longer cache, as the runtime's static buffers
        kb = torch.randn(B, Hkv, S + 5, D, generator=g).to(dtype)
        vb = torch.randn(B, Hkv, S + 5, D, generator=g).to(dtype)
        k, v = kb[:, :, 2:S + 2], vb[:, :, 2:S + 2]
    else:
        k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
        v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    mask = torch.rand(B, 1, 1, S, generator=g) < 0.8
    mask[0, ..., : S // 3] = False  # left padding of row 0
    mask[:, ..., -1] = True  # the new token itself is always visible
    return q, k, v, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# (Dh a multiple of 16 up to 128 takes the AVX-512 path where the CPU has it; 40 and 160 the
# portable loops)
@pytest.mark.parametrize("B,H,Hkv,S,D", [(1, 16, 16, 687, 64), (3, 4, 2, 7, 32), (2, 6, 1, 130, 80), (2, 2, 2, 1, 16),
                                         (1, 4, 4, 33, 128), (2, 3, 3, 20, 40), (1, 2, 1, 17, 160)])
@pytest.mark.parametrize("strided", [False, True])
def test_matches_reference(dtype, B, H, Hkv, S, D, strided):
    q, k, v, mask = _inputs(B, H, Hkv, S, D, dtype, strided, seed=B * 100 + S)
    scale = D ** -0.5
    out = torch.ops.flamingo_rt_C.decode_attention(q, k, v, mask, scale)
    want = reference(q, k, v, mask, scale)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    err = ((out.double() - want).norm() / want.norm()).item()
    assert err < TOL[dtype], err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 40])
def test_hidden_slots_are_never_read_and_a_visible_nan_shows(dtype, D):
    """NaN keys and values in slots the mask hides change nothing; a NaN key in a visible
    slot makes its heads' outputs NaN (not a silent 0 or a finite guess), and so do NaN keys
    in every visible slot."""
    q, k, v, mask = _inputs(2, 4, 2, 37, D, dtype, seed=D)
    clean = torch.ops.flamingo_rt_C.decode_attention(q, k, v, mask, 0.2)
    kp, vp = k.clone(), v.clone()
    hidden = ~mask[:, 0, 0]  # (B, S)
    for b in range(2):
        kp[b][:, hidden[b]] = float("nan")
        vp[b][:, hidden[b]] = float("nan")
    assert hidden.any()
    assert torch.equal(torch.ops.flamingo_rt_C.decode_attention(q, kp, vp, mask, 0.2), clean)
    kn = k.clone()
    kn[1, 0, -1, 3] = float("nan")  # row 1, kv head 0 (query heads 0 and 1), the always-visible last slot
    out = torch.ops.flamingo_rt_C.decode_attention(q, kn, v, mask, 0.2)
    assert torch.isnan(out[1, :2]).all() and torch.equal(out[1, 2:], clean[1, 2:]) and torch.equal(out[0], clean[0])
    # every visible key of a head NaN (a medium's keys gone bad): NaN, as softmax gives (the
    # running max never moved off -inf, and the row was taken for one without visible slots)
    ka = k.clone()
    ka[1, 1] = float("nan")  # row 1, kv head 1: query heads 2 and 3
    out = torch.ops.flamingo_rt_C.decode_attention(q, ka, v, mask, 0.2)
    assert torch.isnan(out[1, 2:]).all() and torch.equal(out[1, :2], clean[1, :2]) and torch.equal(out[0], clean[0])


def test_row_without_visible_slot_is_zero_and_errors_are_clear():
    q, k, v, mask = _inputs(2, 2, 2, 9, 16, torch.float32)
    mask[1] = False
    out = torch.ops.flamingo_rt_C.decode_attention(q, k, v, mask, 0.25)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.allclose(out[0].double(), reference(q, k, v, mask, 0.25)[0], atol=1e-6)
    with pytest.raises(RuntimeError, match=r"expected q of shape \(B, H, 1, Dh\)"):
        torch.ops.flamingo_rt_C.decode_attention(torch.randn(2, 2, 3, 16), k, v, mask, 0.25)
    with pytest.raises(RuntimeError, match="multiple of Hkv"):
        torch.ops.flamingo_rt_C.decode_attention(torch.randn(2, 3, 1, 16), k, v, mask, 0.25)
    with pytest.raises(RuntimeError, match="bool mask"):
        torch.ops.flamingo_rt_C.decode_attention(q, k, v, mask.float(), 0.25)
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.flamingo_rt_C.decode_attention(q, k.double(), v, mask, 0.25)


def test_cached_attention_routes_only_where_the_kernel_applies(monkeypatch):
    calls = []
    real = torch.ops.flamingo_rt_C.decode_attention

    class Spy:
        def __call__(self, *a):
            calls.append(a[0].shape)
            return real(*a)

    monkeypatch.setattr(torch.ops.flamingo_rt_C, "decode_attention", Spy())
    q, k, v, mask = _inputs(2, 4, 2, 11, 16, torch.float32)
    want = reference(q, k, v, mask, 0.25)
    with torch.no_grad():
        out = da.cached_attention(q, k, v, mask, 0.25)
    assert len(calls) == 1 and torch.allclose(out.double(), want, atol=1e-6)
    # two query tokens (a prefill chunk), float64, or a query that needs a gradient: SDPA
    q2 = torch.randn(2, 4, 2, 16)
    m2 = mask.expand(2, 1, 2, 11)
    assert torch.allclose(da.cached_attention(q2, k, v, m2, 0.25).double(), reference(q2, k, v, m2, 0.25), atol=1e-6)
    da.cached_attention(q.double(), k.double(), v.double(), mask, 0.25)
    qg = q.clone().requires_grad_()
    out = da.cached_attention(qg, k, v, mask, 0.25)
    out.sum().backward()
    assert qg.grad is not None and len(calls) == 1


def test_under_torch_compile():
    q, k, v, mask = _inputs(1, 4, 4, 13, 16, torch.float32)

    def step(q, k, v, mask):
        return da.cached_attention(q, k, v, mask, 0.25) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.allclose(compiled(q, k, v, mask), step(q, k, v, mask), atol=1e-6)
