"""The fused CPU decode step (flamingo_rt.runtime.fused_decode; csrc/cpu/decode_layer.cpp):
one op per decoder layer and per gated cross-attention block, against the eager modules
(the specification) on the tiny preset and its variants: logits at every step and the
caches it writes, float64 / float32 / bfloat16, batches with left padding and rows without
images, grouped-query heads, biases, all-previous attention, squared-ReLU FF, ungated
blocks, a block before every layer or every other; the fallbacks; the ops' argument errors."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from flamingo_rt.io import FlamingoTokenizer
from flamingo_rt.models import Flamingo, get_preset
from flamingo_rt.runtime import GenerationConfig, Generator, fused_decode
from flamingo_rt.runtime.engine import decode_step
from conftest import rel_err

WORDS = "red green blue square circle triangle small big left right above below one two three a the of is".split()

# name -> (lm changes, xattn changes)
VARIANTS = {
    "tiny": ({}, {}),
    "gqa_bias": (dict(n_heads=4, n_kv_heads=2, attention_bias=True, mlp_bias=True), {}),
    "all_previous_sqrelu_every1": ({}, dict(all_previous=True, ff_kind="sqrelu", every=1)),
    "ungated": ({}, dict(gated=False)),
}
# Measured on an AVX-512 CPU: float64 ~8e-8 (RMSNorm normalizes in float32, as lm.RMSNorm does,
# and its sums round differently), float32 ~2e-7, bfloat16 0 (every rounding where the eager
# modules round; another CPU's vector exp / erf may move a last bit before a rounding)
TOL = {torch.float64: 1e-6, torch.float32: 2e-6, torch.bfloat16: 5e-3}


@pytest.fixture(scope="module")
def tok():
    corpus = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for i in range(12)) for j in range(300)]
    return FlamingoTokenizer.train_bpe(corpus, vocab_size=300)


def make_gen(tok, variant: str, dtype: torch.dtype) -> Generator:
    lm_changes, x_changes = VARIANTS[variant]
    cfg = get_preset("tiny")
    cfg.lm = replace(cfg.lm, vocab_size=tok.vocab_size, **lm_changes)
    cfg.xattn = replace(cfg.xattn, **x_changes)
    torch.manual_seed(7)
    model = Flamingo(cfg).eval()
    with torch.no_grad():
        for b in model.xattn_blocks():
            if b.gated:
                b.attn_gate.fill_(0.9)
                b.ff_gate.fill_(-0.6)
        for name, p in model.lm.named_parameters():  # RMSNorm weights and biases off their init
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return Generator(model.to(dtype), tok, max_seq_len=96, max_media=4)


def img(g):
    return torch.rand(3, 64, 64, generator=g)


PROMPTS = lambda g: [  # noqa: E731  three rows: two images, one image late, no image
    [img(g), "a red square", img(g), "two blue circle"],
    ["the big", img(g), "one"],
    ["left right above below one two"],
]


def run(gen, prompts, steps, fused: bool):
    """Logits of the prefill and of each decode step, and a copy of the cache afterwards
    (its K/V, length, position and image counts)."""
    encs = [gen.encode(p) for p in prompts]
    cache = gen._cache(len(encs))
    old = fused_decode.set_enabled(fused)
    try:
        with torch.no_grad():
            out = [gen._prefill(cache, encs).double()]
            for k, v in cache.media_kv.values():  # media slots a row does not have: filled with
                for b, n in enumerate(cache.num_media.tolist()):  # values that would show if read
                    k[b, n:] = 3.0  # (NaN keys would not: the kernels' max skips them)
                    v[b, n:] = 3.0
            for t in steps:
                out.append(decode_step(gen.model, cache, t).double())
    finally:
        fused_decode.set_enabled(old)
    snap = dict(kv=[(k.clone(), v.clone()) for k, v in cache.kv], length=cache.length,
                position=int(cache.position), image_count=cache.image_count.clone())
    return out, snap


class Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


@pytest.fixture
def counted(monkeypatch):
    ns = torch.ops.flamingo_rt_C
    layer, block = Counter(ns.decoder_layer_step_), Counter(ns.xattn_block_step_)
    monkeypatch.setattr(ns, "decoder_layer_step_", layer)
    monkeypatch.setattr(ns, "xattn_block_step_", block)
    return layer, block


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_steps_equal_the_eager_modules(tok, variant, dtype, counted):
    gen = make_gen(tok, variant, dtype)
    g = torch.Generator().manual_seed(3)
    prompts = PROMPTS(g)
    steps = [torch.randint(4, tok.vocab_size, (len(prompts),), generator=g) for _ in range(5)]
    assert gen.model.config.image_token_id < 4  # no step feeds an <image>
    eager, c_eager = run(gen, prompts, steps, fused=False)
    assert counted[0].calls == 0 and counted[1].calls == 0
    fused, c_fused = run(gen, prompts, steps, fused=True)
    n_layers, n_blocks = len(gen.model.lm.layers), len(gen.model.lm.xattn)
    assert counted[0].calls == len(steps) * n_layers and counted[1].calls == len(steps) * n_blocks
    assert n_blocks == (n_layers if variant.endswith("every1") else n_layers // 2)  # tiny: a block every 2
    tol = TOL[dtype]
    assert rel_err(fused[0], eager[0]) == 0  # the prefill is the same code
    for i in range(1, len(steps) + 1):
        assert torch.isfinite(fused[i]).all() and torch.isfinite(eager[i]).all()
        assert rel_err(fused[i], eager[i]) < tol, (i, rel_err(fused[i], eager[i]))
    # every K/V the steps wrote, at the same slots (and nothing else changed)
    for (ke, ve), (kf, vf) in zip(c_eager["kv"], c_fused["kv"]):
        assert rel_err(kf.double(), ke.double()) < tol and rel_err(vf.double(), ve.double()) < tol
    assert c_fused["length"] == c_eager["length"] and c_fused["position"] == c_eager["position"]
    assert torch.equal(c_fused["image_count"], c_eager["image_count"])


def test_rows_without_image_and_all_previous_reach_the_kernel(tok):
    """The row without images contributes exactly nothing through the attention: zeroing
    every media K/V changes no logit of that row, and changes the others' (so the test
    would see a kernel reading the wrong image)."""
    gen = make_gen(tok, "all_previous_sqrelu_every1", torch.float64)
    g = torch.Generator().manual_seed(5)
    prompts = PROMPTS(g)
    steps = [torch.tensor([5, 6, 7])]
    base, _ = run(gen, prompts, steps, fused=True)
    encs = [gen.encode(p) for p in prompts]
    cache = gen._cache(len(encs))
    with torch.no_grad():
        gen._prefill(cache, encs)
        for k, v in cache.media_kv.values():
            k[:, 0].zero_()  # the first image of each row
            v[:, 0].zero_()
        after = decode_step(gen.model, cache, steps[0]).double()
    assert rel_err(after[2], base[1][2]) == 0  # no image: untouched
    assert rel_err(after[0], base[1][0]) > 1e-6  # all previous images: image 0 is read
    assert rel_err(after[1], base[1][1]) > 1e-6  # its one image is image 0


def test_greedy_generation_is_unchanged(tok):
    gen = make_gen(tok, "tiny", torch.float32)
    g = torch.Generator().manual_seed(11)
    prompts = PROMPTS(g)
    cfg = GenerationConfig(max_new_tokens=12, stop_on_eoc=False, stop_on_eos=False)
    with fused_decode.disabled():
        want = gen.generate(prompts, cfg)
    assert fused_decode.enabled()
    assert gen.generate(prompts, cfg) == want
    beams = GenerationConfig(max_new_tokens=8, num_beams=3, stop_on_eoc=False, stop_on_eos=False)
    with fused_decode.disabled():
        want = gen.generate(prompts[:2], beams)
    assert gen.generate(prompts[:2], beams) == want


def test_fallbacks_to_the_eager_modules(tok, counted):
    gen = make_gen(tok, "tiny", torch.float32)
    lm, cache = gen.model.lm, gen._cache(1)
    ids = torch.tensor([[5]])
    torch.set_grad_enabled(False)
    try:
        _check_fallbacks(gen, lm, cache, ids, counted)
    finally:
        torch.set_grad_enabled(True)


def _check_fallbacks(gen, lm, cache, ids, counted):
    assert fused_decode.eligible(lm, cache, ids, None) and fused_decode.eligible(lm, cache, ids, "cpu")
    assert fused_decode.layer_plan(lm, cache.dtype) is not None
    assert not fused_decode.eligible(lm, cache, ids, "reference")
    assert not fused_decode.eligible(lm, cache, torch.tensor([[5, 6]]), None)  # a chunk of 2 tokens
    assert not fused_decode.eligible(lm, cache, torch.zeros(17, 1, dtype=torch.long), None)  # > 16 rows
    with torch.enable_grad():
        assert not fused_decode.eligible(lm, cache, ids, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_decode.eligible(lm, cache, ids, None)
    with fused_decode.disabled():
        assert not fused_decode.eligible(lm, cache, ids, None)
    lm.train()
    assert not fused_decode.eligible(lm, cache, ids, None)
    lm.eval()
    # a weight of another dtype, or a module that is not the stock one: the eager modules
    blk = next(iter(lm.xattn.values()))
    w = blk.ff.fc1.weight
    blk.ff.fc1.weight = torch.nn.Parameter(w.detach().double(), requires_grad=False)
    assert fused_decode.layer_plan(lm, cache.dtype) is None
    blk.ff.fc1.weight = w
    assert fused_decode.layer_plan(lm, cache.dtype) is not None

    class MyLayer(type(lm.layers[0])):
        pass

    layer = lm.layers[1]
    layer.__class__ = MyLayer
    try:
        assert fused_decode.layer_plan(lm, cache.dtype) is None
        out = gen.generate(["a red square"], GenerationConfig(max_new_tokens=3, stop_on_eoc=False, stop_on_eos=False))
        assert counted[0].calls == 0 and out is not None
    finally:
        layer.__class__ = type(lm.layers[0])


def test_op_argument_errors():
    D, H, Dh, F, S = 16, 2, 8, 24, 10
    h = torch.randn(1, D)
    w = [torch.ones(D), torch.randn(H * Dh, D), torch.randn(H * Dh, D), torch.randn(H * Dh, D),
         torch.randn(D, H * Dh), torch.ones(D), torch.randn(F, D), torch.randn(F, D), torch.randn(D, F)]
    b = [None] * 7
    cos, sin = torch.ones(1, Dh), torch.zeros(1, Dh)
    kc, vc = torch.zeros(1, H, S, Dh), torch.zeros(1, H, S, Dh)
    mask = torch.ones(1, 4, dtype=torch.bool)
    op = torch.ops.flamingo_rt_C.decoder_layer_step_
    op(h, w, b, cos, sin, kc, vc, torch.tensor([3]), mask, 1e-5, 1e-5, Dh ** -0.5)  # fine
    assert kc[0, :, 3].abs().sum() > 0 and kc[0, :, 4:].abs().sum() == 0
    with pytest.raises(RuntimeError, match=r"expected slot in \[0, 4\), got 4"):
        op(h, w, b, cos, sin, kc, vc, torch.tensor([4]), mask, 1e-5, 1e-5, 0.3)
    with pytest.raises(RuntimeError, match="expected gate_proj.weight of shape"):
        op(h, w[:6] + [torch.randn(F, D + 1)] + w[7:], b, cos, sin, kc, vc, torch.tensor([0]), mask, 1e-5, 1e-5, 0.3)
    with pytest.raises(RuntimeError, match="expected q_proj.weight a contiguous CPU tensor of dtype Float"):
        op(h, w[:1] + [w[1].double()] + w[2:], b, cos, sin, kc, vc, torch.tensor([0]), mask, 1e-5, 1e-5, 0.3)
    with pytest.raises(RuntimeError, match="expected at most 16 rows"):
        op(torch.randn(17, D), w, b, cos, sin, kc, vc, torch.tensor([0]), mask, 1e-5, 1e-5, 0.3)
    with pytest.raises(RuntimeError, match="expected a bool mask"):
        op(h, w, b, cos, sin, kc, vc, torch.tensor([0]), torch.ones(1, S + 1, dtype=torch.bool), 1e-5, 1e-5, 0.3)
    xw = [torch.ones(D), torch.zeros(D), torch.randn(H * Dh, D), torch.randn(D, H * Dh), torch.ones(D), torch.zeros(D),
          torch.randn(F, D), torch.randn(D, F)]
    k = torch.randn(1, 3, 5, H, Dh)
    xop = torch.ops.flamingo_rt_C.xattn_block_step_
    xop(h, xw, [None, None], k, k, torch.tensor([2], dtype=torch.int32), False, False, 1e-5, 1e-5)
    with pytest.raises(RuntimeError, match=r"expected media_index\[0\] in \[-1, 3\), got 3"):
        xop(h, xw, [None, None], k, k, torch.tensor([3], dtype=torch.int32), False, False, 1e-5, 1e-5)
    with pytest.raises(RuntimeError, match="all_previous needs evenly spaced images"):
        ks = torch.randn(1, 3, 6, H, Dh)[:, :, :5]
        xop(h, xw, [None, None], ks, ks, torch.tensor([2], dtype=torch.int32), True, False, 1e-5, 1e-5)
    with pytest.raises(RuntimeError, match="expected media_index a contiguous int32"):
        xop(h, xw, [None, None], k, k, torch.tensor([2]), False, False, 1e-5, 1e-5)
