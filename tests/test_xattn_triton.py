"""The Triton backend of image_causal_attention vs the float64 reference (DESIGN.md section 3),
run by the Triton interpreter on the CPU (TRITON_INTERPRET=1, small shapes).

Every output the kernels allocate is poisoned with NaN first, so an element a kernel does
not write fails the comparison. The interpreter runs one fixed tile configuration
(BLOCK_T 16, BLOCK_N 32) so the shapes below cross query-block, key-block and image
boundaries; the GPU autotuner is checked only for its pruning (it needs a GPU to run).
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from flamingo_rt.ops import backend as be  # noqa: E402
from flamingo_rt.ops.reference import xattn as ref  # noqa: E402
from flamingo_rt.ops.xattn import image_causal_attention  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the triton backend runs on the CPU only under TRITON_INTERPRET=1", allow_module_level=True)

from flamingo_rt.ops import _triton_xattn  # noqa: E402

kx = _triton_xattn._kernels()
OP = "image_causal_attention"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Outputs (and the kernels' fp32 scratch) start as NaN instead of whatever memory held."""
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kx, "_empty", nan_empty)


def rel_err(a, b):
    """||a - b|| / ||b||; NaN/inf gives inf. The denominator has a floor of 0.1 per element
    in RMS: some gradients are exactly 0 in exact arithmetic (N = 1: softmax over one key
    has no gradient), where fp32 leaves ~1e-7."""
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    floor = 0.1 * max(b.numel(), 1) ** 0.5
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


def _index(B, T, counts, rng):
    """Non-decreasing media index; row b uses counts[b] images (text before the first one,
    equal starts give 0-token segments, i.e. images nobody sees, and 1-token segments)."""
    idx = torch.full((B, T), -1, dtype=torch.int32)
    for b, c in enumerate(counts):
        starts = sorted(torch.randint(1, T, (c,), generator=rng).tolist())
        for m, s in enumerate(starts):
            idx[b, s:] = m
    return idx


def _inputs(B, T, H, dh, M, N, dtype, counts, noncontig=False):
    rng = torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh inputs every run
    idx = _index(B, T, counts, rng)
    if noncontig:
        q = torch.randn(B, H, T, dh + 3, generator=rng).transpose(1, 2)[..., :dh]
        k = torch.randn(B, N, M, H, dh, generator=rng).transpose(1, 2)
        v = torch.randn(B, M, N, dh, H, generator=rng).transpose(3, 4)
    else:
        q = torch.randn(B, T, H, dh, generator=rng)
        k = torch.randn(B, M, N, H, dh, generator=rng)
        v = torch.randn(B, M, N, H, dh, generator=rng)
    return (q * 2.0).to(dtype), k.to(dtype), v.to(dtype), idx


def _check(q, k, v, idx, allp, tol=3e-6):
    """Public op, backend="triton", forward + autograd, against the float64 reference."""
    scale = q.shape[-1] ** -0.5
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = image_causal_attention(qg, kg, vg, idx, all_previous=allp, backend="triton")
    go = torch.randn(out.shape).to(q.dtype)
    dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), go)
    d = [t.double() for t in (q, k, v)]
    want = ref.image_causal_attention(*d, idx, allp, scale)
    want_g = ref.image_causal_attention_backward(go.double(), *d, idx, allp, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    none = idx < 0
    assert (out[none] == 0).all(), "rows without an image must be exactly 0"
    assert (dq[none] == 0).all()
    if q.dtype == torch.float32:
        assert rel_err(out, want) < tol
        for g, w in zip((dq, dk, dv), want_g):
            assert rel_err(g, w) < 5 * tol
    else:  # within 2x (grads 3x) of the same-dtype reference's own error, plus a floor
        base = ref.image_causal_attention(q, k, v, idx, allp, scale)
        base_g = ref.image_causal_attention_backward(go, q, k, v, idx, allp, scale)
        assert rel_err(out, want) <= 2 * rel_err(base, want) + 1e-3
        for g, w, bg in zip((dq, dk, dv), want_g, base_g):
            assert rel_err(g, w) <= 3 * rel_err(bg, w) + 1e-3


CASES = [
    # B, T, H, dh, M, N, images per row
    (3, 40, 2, 64, 3, 64, [3, 1, 0]),   # a row with no image at all
    (2, 37, 1, 96, 4, 49, [4, 2]),      # dh 96 (padded tile), rows with different image counts
    (2, 23, 1, 128, 2, 1, [2, 1]),      # one visual token per image
    (1, 21, 1, 64, 2, 257, [2]),        # 257 = 8 key tiles + 1
    (1, 9, 1, 32, 2, 300, [2]),
]


@pytest.mark.parametrize("case", CASES, ids=[f"N{c[5]}-dh{c[3]}" for c in CASES])
@pytest.mark.parametrize("allp", [False, True], ids=["immediate", "all_previous"])
def test_float32_against_float64_reference(case, allp):
    B, T, H, dh, M, N, counts = case
    _check(*_inputs(B, T, H, dh, M, N, torch.float32, counts), allp)


@pytest.mark.parametrize("case", CASES[:2], ids=[f"N{c[5]}-dh{c[3]}" for c in CASES[:2]])
@pytest.mark.parametrize("allp", [False, True], ids=["immediate", "all_previous"])
def test_bfloat16_against_float64_reference(case, allp):
    B, T, H, dh, M, N, counts = case
    _check(*_inputs(B, T, H, dh, M, N, torch.bfloat16, counts), allp)


@pytest.mark.parametrize("allp", [False, True], ids=["immediate", "all_previous"])
def test_noncontiguous_inputs(allp):
    q, k, v, idx = _inputs(2, 35, 2, 64, 3, 40, torch.float32, [3, 2], noncontig=True)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _check(q, k, v, idx, allp)
    _check(q, k, v, idx.t().contiguous().t().long(), allp)  # strided int64 index


def test_long_segments_and_one_token_segments():
    # a segment longer than several query blocks, a 1-token segment, an image nobody sees
    q, k, v, _ = _inputs(1, 60, 1, 64, 4, 33, torch.float32, [1])
    idx = torch.tensor([[-1] * 5 + [0] * 40 + [1] + [3] * 14], dtype=torch.int32)
    for allp in (False, True):
        _check(q, k, v, idx, allp)


def test_no_image_anywhere_gives_exact_zeros():
    q, k, v, _ = _inputs(2, 9, 2, 64, 3, 16, torch.float32, [0, 0])
    idx = torch.full((2, 9), -1, dtype=torch.int32)
    out = kx.image_causal_attention_fwd(q, k, v, idx, False, 0.125)
    assert (out == 0).all()
    dq, dk, dv = kx.image_causal_attention_bwd(torch.randn_like(q), q, k, v, idx, True, 0.125)
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


def test_unseen_images_get_zero_grads_and_backward_is_deterministic():
    q, k, v, _ = _inputs(1, 20, 1, 64, 4, 16, torch.float32, [1])
    idx = torch.tensor([[-1] * 4 + [1] * 16], dtype=torch.int32)  # images 0, 2, 3 unseen
    go = torch.randn_like(q)
    a = kx.image_causal_attention_bwd(go, q, k, v, idx, False, 0.125)
    b = kx.image_causal_attention_bwd(go, q, k, v, idx, False, 0.125)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    dk, dv = a[1], a[2]
    for j in (0, 2, 3):
        assert (dk[:, j] == 0).all() and (dv[:, j] == 0).all()
    assert dk[:, 1].abs().sum() > 0


def test_unsorted_media_index_is_still_exact():
    # the kernels restrict work to segment bounds but mask per row: any order is correct
    q, k, v, _ = _inputs(1, 24, 1, 64, 3, 16, torch.float32, [1])
    idx = torch.tensor([[2, 0, -1, 1, 1, 0, 2, 2, -1, 0, 1, 2] * 2], dtype=torch.int32)
    for allp in (False, True):
        _check(q, k, v, idx, allp)


def test_out_of_range_index_is_an_error_naming_the_range():
    q, k, v, idx = _inputs(1, 8, 1, 64, 2, 16, torch.float32, [1])
    idx[0, -1] = 2
    with pytest.raises(ValueError, match=r"\[-1, 2\)"):
        kx.image_causal_attention_fwd(q, k, v, idx, False, 0.125)


def test_float64_falls_back_to_the_reference():
    q, k, v, idx = _inputs(1, 8, 1, 16, 2, 4, torch.float64, [2])
    out = image_causal_attention(q, k, v, idx, backend="triton")
    assert torch.equal(out, ref.image_causal_attention(q, k, v, idx))


def test_registration_auto_picks_triton_on_cuda():
    assert "triton" in be.implemented(OP) and "triton" in be.implemented(OP + ".backward")
    assert be.resolve(OP, "auto", torch.device("cuda")) == "triton"
    assert be.resolve(OP, "auto", torch.device("cpu")) != "triton"


def test_compile_fullgraph_accepts_the_op():
    q, k, v, idx = _inputs(1, 16, 1, 32, 2, 8, torch.float32, [2])
    q.requires_grad_(True)

    def f(q, k, v, idx):
        return image_causal_attention(q, k, v, idx, backend="triton").square().sum()

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, idx)
    (g,) = torch.autograd.grad(got, q)
    want = f(q, k, v, idx)
    (wg,) = torch.autograd.grad(want, q)
    assert torch.allclose(got, want) and torch.allclose(g, wg)


def test_autotune_space_is_pruned_per_key():
    import triton

    full = kx._configs(False)
    for seg, dh, T in ((1, 64, 1), (4, 64, 64), (64, 64, 2048), (64, 128, 2048), (2048, 96, 2048)):
        kept = kx._prune_q(full, {"SEG_BUCKET": seg, "DH": dh, "T": T})
        assert 0 < len(kept) < len(full)
        bt_max = max(16, min(2 * seg, triton.next_power_of_2(T)))
        assert all(c.kwargs["BLOCK_T"] <= bt_max for c in kept)
    for dh, N in ((64, 1), (64, 64), (128, 257)):
        kept = kx._prune_kv(kx._configs(True), {"DH": dh, "N": N})
        assert 0 < len(kept) < len(full)
    assert kx._seg_bucket(2048, 32) == 64 and kx._seg_bucket(1, 32) == 1 and kx._seg_bucket(10, 0) == 16
    # small problems (the GPU check's correctness cases, decoding) skip tuning
    for dkdv in (False, True):
        for T, M, N, dh in ((1, 32, 64, 64), (24, 3, 257, 128), (2048, 32, 64, 64), (40, 2, 1, 256)):
            h = kx._heuristic(dkdv, T, M, N, dh)
            assert h["BLOCK_T"] >= 16 and h["BLOCK_N"] >= 16 and h["BLOCK_T"] * h["BLOCK_N"] <= 64 * 64
    assert kx.AUTOTUNE_MIN_ROWS > 3 * 24 * 2  # gpu_check's correctness shapes run untuned
