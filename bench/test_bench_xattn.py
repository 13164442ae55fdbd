"""Image-causal cross-attention on CPU: ours (C++ cpu backend) vs open_flamingo's dense math.

Shape: OpenFlamingo-3B's xattn (8 heads x 64), T = 2048 text tokens, M = 32 images x 64
tokens, batch 1, fp32 and bf16. The peer core is open_flamingo's MaskedCrossAttention core
reproduced op for op (scores over all M*N keys, dense mask, max-subtract, softmax, zeroing of
rows without media, weighted sum) on the same q/k/v. FLOPs of the core count only the useful
work (each token against its own 64 keys: 4*T*N*dh*H forward, 2.5x that for backward),
so ours reports its real rate; the peer does 32x more arithmetic for the same result.

Expected (2 cores, ~180-250 GFLOP/s fp32 GEMM when idle): ours forward moves q, k, v, out
once (16 MB fp32) for 0.27 GFLOP (16 FLOP/byte), so ~1.5-2.5 ms, bounded by memory and
by the 64x64 products' edge costs more than by the FMA peak; the peer's (T, M*N) scores
are 8.6 GFLOP plus ~10 passes over a 134 MB matrix, ~0.4-0.7 s. The machine is shared:
compare ratios from one run, and read the printed ceilings of that run.
"""
from __future__ import annotations


import pytest
import torch

from flamingo_rt.ops import _cpp_backends
from flamingo_rt.ops.xattn import image_causal_attention
from harness import QUICK, gemms_alone, median_seconds

pytestmark = pytest.mark.skipif(not _cpp_backends.AVAILABLE, reason="flamingo_rt._C not built")

B, T, H, DH, M, N = (1, 128, 2, 16, 4, 8) if QUICK else (1, 2048, 8, 64, 32, 64)


def of_core(q, k, v, media_locations, immediate=True):
    """open_flamingo MaskedCrossAttention, from q/k/v on: q (B, T, H, dh), k/v (B, M, N, H, dh)."""
    b, t, h, d = q.shape
    m, n = k.shape[1], k.shape[2]
    q = q.transpose(1, 2) * d ** -0.5  # b h i d
    k = k.reshape(b, m * n, h, d).transpose(1, 2)
    v = v.reshape(b, m * n, h, d).transpose(1, 2)
    sim = torch.einsum("... i d, ... j d -> ... i j", q, k)
    media_time = torch.arange(m) + 1
    text_time = media_locations.cumsum(dim=-1)
    op = torch.eq if immediate else torch.ge
    mask = op(text_time[:, None, :, None], media_time.repeat_interleave(n)[None, None, None, :])
    sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
    sim = sim - sim.amax(dim=-1, keepdim=True).detach()
    attn = sim.softmax(dim=-1)
    if immediate:
        attn = attn.masked_fill((text_time == 0)[:, None, :, None], 0.0)
    out = torch.einsum("... i j, ... j d -> ... i d", attn, v)
    return out.transpose(1, 2)


def _data(dtype, requires_grad=False):
    torch.manual_seed(0)
    loc = torch.zeros(B, T, dtype=torch.bool)
    loc[:, torch.linspace(8, T - 40, M).long()] = True  # 32 images spread over the text
    idx = (loc.to(torch.int32).cumsum(-1, dtype=torch.int32) - 1)
    q = torch.randn(B, T, H, DH, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(B, M, N, H, DH, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(B, M, N, H, DH, dtype=dtype, requires_grad=requires_grad)
    return q, k, v, idx, loc


USEFUL_FWD = 4 * B * T * N * DH * H


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_xattn_core_forward(benchmark, ceilings, report, of_helpers, dtype):
    q, k, v, idx, loc = _data(dtype)
    with torch.no_grad():
        ours_out = image_causal_attention(q, k, v, idx, backend="cpu")
        peer_out = of_core(q, k, v, loc)
        err = ((ours_out.float() - peer_out.float()).norm() / peer_out.float().norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 2e-2)

    def run_ours():
        with torch.no_grad():
            return image_causal_attention(q, k, v, idx, backend="cpu")

    def run_peer():
        with torch.no_grad():
            return of_core(q, k, v, loc)

    row = report.compare(f"xattn core fwd {str(dtype)[6:]} T{T} M{M}x{N}", run_ours, run_peer,
                         "open_flamingo", flops=USEFUL_FWD, min_run_time=0.6)
    benchmark.extra_info.update(peer_ms=row.peer_s * 1e3, ratio_peer_over_ours=row.speedup,
                                gflops=USEFUL_FWD / row.ours_s / 1e9,
                                ceiling_fp32_gflops=ceilings.gemm_fp32_gflops)
    benchmark.pedantic(run_ours, rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_xattn_core_forward_backward(benchmark, ceilings, report, of_helpers, dtype):
    q, k, v, idx, loc = _data(dtype, requires_grad=True)
    go = torch.randn(B, T, H, DH, dtype=dtype)

    def run_ours():
        out = image_causal_attention(q, k, v, idx, backend="cpu")
        return torch.autograd.grad(out, (q, k, v), go)

    def run_peer():
        out = of_core(q, k, v, loc)
        return torch.autograd.grad(out, (q, k, v), go)

    flops = int(USEFUL_FWD * 3.5)  # fwd 2 products, bwd 5
    row = report.compare(f"xattn core fwd+bwd {str(dtype)[6:]} T{T} M{M}x{N}", run_ours, run_peer,
                         "open_flamingo", flops=flops, min_run_time=0.6)
    benchmark.extra_info.update(peer_ms=row.peer_s * 1e3, ratio_peer_over_ours=row.speedup,
                                gflops=flops / row.ours_s / 1e9,
                                ceiling_fp32_gflops=ceilings.gemm_fp32_gflops)
    benchmark.pedantic(run_ours, rounds=2, iterations=1, warmup_rounds=1)


# Issue 3's CPU targets for the whole block: (fwd, fwd+bwd) speed over open_flamingo, and the
# block against its own matrix products alone (fwd, fwd+bwd); memory: peer/ours >= 3.
BLOCK_TARGETS = {"fp32": ((1.6, 1.4), (1.15, 1.25)), "bf16": ((2.5, 2.5), (1.3, 1.4))}


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_xattn_block(benchmark, ceilings, report, of_helpers, dtype, batch):
    """The whole GatedCrossAttentionBlock (OpenFlamingo-3B's, T=2048, 32 images x 64),
    ours (cpu backend) vs open_flamingo's on the same weights: forward, forward+backward
    (gradients of all parameters, x and the media), the block's GEMMs alone in the same run,
    and the peak resident memory of forward+backward (each side in a fresh process)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "peers"))
    import rss
    import xattn_block_step as bs

    peer, ours, x, media, idx, loc = bs.build(batch, of_helpers)
    a = bs.forward("ours", ours, x, media, idx, loc, dtype)()
    b = bs.forward("peer", peer, x, media, idx, loc, dtype)()
    ref = bs.forward("peer", peer, x, media, idx, loc, "fp32")()
    if dtype == "fp32":
        assert rel(a, b) < 1e-4
    else:  # both in bf16: ours within 2x the peer's own bf16 error (DESIGN.md 3)
        assert rel(a, ref) <= 2 * rel(b, ref) + 1e-3
    ga = bs.forward_backward("ours", ours, x, media, idx, loc, dtype)()
    gb = bs.forward_backward("peer", peer, x, media, idx, loc, "fp32" if dtype == "bf16" else dtype)()
    for u, w in zip(ga, gb):
        assert rel(u, w) < (1e-4 if dtype == "fp32" else 3e-2)
    tag = f"xattn block {dtype} B{batch} T{T} M{M}x{N}"
    mt = 1.0 if batch == 1 else 0.5
    fwd = report.compare(f"{tag} fwd", bs.forward("ours", ours, x, media, idx, loc, dtype),
                         bs.forward("peer", peer, x, media, idx, loc, dtype), "open_flamingo",
                         flops=bs.gemm_flops(batch, False) + batch * USEFUL_FWD, min_run_time=mt, dtype=dtype)
    if dtype == "bf16":  # our bf16 inference: the block in bf16 weights, no autocast
        o16, x16, m16 = bs.in_bf16(ours, x, media)
        c = bs.forward("ours", o16, x16, m16, idx, loc, "fp32")()
        # its output is bf16: held to 2x the error of open_flamingo's block in bf16 weights
        p16, _, _ = bs.in_bf16(peer, x, media)
        e16 = rel(bs.forward("peer", p16, x16, m16, idx, loc, "fp32")(), ref)
        assert rel(c, ref) <= 2 * e16 + 1e-3, (rel(c, ref), e16)
        del p16
        fwd_autocast = fwd
        fwd = report.compare(f"{tag} fwd, ours in bf16 weights", bs.forward("ours", o16, x16, m16, idx, loc, "fp32"),
                             bs.forward("peer", peer, x, media, idx, loc, dtype), "open_flamingo",
                             flops=bs.gemm_flops(batch, False) + batch * USEFUL_FWD, min_run_time=mt, dtype=dtype)
        del o16
    fb = report.compare(f"{tag} fwd+bwd", bs.forward_backward("ours", ours, x, media, idx, loc, dtype),
                        bs.forward_backward("peer", peer, x, media, idx, loc, dtype), "open_flamingo",
                        flops=bs.gemm_flops(batch, True) + int(3.5 * batch * USEFUL_FWD), min_run_time=mt,
                        dtype=dtype)
    cd = torch.bfloat16 if dtype == "bf16" else torch.float32
    g_fwd = median_seconds(gemms_alone(bs.gemm_shapes(batch), cd, False), mt)
    g_fb = median_seconds(gemms_alone(bs.gemm_shapes(batch), cd, True), mt)
    del peer, ours
    root = Path(__file__).resolve().parents[1]
    mem = {side: rss.run(Path(__file__).parent / "peers" / "xattn_block_step.py",
                         ["--side", side, "--dtype", dtype, "--batch", str(batch)], root)
           for side in ("ours", "peer")}
    (t_fwd, t_fb), (l_fwd, l_fb) = BLOCK_TARGETS[dtype]
    mem_ratio = mem["peer"]["step_mib"] / max(mem["ours"]["step_mib"], 1e-9)  # (0 at a quick run's shapes)
    grad = mem["ours"]["grad_mib"]  # the gradients of the parameters, x and media: the same on both sides
    if not any(n.startswith("xattn block vs open_flamingo") for n in report.notes):
        report.notes += [
            "xattn block vs open_flamingo (issue 3 targets in brackets; 'GEMMs' = the block's matrix products alone, same run):",
            "  | block | fwd peer/ours | fwd+bwd peer/ours | fwd ours/GEMMs | fwd+bwd ours/GEMMs "
            "| fwd+bwd memory added ours / peer (peer/ours) | same above the gradients both hold (peer/ours) |",
        ]
    report.notes.append(
        f"  | {dtype} B{batch} | {fwd.speedup:.2f}x [{t_fwd}] | {fb.speedup:.2f}x [{t_fb}] "
        f"| {fwd.ours_s / g_fwd:.2f}x [{l_fwd}] ({g_fwd * 1e3:.0f} ms) | {fb.ours_s / g_fb:.2f}x [{l_fb}] "
        f"({g_fb * 1e3:.0f} ms) | {mem['ours']['step_mib']:.0f} / {mem['peer']['step_mib']:.0f} MiB "
        f"({mem_ratio:.2f}x [3]) | {mem['ours']['step_mib'] - grad:.0f} / {mem['peer']['step_mib'] - grad:.0f} MiB "
        f"over {grad:.0f} MiB ({(mem['peer']['step_mib'] - grad) / max(1.0, mem['ours']['step_mib'] - grad):.2f}x) |")
    if dtype == "bf16":
        report.notes.append(f"    (bf16 B{batch} forward with our block under autocast instead: {fwd_autocast.speedup:.2f}x, "
                            f"{fwd_autocast.ours_s / g_fwd:.2f}x of the GEMMs; the table's forward is our block in bf16 weights)")
    benchmark.extra_info.update(
        fwd_ratio=fwd.speedup, fwd_bwd_ratio=fb.speedup, fwd_over_gemms=fwd.ours_s / g_fwd,
        fwd_bwd_over_gemms=fb.ours_s / g_fb, gemms_fwd_s=g_fwd, gemms_fwd_bwd_s=g_fb,
        memory_ours_mib=mem["ours"]["step_mib"], memory_peer_mib=mem["peer"]["step_mib"], memory_grads_mib=grad,
        ceiling_fp32_gflops=ceilings.gemm_fp32_gflops, ceiling_bf16_gflops=ceilings.gemm_bf16_gflops)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------- GPU (triton, cuda)
# The same shape on a GPU, bf16: our triton and cuda backends vs SDPA with OpenFlamingo's dense
# (T, M*64) mask. Each timed call synchronizes, so times include ~10 us of sync; the GPU check
# (bench/gpu_check.py) has the do_bench numbers. Skipped without CUDA.

def _gpu_backends():
    from flamingo_rt.ops import backend as be

    return [b for b in ("triton", "cuda") if b in be.implemented("image_causal_attention")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("train", [False, True], ids=["fwd", "fwd+bwd"])
def test_xattn_core_gpu(benchmark, report, backend, train):
    import torch.nn.functional as F

    if backend not in _gpu_backends():
        pytest.skip(f"{backend} backend not registered")
    dev, dt = torch.device("cuda"), torch.bfloat16
    q, k, v, idx, loc = _data(torch.float32)
    q, k, v = (t.to(dev, dt).requires_grad_(train) for t in (q, k, v))
    idx = idx.to(dev)
    go = torch.randn_like(q)
    img = torch.arange(M, device=dev).repeat_interleave(N)
    mask = (img[None, None, :] == idx[:, :, None].long())[:, None]
    qh = q.detach().transpose(1, 2).requires_grad_(train)
    kh = k.detach().reshape(B, M * N, H, DH).transpose(1, 2).requires_grad_(train)
    vh = v.detach().reshape(B, M * N, H, DH).transpose(1, 2).requires_grad_(train)

    def run_ours():
        out = image_causal_attention(q, k, v, idx, backend=backend)
        if train:
            torch.autograd.grad(out, (q, k, v), go)
        torch.cuda.synchronize()

    def run_peer():
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
        if train:
            torch.autograd.grad(out, (qh, kh, vh), go.transpose(1, 2))
        torch.cuda.synchronize()

    with torch.no_grad():
        ours_out = image_causal_attention(q, k, v, idx, backend=backend).float()
        peer_out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask).transpose(1, 2).float()
        has = (idx >= 0)[:, :, None, None]  # SDPA's rows without an image: NaN or junk
        peer_out = torch.where(has, peer_out, 0.0)
        err = ((ours_out - peer_out).norm() / peer_out.norm()).item()
    assert err < 2e-2
    flops = int(USEFUL_FWD * (3.5 if train else 1))
    row = report.compare(f"xattn core {'fwd+bwd' if train else 'fwd'} bf16 GPU {backend}", run_ours, run_peer,
                         "sdpa dense mask", flops=flops, min_run_time=0.5)
    benchmark.extra_info.update(peer_ms=row.peer_s * 1e3, ratio_peer_over_ours=row.speedup)
    benchmark.pedantic(run_ours, rounds=5, iterations=1, warmup_rounds=1)
