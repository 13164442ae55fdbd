"""Video in the Perceiver Resampler: F frames per medium with learned temporal embeddings,
and their interpolation when a clip has more frames than were trained (the paper trains
on 8 frames, evaluates on 30). The whole resampler against a float64 plain-torch
re-implementation that concatenates the keys (as the paper writes it), forward and
backward, on the default (CPU) backend and on the Triton backend under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import copy
import importlib.util
import math
import os

import pytest
import torch
import torch.nn.functional as F

from flamingo_rt.models.config import ResamplerConfig
from flamingo_rt.models.resampler import PerceiverResampler


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def lerp_frames(fe: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Independent statement of the contract: frame f samples the T learned embeddings at
    position f * (T - 1) / (num_frames - 1), linearly between neighbours."""
    T = fe.shape[0]
    if num_frames <= T:
        return fe[:num_frames]
    rows = []
    for f in range(num_frames):
        pos = f * (T - 1) / (num_frames - 1)
        i0 = min(int(math.floor(pos)), T - 1)
        i1 = min(i0 + 1, T - 1)
        w = pos - i0
        rows.append((1 - w) * fe[i0] + w * fe[i1])
    return torch.stack(rows)


def plain_resampler(r: PerceiverResampler, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """The resampler written out with the concatenation, in x's dtype (float64 here)."""
    cfg = r.config
    B, M, Fr, S, D = x.shape
    if r.spatial_embs is not None:
        x = x + r.spatial_embs[:S].to(x.dtype)[None, None, None, :, :]
    if r.frame_embs is not None:
        x = x + lerp_frames(r.frame_embs.to(x.dtype), Fr)[None, None, :, None, :]
    x = x.reshape(B * M, Fr * S, D)
    lat = latents.to(x.dtype)[None].expand(B * M, -1, -1)
    H, dh = cfg.heads, cfg.dim_head

    def ln(t, m):
        return F.layer_norm(t, (D,), m.weight.to(t.dtype), m.bias.to(t.dtype), m.eps)

    def heads(t):
        return t.view(t.shape[0], t.shape[1], H, dh).transpose(1, 2)

    for layer in r.layers:
        a = layer.attn
        xn, ln_ = ln(x, a.norm_media), ln(lat, a.norm_latents)
        q = F.linear(ln_, a.to_q.weight.to(x.dtype))
        k, v = F.linear(torch.cat([xn, ln_], 1), a.to_kv.weight.to(x.dtype)).chunk(2, -1)
        att = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) * dh ** -0.5, -1)
        o = (att @ heads(v)).transpose(1, 2).reshape(B * M, -1, H * dh)
        lat = lat + F.linear(o, a.to_out.weight.to(x.dtype))
        ff = layer.ff
        h = F.linear(ln(lat, ff.norm), ff.fc1.weight.to(x.dtype))
        h = F.gelu(h) if ff.kind == "gelu" else torch.relu(h).square()
        lat = lat + F.linear(h, ff.fc2.weight.to(x.dtype))
    return ln(lat, r.norm).view(B, M, -1, D)


def _model(frames=8, ff_kind="gelu"):
    torch.manual_seed(torch.seed() & 0xFFFF)  # fresh weights every run
    return PerceiverResampler(ResamplerConfig(dim=32, depth=2, heads=2, dim_head=16, num_latents=8,
                                              ff_kind=ff_kind, max_num_frames=frames))


def _check_against_plain(r, x, backend, fwd_tol, bwd_tol):
    x = x.requires_grad_()
    out = r(x, backend=backend)
    go = torch.randn(out.shape)
    gx, gl, gf = torch.autograd.grad(out, [x, r.latents, r.frame_embs], go)
    x64 = x.detach().double().requires_grad_()
    r64 = copy.deepcopy(r).double()
    want = plain_resampler(r64, x64, r64.latents)
    wx, wl, wf = torch.autograd.grad(want, [x64, r64.latents, r64.frame_embs], go.double())
    assert out.shape == want.shape and torch.isfinite(out).all()
    assert rel_err(out, want) < fwd_tol
    for g, w in ((gx, wx), (gl, wl), (gf, wf)):
        assert g.shape == w.shape and rel_err(g, w) < bwd_tol


@pytest.mark.parametrize("frames", [1, 3, 8])
def test_frames_through_whole_resampler(frames):
    r = _model(frames=8)
    x = torch.randn(2, 2, frames, 5, 32)  # B=2 sequences, M=2 clips: 4 media in one launch
    _check_against_plain(r, x, None, 1e-5, 1e-4)


def test_more_frames_than_trained_through_whole_resampler():
    r = _model(frames=8, ff_kind="sqrelu")
    x = torch.randn(1, 2, 30, 3, 32)  # trained 8 frames, evaluated on 30
    _check_against_plain(r, x, None, 1e-5, 1e-4)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the triton backend runs on the CPU only under TRITON_INTERPRET=1")
def test_frames_on_triton_backend():
    r = _model(frames=8)
    x = torch.randn(1, 2, 3, 5, 32)
    _check_against_plain(r, x, "triton", 1e-5, 1e-4)


def test_interpolation_contract():
    r = _model(frames=8)
    fe = r.frame_embs.detach()
    e30 = r.frame_embeddings(30)
    assert e30.shape == (30, 32) and e30.dtype == fe.dtype
    assert torch.equal(e30[0], fe[0]) and torch.allclose(e30[-1], fe[-1], rtol=0, atol=1e-6)
    assert torch.allclose(e30, lerp_frames(fe, 30), rtol=0, atol=1e-5)  # fp32 source positions
    # between its two neighbours, element-wise
    pos = 10 * 7 / 29
    i0 = int(pos)
    lo, hi = torch.minimum(fe[i0], fe[i0 + 1]), torch.maximum(fe[i0], fe[i0 + 1])
    assert bool(((e30[10] >= lo - 1e-6) & (e30[10] <= hi + 1e-6)).all())
    # exactly the learned ones at the trained count, a prefix below it
    assert torch.equal(r.frame_embeddings(8), fe)
    assert torch.equal(r.frame_embeddings(3), fe[:3]) and torch.equal(r.frame_embeddings(1), fe[:1])
    # differentiable: the 30 interpolated rows send gradient to every learned one
    g = torch.autograd.grad(r.frame_embeddings(30).sum(), r.frame_embs)[0]
    assert torch.allclose(g.sum(), torch.tensor(30.0 * 32)) and bool((g > 0).all())


def test_interpolation_bf16_and_errors():
    r = _model(frames=8).to(torch.bfloat16)
    e = r.frame_embeddings(30)
    assert e.dtype == torch.bfloat16 and e.shape == (30, 32)
    assert torch.equal(e[0], r.frame_embs[0])
    with pytest.raises(ValueError, match="at least 1 frame"):
        r.frame_embeddings(0)
    with pytest.raises(ValueError, match="at least 1 frame"):
        r(torch.randn(1, 2, 0, 5, 32, dtype=torch.bfloat16))
    plain = PerceiverResampler(ResamplerConfig(dim=32, depth=1, heads=2, dim_head=16, num_latents=4))
    with pytest.raises(ValueError, match="no temporal embeddings"):
        plain.frame_embeddings(4)
    # without temporal embeddings a clip's frames are just more keys
    out = plain(torch.randn(1, 2, 3, 5, 32))
    assert out.shape == (1, 2, 4, 32)


def _spatial_model(max_spatial, kind="perceiver"):
    torch.manual_seed(torch.seed() & 0xFFFF)
    return PerceiverResampler(ResamplerConfig(dim=32, depth=2, heads=2, dim_head=16, num_latents=8,
                                              max_num_frames=4, max_num_spatial=max_spatial, kind=kind))


@pytest.mark.parametrize("S", [1, 4, 6])
def test_spatial_embeddings_through_whole_resampler(S):
    r = _spatial_model(6)
    x = torch.randn(2, 2, 3, S, 32, requires_grad=True)
    out = r(x)
    go = torch.randn(out.shape)
    gx, gs = torch.autograd.grad(out, [x, r.spatial_embs], go)
    x64 = x.detach().double().requires_grad_()
    r64 = copy.deepcopy(r).double()
    want = plain_resampler(r64, x64, r64.latents)
    wx, ws = torch.autograd.grad(want, [x64, r64.spatial_embs], go.double())
    assert rel_err(out, want) < 1e-5 and rel_err(gx, wx) < 1e-4 and rel_err(gs, ws) < 1e-4
    # positions beyond S get no gradient; each used one does
    assert torch.equal(gs[S:], torch.zeros_like(gs[S:])) and bool((gs[:S].abs().sum(-1) > 0).all())


def test_spatial_embeddings_tell_positions_apart():
    """Without them the resampler is blind to the order of a frame's features (a set); with
    them a permutation of the positions changes the output."""
    x = torch.randn(1, 1, 2, 4, 32)
    perm = x[:, :, :, [1, 0, 3, 2]]
    plain = _spatial_model(None)
    assert plain.spatial_embs is None
    assert torch.allclose(plain(x), plain(perm), rtol=0, atol=1e-5)
    r = _spatial_model(4)
    assert not torch.allclose(r(x), r(perm), rtol=0, atol=1e-3)


def test_spatial_embeddings_keep_other_init_and_state():
    """Off (None) by default: no parameter, and turning it on draws it after every other
    parameter, so the rest of the init is unchanged; too many positions is a clear error."""
    torch.manual_seed(3)
    a = PerceiverResampler(ResamplerConfig(dim=32, depth=1, heads=2, dim_head=16, num_latents=4, max_num_frames=4))
    torch.manual_seed(3)
    b = PerceiverResampler(ResamplerConfig(dim=32, depth=1, heads=2, dim_head=16, num_latents=4, max_num_frames=4,
                                           max_num_spatial=9))
    sa, sb = a.state_dict(), b.state_dict()
    assert "spatial_embs" not in sa and sb["spatial_embs"].shape == (9, 32)
    assert set(sb) - set(sa) == {"spatial_embs"}
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k != "latents") and torch.equal(sa["latents"], sb["latents"])
    with pytest.raises(ValueError, match=r"at most 9 features per frame \(max_num_spatial\)"):
        b(torch.randn(1, 1, 2, 10, 32))
    with pytest.raises(ValueError, match="max_num_spatial >= 1"):
        ResamplerConfig(dim=32, max_num_spatial=0)


def test_spatial_embeddings_in_mlp_resampler():
    from flamingo_rt.models.mlp_resampler import MLPResampler
    torch.manual_seed(5)
    r = MLPResampler(ResamplerConfig(kind="mlp", dim=32, depth=1, num_latents=2, max_num_frames=2, max_num_spatial=4))
    x = torch.randn(1, 1, 2, 4, 32)
    assert r.spatial_embs is not None
    assert not torch.allclose(r(x), r(x[:, :, :, [1, 0, 3, 2]]), rtol=0, atol=1e-4)


def test_spatial_embeddings_save_load_and_generate(tmp_path):
    """A Flamingo whose resampler has spatial embeddings round-trips through a model folder
    (config and weights) and scores through the runtime's media caches as the plain forward."""
    from flamingo_rt.io.pretrained import save_pretrained
    from flamingo_rt.models import Flamingo
    from flamingo_rt.recipe import get_recipe_preset
    from flamingo_rt.recipe.lm_pretrain import train_tokenizer
    from flamingo_rt.runtime import Generator

    rc = get_recipe_preset("toy")
    tok = train_tokenizer(rc.lm, 0)
    cfg = rc.model
    cfg.lm.vocab_size = tok.vocab_size
    cfg.pad_token_id, cfg.eos_token_id = tok.pad_token_id, tok.eos_token_id
    cfg.resampler.max_num_spatial = 16
    torch.manual_seed(0)
    m = Flamingo(cfg).eval()
    with torch.no_grad():
        m.resampler.spatial_embs.mul_(10.0)  # large enough to matter
    save_pretrained(m, tmp_path / "m", tokenizer=tok)
    gen = Generator.from_pretrained(tmp_path / "m", max_media=2)
    assert gen.model.config.resampler.max_num_spatial == 16
    assert torch.equal(gen.model.resampler.spatial_embs, m.resampler.spatial_embs)
    img = torch.rand(3, 32, 32)
    prompt = [img, "a red square.", img.flip(-1), "a"]
    cached = gen.score(prompt, [" blue", " red"])
    enc = gen.encode(prompt)
    media = torch.stack(enc.media)[None]
    full = []
    for c in (" blue", " red"):
        cand = tok.encode(c)
        with torch.no_grad():
            logits = m(torch.tensor([enc.ids + cand]), media).logits[0].float().log_softmax(-1)
        n = len(enc.ids)
        full.append(sum(float(logits[n - 1 + j, t]) for j, t in enumerate(cand)))
    assert cached == pytest.approx(full, abs=1e-4)
