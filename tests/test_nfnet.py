"""NFNet (flamingo_rt.models.nfnet) against timm's dm_nfnet_f0 on random weights:
feature parity at two resolutions with odd intermediate sizes, gradients, from_timm,
state-dict names, the tiny preset, input errors."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from flamingo_rt.models.config import NFNetConfig, get_preset
from flamingo_rt.models.nfnet import NFNet
from flamingo_rt.ops import backend as B
from conftest import rel_err

timm = pytest.importorskip("timm")
from timm.models import nfnet as timm_nfnet  # noqa: E402


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (timm zero-inits skipinit gains and biases, which would make
    the residual branches vanish): gains around 1, skipinit gains in [0.5, 1.5], biases
    small, weights perturbed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if name.endswith("skipinit_gain"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif name.endswith(".gain"):
                p.copy_(1.0 + 0.2 * r)
            elif name.endswith(".bias"):
                p.copy_(0.1 * r)
            else:
                p.add_(0.1 * p.std() * r)


@pytest.fixture(scope="module")
def pair():
    """(timm dm_nfnet_f0 with random weights, ours from it), fp32, eval, parameters frozen
    (the f0 tests check features and input gradients; parameter gradients are checked on
    the smaller model of :func:`mid_pair`)."""
    torch.manual_seed(1234)
    tm = timm.create_model("dm_nfnet_f0", pretrained=False).eval()
    _randomize(tm, 99)
    tm.requires_grad_(False)
    ours = NFNet.from_timm(tm).freeze()
    return tm, ours


def _timm_dm_like(depths, channels, stem_chs, group_size, num_features):
    """A timm NormFreeNet with the dm_nfnet layout and the given shapes."""
    cfg = dataclasses.replace(
        timm_nfnet.model_cfgs["dm_nfnet_f0"],
        depths=tuple(depths), channels=tuple(channels), stem_chs=stem_chs,
        group_size=group_size, num_features=num_features,
    )
    return timm_nfnet.NormFreeNet(cfg).eval()


@pytest.fixture(scope="module")
def mid_pair():
    """A small dm_nfnet-layout timm model with several blocks per stage (so beta != 1,
    blocks with and without downsample) and ours from it; random weights, trainable."""
    torch.manual_seed(4321)
    tm = _timm_dm_like((1, 2, 3, 2), (32, 64, 96, 128), 16, 16, 256)
    _randomize(tm, 5)
    return tm, NFNet.from_timm(tm).eval()


def _tiny_timm():
    """A timm NormFreeNet with the tiny preset's shapes (dm_nfnet layout)."""
    nf = get_preset("tiny").vision.nfnet
    return _timm_dm_like(nf.depths, nf.channels, nf.stem_chs, nf.group_size, nf.num_features)


# ------------------------------------------------------------------ parity


@pytest.mark.parametrize("hw", [(64, 64), (80, 72)])
def test_features_match_timm(pair, hw):
    """64: every strided SAME conv sees an even size (asymmetric pad); 80x72: stage inputs
    of 5 and 9 pixels (odd: symmetric pad, ceil-mode pooling with a partial window)."""
    tm, ours = pair
    assert ours.fast  # frozen: the folded fast path (gammas and betas in the conv weights)
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        want = tm.forward_features(x)
        got = ours.forward_features(x)
    assert got.shape == want.shape == (2, 3072, -(-hw[0] // 32), -(-hw[1] // 32))
    err = rel_err(got, want)
    print(f"dm_nfnet_f0 {hw}: rel err {err:.2e}")
    assert err < 1e-4
    tokens = ours(x)
    assert tokens.shape == (2, want.shape[2] * want.shape[3], 3072)
    assert torch.equal(tokens, got.flatten(2).transpose(1, 2))


def test_residual_branches_matter(pair):
    """The parity test is not vacuous: zeroing the skipinit gains changes timm's output."""
    tm, _ = pair
    x = torch.randn(1, 3, 64, 64)
    gains = {n: p.detach().clone() for n, p in tm.named_parameters() if n.endswith("skipinit_gain")}
    assert gains and all(g.abs() > 0.1 for g in gains.values())
    with torch.no_grad():
        full = tm.forward_features(x)
        for n, p in tm.named_parameters():
            if n in gains:
                p.zero_()
        try:
            no_res = tm.forward_features(x)
        finally:
            for n, p in tm.named_parameters():
                if n in gains:
                    p.copy_(gains[n])
    assert rel_err(no_res, full) > 0.1


def test_input_gradient_matches_timm(pair):
    """dm_nfnet_f0 (parameters frozen): d loss / d images for a random linear loss."""
    tm, ours = pair
    x = torch.randn(2, 3, 64, 48)
    r = torch.randn(2, 3072, 2, 2)
    xt, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    (tm.forward_features(xt) * r).sum().backward()
    (ours.forward_features(xo) * r).sum().backward()
    err = rel_err(xo.grad, xt.grad)
    print(f"dm_nfnet_f0 input grad rel err {err:.2e}")
    assert err < 1e-4


def test_parameter_gradients_match_timm(mid_pair):
    """Every parameter's gradient (conv weights and gains through ws_standardize, biases
    through bias_gamma_act, skipinit gains through se_residual's scale, SE weights)."""
    tm, ours = mid_pair
    x = torch.randn(2, 3, 72, 56)
    r = torch.randn(2, 256, 3, 2)
    xt, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    tm.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    (tm.forward_features(xt) * r).sum().backward()
    (ours.forward_features(xo) * r).sum().backward()
    tp = dict(tm.named_parameters())
    errs = {"input": rel_err(xo.grad, xt.grad)}
    for name, p in ours.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        errs[name] = rel_err(p.grad, tp[name].grad)
    names = [n for n, _ in ours.named_parameters()]
    flat_o = torch.cat([dict(ours.named_parameters())[n].grad.flatten() for n in names])
    flat_t = torch.cat([tp[n].grad.flatten() for n in names])
    total = rel_err(flat_o, flat_t)
    worst = max(errs, key=errs.get)
    print(f"grad rel err: input {errs['input']:.2e}, all params {total:.2e}, worst {worst} {errs[worst]:.2e}")
    assert errs["input"] < 1e-4 and total < 1e-4
    # single tensors (a scalar skipinit gain is one long fp32 sum) get a looser bound
    assert errs[worst] < 1e-3, (worst, errs[worst])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_training_channels_last_matches_nchw(backend):
    """Training runs on channels-last activations by default (weights standardized in that
    layout); in float64 its output and every gradient equal the NCHW graph's, the
    parameters (and so their gradients) keep their own layout."""
    if backend not in B.implemented("ws_standardize"):
        pytest.skip(f"backend {backend} not built")
    # stem_chs 32: the stem's first conv has 4 channels (1 in the tiny preset, where a
    # (N, 1, H, W) tensor is both layouts at once and the rest then runs NCHW)
    cfg = dataclasses.replace(get_preset("tiny").vision.nfnet, stem_chs=32)
    model = NFNet(cfg, backend=backend).double().train()
    _randomize(model, 5)
    nchw = copy.deepcopy(model)
    nchw.channels_last = False
    x = torch.randn(2, 3, 40, 36, dtype=torch.float64)
    outs, grads = [], []
    for m in (model, nchw):
        xi = x.clone().requires_grad_()
        y = m.forward_features(xi)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
        outs.append(y)
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    assert outs[1].is_contiguous()
    assert rel_err(outs[0], outs[1]) < 1e-12
    for (name, p), g_cl, g_ref in zip(model.named_parameters(), grads[0][1:], grads[1][1:]):
        assert p.is_contiguous() and g_cl.shape == p.shape, name
        assert rel_err(g_cl, g_ref) < 1e-10, name
    assert rel_err(grads[0][0], grads[1][0]) < 1e-12
    # float32 (oneDNN's convs): the activations, and so the features, are channels-last
    m32 = model.float()
    y = m32.forward_features(x.float())
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    y.sum().backward()
    assert all(p.grad.is_contiguous() for p in m32.parameters())


# ------------------------------------------------------------------ timm interop


def test_state_dict_names_match_timm(pair):
    tm, ours = pair
    timm_sd = {k: v for k, v in tm.state_dict().items() if not k.startswith("head.")}
    ours_sd = ours.state_dict()
    assert list(ours_sd) == list(timm_sd)
    for k, v in timm_sd.items():
        assert ours_sd[k].shape == v.shape, k
        assert torch.equal(ours_sd[k], v), k


def test_from_timm_config(pair):
    _, ours = pair
    assert ours.config == NFNetConfig.timm("dm_nfnet_f0")


def test_from_timm_round_trip(mid_pair):
    tm, ours = mid_pair
    assert ours.config == NFNetConfig(
        depths=(1, 2, 3, 2), channels=(32, 64, 96, 128), stem_chs=16, group_size=16, num_features=256
    )
    # ours -> fresh NFNet from the config
    again = NFNet(ours.config)
    again.load_timm_state_dict(ours.state_dict())
    # ours -> fresh timm model (only the head is left)
    fresh = _timm_dm_like((1, 2, 3, 2), (32, 64, 96, 128), 16, 16, 256)
    res = fresh.load_state_dict(ours.state_dict(), strict=False)
    assert res.unexpected_keys == [] and res.missing_keys and all(k.startswith("head.") for k in res.missing_keys)
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        a, b = ours.forward_features(x), again.forward_features(x)
        c, d = fresh.forward_features(x), tm.forward_features(x)
    assert torch.equal(a, b)
    assert torch.equal(c, d)
    assert rel_err(a, c) < 1e-5


def test_from_timm_rejects_other_layouts():
    """timm's non-dm NFNets fold gamma into the convs; they are not this layout."""
    cfg = dataclasses.replace(
        timm_nfnet.model_cfgs["dm_nfnet_f0"], depths=(1, 1, 1, 1), channels=(16, 32, 48, 64),
        stem_chs=8, group_size=8, num_features=64, gamma_in_act=False,
    )
    with pytest.raises(ValueError, match="expected a timm dm_nfnet_f"):
        NFNet.from_timm(timm_nfnet.NormFreeNet(cfg))


def test_load_errors_list_keys():
    model = NFNet(get_preset("tiny").vision.nfnet)
    sd = model.state_dict()
    sd.pop("stem.conv1.gain")
    sd["stages.0.0.extra"] = torch.zeros(1)
    sd["head.fc.weight"] = torch.zeros(2, 64)  # ignored
    with pytest.raises(ValueError, match=r"missing keys \['stem.conv1.gain'\].*unexpected keys \['stages.0.0.extra'\]"):
        model.load_timm_state_dict(sd)
    with pytest.raises(ValueError, match="expected a timm"):
        NFNet.from_timm(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------ tiny preset


def test_tiny_builds_runs_and_matches_timm():
    nf = get_preset("tiny").vision.nfnet
    tt = _tiny_timm()
    _randomize(tt, 7)
    ours = NFNet.from_timm(tt)
    assert ours.config == nf
    fresh = NFNet(nf)
    assert list(fresh.state_dict()) == list(ours.state_dict())
    n_params = sum(p.numel() for p in fresh.parameters())
    assert n_params < 1_000_000
    x = torch.randn(3, 3, 64, 64)
    tokens = fresh(x)
    assert tokens.shape == (3, 4, 64) and tokens.dtype == torch.float32
    assert torch.isfinite(tokens).all()
    with torch.no_grad():
        assert rel_err(ours.forward_features(x), tt.forward_features(x)) < 1e-5
    # training: gradients reach every parameter
    _randomize(fresh, 8)
    fresh(x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fresh.parameters())
    # freeze
    fresh.freeze()
    assert not fresh.training and not any(p.requires_grad for p in fresh.parameters())


def test_float64_and_backend_reference():
    nf = get_preset("tiny").vision.nfnet
    model = NFNet(nf, backend="reference").double()
    _randomize(model, 3)
    x = torch.randn(1, 3, 33, 47, dtype=torch.float64)
    out = model.forward_features(x)
    assert out.dtype == torch.float64 and out.shape == (1, 64, 2, 2)
    # float32 input is converted to the parameters' dtype
    assert model(x.float()).dtype == torch.float64


def test_bfloat16_close_to_float32():
    model = NFNet(get_preset("tiny").vision.nfnet)
    _randomize(model, 11)
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        want = model(x)
        got = model.to(torch.bfloat16)(x)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, want) < 3e-2


# ------------------------------------------------------------------ errors


def test_wrong_input_shape_errors():
    model = NFNet(get_preset("tiny").vision.nfnet)
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 3, H, W\), got \(2, 4, 32, 32\)"):
        model(torch.randn(2, 4, 32, 32))
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 3, H, W\), got \(3, 32, 32\)"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="expected floating-point images"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_frozen_fold_is_exact_and_tracks_weight_changes():
    from flamingo_rt.models import get_preset
    from flamingo_rt.models.nfnet import NFNet, ScaledStdConv2d

    cfg = get_preset("tiny").vision.nfnet
    net = NFNet(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        want = net(x)
    net.freeze(fast=False)  # only the standardization folded: the plain graph, bitwise
    convs = [m for m in net.modules() if isinstance(m, ScaledStdConv2d)]
    assert convs and all(m.folded_weight is not None for m in convs)
    assert not any(k.endswith("folded_weight") for k in net.state_dict())  # never saved
    with torch.no_grad():
        assert torch.equal(net(x), want)  # the same op computed once: bitwise equal
    # weights loaded after freezing are picked up (the fold is refreshed, never stale)
    sd = {k: v + 0.05 * torch.randn_like(v) for k, v in net.state_dict().items()}
    net.load_state_dict(sd)
    fresh = NFNet(cfg).eval()
    fresh.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(net(x), fresh(x))
        # the fast path (every exact fold) gives the same features within fp32 rounding
        net.freeze()
        assert rel_err(net(x), fresh(x)) < 2e-6
    # unfrozen: gradients reach the raw weights and gains again
    net.unfreeze()
    net(x).sum().backward()
    assert convs[0].weight.grad is not None and convs[0].gain.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_se_squeeze_mean_and_its_expanded_gradient(dtype, channels_last):
    """The SE squeeze in training is x.mean over H, W bitwise, forward and backward; its gradient
    reaches x as an expanded view (no (N, C, H, W) quotient written), which autograd adds into
    x's other gradient keeping that gradient's memory format."""
    from flamingo_rt.models.nfnet import _MeanHW

    x = torch.randn(3, 16, 7, 5, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(3, 16, dtype=dtype)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a.mean(dim=(2, 3)), _MeanHW.apply(b)
    assert torch.equal(ya, yb)
    (ga,) = torch.autograd.grad(ya, a, g)
    (gb,) = torch.autograd.grad(yb, b, g)
    assert torch.equal(ga, gb) and gb.stride()[2:] == (0, 0)
    c = x.clone().requires_grad_()  # used twice, like a block's conv output and its SE
    other = torch.randn_like(x)
    ((c * other).sum() + (_MeanHW.apply(c) * g).sum()).backward()
    assert torch.equal(c.grad, other + ga)
    assert c.grad.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
