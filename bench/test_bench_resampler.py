"""Our reference Perceiver Resampler vs open_flamingo's, same weights, same inputs."""
from __future__ import annotations


import pytest
import torch

from flamingo_rt.models.resampler import PerceiverResampler
from harness import count_flops


SHAPES = {
    # name: (dim, depth, heads, dim_head, latents, media, S)
    "of3b-shape 2 media x 256 tokens": (1024, 6, 8, 64, 64, 2, 256),
    "tiny 16 media x 16 tokens": (64, 2, 4, 16, 16, 16, 16),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_resampler_forward(benchmark, ceilings, report, of_helpers, shape):
    dim, depth, heads, dh, L, M, S = SHAPES[shape]
    of = of_helpers
    torch.manual_seed(0)
    peer = of.PerceiverResampler(dim=dim, depth=depth, dim_head=dh, heads=heads, num_latents=L).eval()
    ours = PerceiverResampler.from_open_flamingo(peer).eval()
    x = torch.randn(1, M, 1, S, dim)
    with torch.no_grad():
        assert torch.allclose(ours(x), peer(x), atol=1e-4, rtol=1e-4)

    def run_ours():
        with torch.no_grad():
            return ours(x)

    def run_peer():
        with torch.no_grad():
            return peer(x)

    flops = count_flops(lambda: ours(x))  # with autograd on: the module tracker needs grad_fns
    row = report.compare(f"resampler fwd {shape}", run_ours, run_peer, "open_flamingo", flops=flops)
    benchmark.extra_info.update(
        peer_ms=row.peer_s * 1e3, ratio_peer_over_ours=row.speedup,
        gflops=flops / row.ours_s / 1e9, ceiling_fp32_gflops=ceilings.gemm_fp32_gflops,
    )
    benchmark.pedantic(run_ours, rounds=5, iterations=1, warmup_rounds=1)
