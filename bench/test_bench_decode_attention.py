"""Decode attention (one query per sequence against the static KV cache): flamingo_rt's C++
kernel (``ops.decode_attention.cached_attention``) vs ``F.scaled_dot_product_attention`` with
the boolean mask, side by side.

Shape: one layer of the generation benchmark (issue 6): 16 heads x 64, a 687-slot cache
(a 659-token 32-shot prompt plus 28 slots), batch 1 and 4, float32 and bfloat16. The
caches of 24 layers are cycled, so K and V come from memory as in a decode step; the
bandwidth printed is the bytes of K and V read per call over its time.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flamingo_rt import _ext
from flamingo_rt.ops.decode_attention import cached_attention
from harness import QUICK

H, S, D, LAYERS = (2, 64, 16, 2) if QUICK else (16, 687, 64, 24)


@pytest.mark.skipif(not _ext.load(), reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 4])
def test_decode_attention(benchmark, report, dtype, batch):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, H, 1, D, generator=g).to(dtype)
    ks = [torch.randn(batch, H, S, D, generator=g).to(dtype) for _ in range(LAYERS)]
    vs = [torch.randn(batch, H, S, D, generator=g).to(dtype) for _ in range(LAYERS)]
    mask = torch.ones(batch, 1, 1, S, dtype=torch.bool)
    mask[..., S - 27:] = False  # unused slots of the static cache
    mask[0, ..., :20] = False  # a left-padded row
    scale = D ** -0.5

    def ours():
        with torch.no_grad():
            return [cached_attention(q, k, v, mask, scale) for k, v in zip(ks, vs)]

    def sdpa():
        with torch.no_grad():
            return [F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale) for k, v in zip(ks, vs)]

    a, b = ours(), sdpa()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert all(float((x.float() - y.float()).norm() / y.float().norm()) < tol for x, y in zip(a, b))
    row = report.compare(f"decode attention {str(dtype)[6:]} B={batch} ({H} heads, {S} slots, {LAYERS} layers)",
                         ours, sdpa, "SDPA + mask")
    gbps = 2 * batch * H * S * D * ks[0].element_size() * LAYERS / row.ours_s / 1e9
    report.notes.append(f"  decode attention {str(dtype)[6:]} B={batch}: ours reads K and V at {gbps:.1f} GB/s")
    benchmark.extra_info.update(ratio_sdpa_over_ours=row.speedup, ours_gbps=gbps)
    benchmark.pedantic(ours, rounds=3, iterations=1, warmup_rounds=1)
