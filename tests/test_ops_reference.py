"""The reference ops against independent loop implementations, gradcheck, compile/export."""
from __future__ import annotations

import pytest
import torch

from flamingo_rt.ops import backend, image_causal_attention, media_index_from_locations, resampler_attention
from flamingo_rt.ops.reference import image_causal_attention as ref_xattn
from conftest import rel_err


def loop_xattn(q, k, v, media_index, all_previous, scale):
    """Token by token, head by head: the spec of DESIGN.md section 1, in float64."""
    B, T, H, dh = q.shape
    M, N = k.shape[1:3]
    out = torch.zeros(B, T, H, dh, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            m = int(media_index[b, t])
            if m < 0:
                continue
            imgs = range(m + 1) if all_previous else [m]
            keys = torch.cat([k[b, i] for i in imgs]).double()  # (n, H, dh)
            vals = torch.cat([v[b, i] for i in imgs]).double()
            for h in range(H):
                s = keys[:, h] @ q[b, t, h].double() * scale
                p = torch.softmax(s, 0)
                out[b, t, h] = p @ vals[:, h]
    return out


def random_locations(B, T, counts, generator=None):
    """(B, T) bool with counts[b] <image> tokens at random positions of row b."""
    loc = torch.zeros(B, T, dtype=torch.bool)
    for b, c in enumerate(counts):
        if c:
            loc[b, torch.randperm(T)[:c]] = True
    return loc


def test_media_index_from_locations():
    loc = torch.tensor([[0, 1, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    idx = media_index_from_locations(loc)
    assert idx.dtype == torch.int32
    assert idx.tolist() == [[-1, 0, 0, 0, 1, 2, 2], [-1] * 7]


@pytest.mark.parametrize("all_previous", [False, True])
@pytest.mark.parametrize("N,dh", [(1, 64), (49, 96), (64, 128), (257, 64), (300, 96)])
def test_xattn_matches_loop_spec(all_previous, N, dh):
    B, T, H, M = 3, 11, 2, 3
    # row 0: several images incl. adjacent ones (segments of 0 and 1 tokens) and text first;
    # row 1: one image; row 2: no image at all.
    loc = torch.zeros(B, T, dtype=torch.bool)
    loc[0, [2, 3, 7]] = True
    loc[1, [0]] = True
    idx = media_index_from_locations(loc)
    q = torch.randn(B, T, H, dh)
    k = torch.randn(B, M, N, H, dh)
    v = torch.randn(B, M, N, H, dh)
    out = image_causal_attention(q, k, v, idx, all_previous=all_previous, backend="reference")
    want = loop_xattn(q, k, v, idx, all_previous, dh ** -0.5)
    assert rel_err(out, want) < 1e-6
    # text before any image and the image-less row are exactly zero
    assert torch.equal(out[0, :2], torch.zeros_like(out[0, :2]))
    assert torch.equal(out[2], torch.zeros_like(out[2]))


def test_xattn_noncontiguous_and_dtypes():
    B, T, H, dh, M, N = 2, 9, 4, 64, 2, 5
    idx = media_index_from_locations(random_locations(B, T, [2, 1]))
    qb = torch.randn(B, H, T, dh).transpose(1, 2)  # non-contiguous
    kb = torch.randn(B, M, H, N, dh).transpose(2, 3)
    vb = torch.randn(B, M, N, H, 2 * dh)[..., ::2]
    assert not qb.is_contiguous() and not kb.is_contiguous() and not vb.is_contiguous()
    want = loop_xattn(qb, kb, vb, idx, False, dh ** -0.5)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float64, 1e-12)):
        out = image_causal_attention(qb.to(dtype), kb.to(dtype), vb.to(dtype), idx)
        assert out.dtype == dtype and out.is_contiguous()
        assert rel_err(out, want) < tol, dtype


@pytest.mark.parametrize("all_previous", [False, True])
def test_xattn_gradcheck(all_previous):
    B, T, H, dh, M, N = 2, 7, 2, 4, 3, 3
    idx = torch.tensor([[-1, 0, 0, 1, 2, 2, 2], [-1, -1, 0, 0, 0, 0, 1]], dtype=torch.int32)
    q = torch.randn(B, T, H, dh, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, M, N, H, dh, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, M, N, H, dh, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: image_causal_attention(q, k, v, idx, all_previous=all_previous), (q, k, v)
    )


def test_resampler_attention_matches_concat_softmax():
    n, L, S, H, dh = 3, 8, 49, 2, 96
    q = torch.randn(n, L, H, dh)
    kx, vx = torch.randn(n, S, H, dh), torch.randn(n, S, H, dh)
    kl, vl = torch.randn(n, L, H, dh), torch.randn(n, L, H, dh)
    out = resampler_attention(q, kx, vx, kl, vl)
    k = torch.cat([kx, kl], 1).double()
    v = torch.cat([vx, vl], 1).double()
    p = torch.softmax(torch.einsum("nlhd,nshd->nhls", q.double(), k) * dh ** -0.5, -1)
    want = torch.einsum("nhls,nshd->nlhd", p, v)
    assert rel_err(out, want) < 1e-6


@pytest.mark.parametrize("n", [1, 3])
def test_resampler_gradcheck(n):
    H, dh, L, S = 2, 4, 3, 5
    xs = [torch.randn(n, L, H, dh, dtype=torch.float64, requires_grad=True)]
    xs += [torch.randn(n, s, H, dh, dtype=torch.float64, requires_grad=True) for s in (S, S, L, L)]
    assert torch.autograd.gradcheck(lambda *t: resampler_attention(*t), xs)


def test_opcheck_custom_ops():
    from flamingo_rt.ops.resampler import _resampler_op
    from flamingo_rt.ops.xattn import _xattn_op

    idx = torch.tensor([[-1, 0, 0, 1, 1]], dtype=torch.int32)
    q = torch.randn(1, 5, 2, 8, requires_grad=True)
    k = torch.randn(1, 2, 3, 2, 8, requires_grad=True)
    v = torch.randn(1, 2, 3, 2, 8, requires_grad=True)
    torch.library.opcheck(_xattn_op, (q, k, v, idx, False, 0.35, "reference"))
    xs = [torch.randn(2, s, 2, 8, requires_grad=True) for s in (4, 6, 6, 4, 4)]
    torch.library.opcheck(_resampler_op, (*xs, 0.35, "reference"))


def test_compile_fullgraph_and_export():
    idx = torch.tensor([[-1, 0, 0, 1, 1, 1]], dtype=torch.int32)
    q, k, v = torch.randn(1, 6, 2, 8), torch.randn(1, 2, 3, 2, 8), torch.randn(1, 2, 3, 2, 8)

    def f(q, k, v, idx):
        return image_causal_attention(q, k, v, idx) * 2

    eager = f(q, k, v, idx)
    compiled = torch.compile(f, fullgraph=True, backend="eager")(q, k, v, idx)
    assert torch.equal(eager, compiled)

    class Mod(torch.nn.Module):
        def forward(self, q, k, v, idx):
            return f(q, k, v, idx)

    ep = torch.export.export(Mod(), (q, k, v, idx))
    assert any("image_causal_attention" in str(n.target) for n in ep.graph.nodes)
    assert torch.equal(ep.module()(q, k, v, idx), eager)


def test_backend_errors(monkeypatch):
    q, k, v = torch.randn(1, 2, 1, 4), torch.randn(1, 1, 2, 1, 4), torch.randn(1, 1, 2, 1, 4)
    idx = torch.zeros(1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        image_causal_attention(q, k, v, idx, backend="bogus")
    with pytest.raises((NotImplementedError, ValueError), match="implemented"):
        image_causal_attention(q, k, v, idx, backend="cuda")
    monkeypatch.setenv("FLAMINGO_RT_BACKEND", "reference")
    assert backend.resolve("image_causal_attention", None, q.device) == "reference"


def test_shape_errors_name_expected_and_received():
    q = torch.randn(2, 5, 2, 8)
    k = torch.randn(2, 3, 4, 2, 8)
    with pytest.raises(ValueError, match=r"expected media_index of shape \(B, T\) = \(2, 5\), got \(2, 4\)"):
        image_causal_attention(q, k, k, torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"expected k of shape"):
        image_causal_attention(q, torch.randn(2, 3, 4, 2, 16), k, torch.zeros(2, 5, dtype=torch.int32))
    with pytest.raises(TypeError, match="integer media_index"):
        image_causal_attention(q, k, k, torch.zeros(2, 5))
