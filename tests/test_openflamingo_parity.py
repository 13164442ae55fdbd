"""Parity with open_flamingo's PerceiverResampler and GatedCrossAttentionBlock (peer)."""
from __future__ import annotations

import pytest
import torch

from flamingo_rt.models.resampler import PerceiverResampler
from flamingo_rt.models.xattn import GatedCrossAttentionBlock
from conftest import rel_err


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() > 1 else 1.0) / max(1, p.shape[-1]) ** 0.5 * 4)


@pytest.mark.parametrize(
    "dim,depth,heads,dim_head,latents,frames,S,M,media_time",
    [
        (64, 2, 4, 16, 8, 1, 49, 2, False),
        (96, 3, 3, 32, 16, 3, 17, 1, True),
        (128, 1, 2, 64, 64, 2, 1, 3, False),
    ],
)
def test_resampler_parity(of_helpers, dim, depth, heads, dim_head, latents, frames, S, M, media_time):
    peer = of_helpers.PerceiverResampler(
        dim=dim, depth=depth, dim_head=dim_head, heads=heads, num_latents=latents,
        max_num_frames=frames if frames > 1 else None, max_num_media=4 if media_time else None,
    )
    _randomize(peer)
    ours = PerceiverResampler.from_open_flamingo(peer)
    x = torch.randn(2, M, frames, S, dim)
    x_peer = x.clone().requires_grad_(True)
    x_ours = x.clone().requires_grad_(True)
    want = peer(x_peer)
    got = ours(x_ours)
    assert got.shape == (2, M, latents, dim)
    assert rel_err(got, want) < 1e-5
    w = torch.randn_like(want)
    (want * w).sum().backward()
    (got * w).sum().backward()
    assert rel_err(x_ours.grad, x_peer.grad) < 1e-5
    assert rel_err(ours.latents.grad, peer.latents.grad) < 1e-5
    assert rel_err(ours.layers[0].attn.to_kv.weight.grad, peer.layers[0][0].to_kv.weight.grad) < 1e-5
    assert rel_err(ours.layers[-1].ff.fc1.weight.grad, peer.layers[-1][1][1].weight.grad) < 1e-5


def _peer_block(of_helpers, dim, dim_visual, heads, dim_head, immediate=True):
    blk = of_helpers.GatedCrossAttentionBlock(
        dim=dim, dim_visual=dim_visual, dim_head=dim_head, heads=heads,
        only_attend_immediate_media=immediate,
    )
    _randomize(blk)
    with torch.no_grad():
        blk.attn_gate.fill_(0.8)
        blk.ff_gate.fill_(-0.6)
    return blk


@pytest.mark.parametrize(
    "dim,dim_visual,heads,dim_head,n_latents",
    [(48, 64, 4, 16, 8), (128, 96, 2, 64, 64), (64, 32, 1, 128, 1)],
)
def test_xattn_block_parity(of_helpers, dim, dim_visual, heads, dim_head, n_latents):
    peer = _peer_block(of_helpers, dim, dim_visual, heads, dim_head)
    ours = GatedCrossAttentionBlock.from_open_flamingo(peer)
    B, T, M = 3, 12, 3
    # row 0: text before the first image, adjacent <image> tokens; row 1: 1 image;
    # row 2: no image at all (rows with different image counts).
    loc = torch.zeros(B, T, dtype=torch.bool)
    loc[0, [2, 3, 8]] = True
    loc[1, [0]] = True
    x = torch.randn(B, T, dim)
    media = torch.randn(B, M, n_latents, dim_visual)
    xp, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want = peer(xp, media, media_locations=loc)
    got = ours(xo, media, media_locations=loc, num_media=torch.tensor([3, 1, 0]))
    assert rel_err(got, want) < 1e-5
    # the <image> token attends to its own image: perturbing image 1 changes token 3 of row 0
    w = torch.randn_like(want)
    (want * w).sum().backward()
    (got * w).sum().backward()
    assert rel_err(xo.grad, xp.grad) < 1e-5
    assert rel_err(ours.attn_gate.grad, peer.attn_gate.grad) < 1e-5
    assert rel_err(ours.ff_gate.grad, peer.ff_gate.grad) < 1e-5
    assert rel_err(ours.attn.to_kv.weight.grad, peer.attn.to_kv.weight.grad) < 1e-5


def test_image_token_attends_its_own_image(of_helpers):
    peer = _peer_block(of_helpers, 32, 32, 2, 16)
    ours = GatedCrossAttentionBlock.from_open_flamingo(peer)
    loc = torch.tensor([[False, True, False, True, False]])
    x, media = torch.randn(1, 5, 32), torch.randn(1, 2, 4, 32)
    base = ours(x, media, media_locations=loc)
    media2 = media.clone()
    media2[0, 1] += 1.0
    moved = ours(x, media2, media_locations=loc)
    changed = (moved - base).abs().amax(-1)[0] > 0
    assert changed.tolist() == [False, False, False, True, True]


def test_all_previous_mode_parity(of_helpers):
    """OpenFlamingo's all-previous mode; it gives text before any image the mean of V
    where we give exactly 0 (DESIGN.md), so those rows are compared to 0 instead."""
    peer = _peer_block(of_helpers, 48, 64, 4, 16, immediate=False)
    ours = GatedCrossAttentionBlock.from_open_flamingo(peer)
    assert ours.all_previous
    loc = torch.zeros(2, 10, dtype=torch.bool)
    loc[0, [1, 4, 5]] = True
    loc[1, [3, 6]] = True
    x, media = torch.randn(2, 10, 48), torch.randn(2, 3, 8, 64)
    want = peer(x, media, media_locations=loc)
    got = ours(x, media, media_locations=loc, num_media=torch.tensor([3, 2]))
    assert rel_err(got[0, 1:], want[0, 1:]) < 1e-5
    assert rel_err(got[1, 3:], want[1, 3:]) < 1e-5
    # before the first image only the gated FF applies
    ff_only = x + torch.tanh(peer.ff_gate) * peer.ff(x)
    assert rel_err(got[0, :1], ff_only[0, :1]) < 1e-6


def test_too_many_image_tokens_is_an_error():
    blk = GatedCrossAttentionBlock(32, 32, 2, 16)
    loc = torch.tensor([[True, False, True, True]])
    with pytest.raises(ValueError, match="3 <image> tokens but 2 images"):
        blk(torch.randn(1, 4, 32), torch.randn(1, 2, 4, 32), media_locations=loc)
    with pytest.raises(ValueError, match=r"expected media of shape \(1, M, N, 32\), got \(1, 2, 4, 16\)"):
        blk(torch.randn(1, 4, 32), torch.randn(1, 2, 4, 16), media_locations=loc)
    # both ways of placing the images at once were taken (the index won, silently)
    with pytest.raises(ValueError, match="expected media_locations or media_index, got both"):
        blk(torch.randn(1, 4, 32), torch.randn(1, 2, 4, 32), media_locations=loc,
            media_index=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="got neither"):
        blk(torch.randn(1, 4, 32), torch.randn(1, 2, 4, 32))
    from flamingo_rt.models import PerceiverResampler
    from flamingo_rt.models.config import ResamplerConfig

    res = PerceiverResampler(ResamplerConfig(dim=32, depth=1, heads=2, dim_head=16, num_latents=4))
    with pytest.raises(TypeError, match="expected floating-point media features, got torch.int64"):
        res(torch.ones(1, 2, 5, 32, dtype=torch.long))


def test_video_frames_and_interpolation():
    from flamingo_rt.models.config import ResamplerConfig

    r = PerceiverResampler(ResamplerConfig(dim=32, depth=1, heads=2, dim_head=16, num_latents=4, max_num_frames=8))
    x = torch.randn(1, 2, 30, 5, 32)
    out = r(x)
    assert out.shape == (1, 2, 4, 32) and torch.isfinite(out).all()
    fe = r.frame_embeddings(30)
    assert fe.shape == (30, 32)
    assert torch.allclose(fe[0], r.frame_embs[0]) and torch.allclose(fe[-1], r.frame_embs[-1])
    assert torch.equal(r.frame_embeddings(3), r.frame_embs[:3])
