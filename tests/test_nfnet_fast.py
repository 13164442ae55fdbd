"""The frozen NFNet fast path (issue 5): exact folds of the activation gammas and block
betas into the next convs' weights, oneDNN conv + bias + GELU on the CPU, channels-last,
chunked encoding, and a frozen Flamingo taking the path by itself. No timm needed (the
timm parity of the fast path is in test_nfnet.py)."""
from __future__ import annotations

import pytest
import torch

from flamingo_rt.models import Flamingo, get_preset
from flamingo_rt.models.config import NFNetConfig
from flamingo_rt.models.nfnet import GELU_GAMMA, NFNet, ScaledStdConv2d
from conftest import rel_err


def _random_net(seed: int, cfg=None) -> NFNet:
    """A small dm_nfnet-layout NFNet with every parameter random (skipinit gains non-zero,
    so residual branches matter; several blocks per stage, so beta != 1)."""
    cfg = cfg or NFNetConfig(depths=(1, 2, 2, 1), channels=(32, 48, 64, 96), stem_chs=16,
                             group_size=8, num_features=128)
    torch.manual_seed(seed)
    net = NFNet(cfg).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("skipinit_gain"):
                p.copy_(0.5 + torch.rand(()))
            elif name.endswith(".gain"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.add_(0.1 * p.std() * torch.randn_like(p))
    return net


def test_in_scales_are_the_folded_gammas_and_betas():
    net = _random_net(0)
    assert net.stem.conv1.in_scale == 1.0 and net.stem.conv2.in_scale == GELU_GAMMA
    assert net.final_conv.in_scale == 1.0
    betas = []
    for stage in net.stages:
        for block in stage:
            assert block.conv1.in_scale == pytest.approx(GELU_GAMMA * block.beta)
            assert block.conv2.in_scale == block.conv2b.in_scale == block.conv3.in_scale == GELU_GAMMA
            if block.downsample is not None:
                assert block.downsample.conv.in_scale == block.conv1.in_scale
            betas.append(block.beta)
    assert any(b != 1.0 for b in betas)  # the folds are not all trivial


@pytest.mark.parametrize("hw", [(64, 64), (50, 38)])
def test_folded_equals_unfolded_within_fp32_rounding(hw):
    net = _random_net(1)
    x = torch.randn(3, 3, *hw)
    with torch.no_grad():
        want = net.forward_features(x)
        net.freeze()  # fast by default
        assert net.fast
        got = net.forward_features(x)
    assert got.shape == want.shape
    err = rel_err(got, want)
    print(f"folded vs unfolded {hw}: rel err {err:.2e}")
    assert err < 2e-6
    # and against the unfolded model in float64 (the fast path's own error is fp32-sized)
    net64 = _random_net(1).double().eval()
    with torch.no_grad():
        want64 = net64.forward_features(x.double())
    assert rel_err(got, want64) < 1e-5
    # the tokens of a channels-last grid are a free (contiguous) view
    tokens = net(x)
    assert tokens.is_contiguous() and torch.equal(tokens, got.flatten(2).transpose(1, 2))


def test_fast_path_uses_fewer_ops_per_conv():
    """Every conv of the fast path is one fused call: no separate bias/gamma pass after
    the convs of the residual branches (counted through the op the plain path uses)."""
    from flamingo_rt.ops import nfconv

    net = _random_net(2).freeze()
    x = torch.randn(1, 3, 32, 32)
    calls = {"bga": 0}
    orig = nfconv.bias_gamma_act

    def counting(*a, **k):
        calls["bga"] += 1
        return orig(*a, **k)

    nfconv.bias_gamma_act = counting
    try:
        with torch.no_grad():
            net.forward_features(x)
        fast_calls = calls["bga"]
        calls["bga"] = 0
        net.fast = False
        with torch.no_grad():
            net.forward_features(x)
        plain_calls = calls["bga"]
    finally:
        nfconv.bias_gamma_act = orig
    n_blocks = sum(len(s) for s in net.stages)
    # plain: 3 stem + 4 per block + final; fast on CPU: only the block pre-activations
    assert plain_calls == 3 + 4 * n_blocks + 1
    assert fast_calls == n_blocks


def test_fast_path_bfloat16_close_to_float32():
    net = _random_net(3)
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        want = net.forward_features(x)
        net16 = _random_net(3).to(torch.bfloat16).freeze()
        got = net16.forward_features(x)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, want) < 3e-2


def test_bfloat16_squeeze_excite_reads_its_bf16_weights():
    """In a bfloat16 model the SE's frozen path keeps fc1 / fc2 in bfloat16 (no float32 copies:
    half the bytes to read) and gives the logits of the float32 path on the widened weights:
    bitwise where the C++ kernels run (the widening is exact, the sums in the same order)."""
    from flamingo_rt import _ext
    from flamingo_rt.ops.linear import linear

    net16 = _random_net(3).to(torch.bfloat16).freeze()
    se = net16.stages[1][0].attn_last
    h = torch.randn(3, se.fc1.weight.shape[1], 5, 4).bfloat16()
    with torch.no_grad():
        got = se.forward_fast(h)
        w1, b1, w2, b2 = se._fast_params()
        assert (w1.dtype, w2.dtype, b1.dtype, b2.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32, torch.float32)
        pooled = h.float().mean(dim=(2, 3))
        want = linear(torch.relu(linear(pooled, w1.float(), b1)), w2.float(), b2).to(torch.bfloat16)
        if _ext.load():
            from flamingo_rt.ops import nfconv
            pooled = nfconv.spatial_mean(h)
            want = linear(torch.relu(linear(pooled, w1.float(), b1)), w2.float(), b2).to(torch.bfloat16)
            assert torch.equal(got, want)
        else:
            assert rel_err(got, want) < 1e-2
        assert got.dtype == torch.bfloat16 and got.shape == (3, se.fc2.weight.shape[0])
    # float32 models keep float32 weights
    w1, *_ = _random_net(3).freeze().stages[1][0].attn_last._fast_params()
    assert w1.dtype == torch.float32


def test_channels_last_off_and_chunking_give_the_same_features():
    net = _random_net(4).freeze()
    assert net.chunk_size == 256  # default: bounded memory for big frame batches
    x = torch.randn(5, 3, 40, 40)
    with torch.no_grad():
        want = net.forward_features(x)
        assert want.is_contiguous(memory_format=torch.channels_last)
        net.chunk_size = 2
        chunked = net.forward_features(x)
        net.chunk_size = None
        net.channels_last = False
        nchw = net.forward_features(x)
    assert rel_err(chunked, want) < 1e-6  # oneDNN may pick another algorithm per batch size
    assert rel_err(nchw, want) < 1e-6
    net.chunk_size = 0
    with pytest.raises(ValueError, match="expected chunk_size >= 1 or None, got 0"):
        net(x)


def test_fast_path_tracks_weight_changes_and_unfreeze():
    net = _random_net(5).freeze()
    x = torch.randn(2, 3, 32, 32)
    sd = {k: v + 0.05 * torch.randn_like(v) for k, v in net.state_dict().items()}
    net.load_state_dict(sd)  # after freezing: the fast weights must follow
    fresh = _random_net(6).eval()
    fresh.load_state_dict(sd)
    with torch.no_grad():
        assert rel_err(net(x), fresh(x)) < 2e-6
    net.unfreeze()
    assert not net.fast
    net(x).sum().backward()
    assert net.stem.conv2.weight.grad is not None


def test_input_gradients_through_the_fast_path():
    """Frozen parameters, images requiring grad (e.g. an attack or saliency): the fast path
    falls back to differentiable ops and matches the plain path."""
    net = _random_net(7)
    x = torch.randn(1, 3, 32, 32)
    r = torch.randn(1, 128, 1, 1)
    xa = x.clone().requires_grad_()
    net.requires_grad_(False)
    (net.forward_features(xa) * r).sum().backward()
    net.freeze()
    xb = x.clone().requires_grad_()
    (net.forward_features(xb) * r).sum().backward()
    assert rel_err(xb.grad, xa.grad) < 1e-5


def test_frozen_flamingo_uses_the_fast_path(monkeypatch):
    model = Flamingo(get_preset("tiny")).freeze_backbones()
    enc = model.vision_encoder
    assert isinstance(enc, NFNet) and enc.fast
    hits = []
    orig = NFNet._features_fast

    def spy(self, x, be):
        hits.append(x.shape[0])
        return orig(self, x, be)

    monkeypatch.setattr(NFNet, "_features_fast", spy)
    media = torch.randn(2, 3, 1, 3, 32, 32)  # (B, M, F, C, H, W): 6 frames in one call
    with torch.no_grad():
        toks = model.encode_media(media)
    assert hits == [6]
    assert toks.shape[:2] == (2, 3)
    # many frames, chunked: the same tokens
    enc.chunk_size = 4
    with torch.no_grad():
        again = model.encode_media(media)
    assert hits[1:] == [4, 2]
    assert rel_err(again, toks) < 1e-6
