"""The composed Flamingo model: exact identity at zero gates, freezing, errors, presets."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flamingo_rt.models import get_preset
from flamingo_rt.models.flamingo import Flamingo
from flamingo_rt.models.stats import build_meta, count_forward_flops, count_parameters

IMG = 0  # the tiny preset's <image> id


def tiny_model() -> Flamingo:
    return Flamingo(get_preset("tiny"))


def make_batch(counts=(2, 1), T=24, vocab=512, size=64, M=None):
    B = len(counts)
    M = M or max(max(counts), 1)
    ids = torch.randint(3, vocab, (B, T))
    for b, c in enumerate(counts):
        pos = torch.randperm(T - 2)[:c].sort().values + 1
        ids[b, pos] = IMG
    media = torch.randn(B, M, 1, 3, size, size)
    return ids, media, torch.tensor(counts)


def open_gates(model, value=0.7):
    with torch.no_grad():
        for blk in model.xattn_blocks():
            blk.attn_gate.fill_(value)
            blk.ff_gate.fill_(-value)


def test_zero_gate_flamingo_equals_its_lm_bitwise():
    model = tiny_model().eval()
    ids, media, n = make_batch((2, 1))
    with torch.no_grad():
        got = model(ids, media, num_media=n).logits
        want = model.lm(ids)  # no blocks applied at all
        assert torch.equal(got, want)
        open_gates(model)
        assert not torch.equal(model(ids, media, num_media=n).logits, want)


def test_frozen_backbones_get_no_gradients():
    model = tiny_model().freeze_backbones()
    model.train()
    assert not model.vision_encoder.training  # a frozen encoder stays in eval mode
    open_gates(model, 0.3)
    ids, media, n = make_batch((2, 2))
    labels = ids.clone()
    labels[ids == IMG] = -100
    model(ids, media, labels=labels, num_media=n).loss.backward()
    for name, p in model.named_parameters():
        trainable = name.startswith("resampler.") or name.startswith("lm.xattn.")
        assert p.requires_grad == trainable, name
        if trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    # gradients flow through the frozen LM into the first block's gates
    first = next(iter(model.xattn_blocks()))
    assert first.attn_gate.grad.abs().item() > 0


def test_loss_is_shifted_cross_entropy_with_ignore_index():
    model = tiny_model().eval()
    open_gates(model)
    ids, media, n = make_batch((1,))
    labels = ids.clone()
    labels[0, :5] = -100
    out = model(ids, media, labels=labels, num_media=n)
    want = F.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    assert torch.allclose(out.loss, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_only_forward_equals_the_logits_path(reduction):
    """return_logits=False (the chunked LM head + loss) gives the logits path's loss and the
    same gradients (trainable connectors and the embedding rows, through the tied head)."""
    torch.manual_seed(0)
    model = tiny_model().freeze_backbones()
    model.lm.embed_tokens.weight.requires_grad_(True)
    open_gates(model, 0.4)
    ids, media, n = make_batch((2, 1))
    labels = ids.clone()
    labels[ids == IMG] = -100
    labels[1, -4:] = -100
    grads = []
    for logits_path in (True, False):
        model.zero_grad(set_to_none=True)
        out = model(ids, media, labels=labels, num_media=n, return_logits=logits_path, loss_reduction=reduction)
        assert (out.logits is None) != logits_path
        out.loss.backward()
        grads.append((out.loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    (l1, g1), (l2, g2) = grads
    assert torch.allclose(l1, l2, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g2.keys() and "lm.embed_tokens.weight" in g1
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-6, msg=k)
    with pytest.raises(ValueError, match="needs labels"):
        model(ids, media, num_media=n, return_logits=False)
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        model(ids, media, labels=labels, num_media=n, loss_reduction="max")


def test_rows_with_different_image_counts_equal_running_alone():
    model = tiny_model().eval()
    open_gates(model)
    ids, media, n = make_batch((3, 1, 0), M=3)
    with torch.no_grad():
        batched = model(ids, media, num_media=n).logits
        for b in range(3):
            c = int(n[b])
            alone = model(ids[b:b + 1], media[b:b + 1, :max(c, 1)], num_media=c).logits
            assert torch.allclose(batched[b], alone[0], rtol=1e-5, atol=1e-5), b


def test_more_image_tokens_than_images_is_an_error():
    model = tiny_model()
    ids, media, _ = make_batch((3, 1), M=3)
    with pytest.raises(ValueError, match="batch row 0 has 3 <image> tokens but 2 images were supplied"):
        model(ids, media, num_media=torch.tensor([2, 1]))
    with pytest.raises(ValueError, match="no media were supplied"):
        model(ids)
    # counts beyond the media given (M = 3) were taken silently; negative ones too
    for bad in (torch.tensor([4, 1]), torch.tensor([-1, 1]), 5):
        with pytest.raises(ValueError, match=r"expected num_media in \[0, 3\] \(the media given per row\)"):
            model(ids, media, num_media=bad)
    with pytest.raises(TypeError, match="expected integer num_media, got torch.float32"):
        model(ids, media, num_media=torch.tensor([3.0, 1.0]))


def test_bad_media_and_ids_are_clear_errors():
    model = tiny_model()
    ids, media, n = make_batch((1, 1))
    with pytest.raises(ValueError, match=r"expected media of shape \(B, M, F, 3, H, W\) or \(B, M, 3, H, W\), got \(2, 1, 1, 4, 64, 64\)"):
        model(ids, torch.randn(2, 1, 1, 4, 64, 64), num_media=n)
    with pytest.raises(TypeError, match="expected floating-point media.*torch.uint8"):
        model(ids, (media * 50).to(torch.uint8), num_media=n)
    bad = ids.clone()
    bad[1, 4] = 512
    with pytest.raises(ValueError, match=r"token id 512 is out of range for vocab_size 512"):
        model(bad, media, num_media=n)
    with pytest.raises(ValueError, match=r"expected input_ids of shape \(B, T\)"):
        model(ids[0], media, num_media=n)
    with pytest.raises(ValueError, match=r"expected integer input_ids .*got torch.float32"):
        model(ids.float(), media, num_media=n)
    with pytest.raises(TypeError, match=r"expected integer labels .*got torch.float32"):
        model(ids, media, num_media=n, labels=ids.float())


def test_video_media_and_still_shorthand():
    model = tiny_model().eval()
    open_gates(model)
    ids, media, n = make_batch((1,))
    with torch.no_grad():
        a = model(ids, media, num_media=n).logits
        b = model(ids, media[:, :, 0], num_media=n).logits  # (B, M, C, H, W)
        assert torch.equal(a, b)
        clip = torch.randn(1, 1, 3, 3, 64, 64)  # 3 frames
        assert torch.isfinite(model(ids, clip).logits).all()


def test_external_vision_encoder():
    cfg = get_preset("tiny")
    cfg.vision.kind = "external"

    class Patches(nn.Module):  # a CLIP-like stand-in returning (N, S, Dv)
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, 64, 16, 16)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)

    model = Flamingo(cfg, vision_encoder=Patches()).eval()
    ids, media, n = make_batch((2,))
    assert model(ids, media, num_media=n).logits.shape == (1, 24, 512)
    with pytest.raises(RuntimeError, match="pass vision_encoder="):
        Flamingo(cfg)(ids, media, num_media=n)


def test_compile_fullgraph_and_export():
    model = tiny_model().eval()
    open_gates(model)
    ids, media, n = make_batch((2,))
    with torch.no_grad():
        eager = model(ids, media).logits
        compiled = torch.compile(lambda i, m: model(i, m).logits, fullgraph=True, backend="aot_eager")
        assert torch.allclose(compiled(ids, media), eager, rtol=1e-5, atol=1e-5)

    class Wrapper(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, media):
            return self.m(ids, media).logits

    ep = torch.export.export(Wrapper(model), (ids, media))
    targets = {str(node.target) for node in ep.graph.nodes}
    assert any("image_causal_attention" in t for t in targets)
    assert any("resampler_attention" in t for t in targets)
    with torch.no_grad():
        assert torch.allclose(ep.module()(ids, media), eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name,lo,hi",
    [("flamingo-3b", 2.8e9, 3.5e9), ("flamingo-9b", 9e9, 11.5e9), ("flamingo-80b", 70e9, 85e9),
     ("open-flamingo-3b", 2.0e9, 3.0e9)],
)
def test_presets_on_meta_device(name, lo, hi):
    model = build_meta(name)
    assert all(p.device.type == "meta" for p in model.parameters())
    counts = count_parameters(model)
    assert lo < counts["total"] < hi, counts
    assert counts["xattn"] > 0 and counts["resampler"] > 0
    flops = count_forward_flops(model, seq_len=64, num_media=1)
    assert flops["lm"] > 2 * (counts["lm"] + counts["xattn"]) * 64 * 0.5
    if name != "open-flamingo-3b":
        assert flops["vision"] > 0


def test_tiny_preset_is_small():
    counts = count_parameters(tiny_model())
    assert counts["total"] < 2_000_000, counts
