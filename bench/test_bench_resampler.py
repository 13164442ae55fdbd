"""Our reference Perceiver Resampler vs open_flamingo's, same weights, same inputs."""
from __future__ import annotations


import pytest
import torch

from flamingo_rt.models.resampler import PerceiverResampler
from harness import count_flops


SHAPES = {
    # name: (dim, depth, heads, dim_head, latents, media, S[, frames])
    "of3b-shape 2 media x 256 tokens": (1024, 6, 8, 64, 64, 2, 256),
    "tiny 16 media x 16 tokens": (64, 2, 4, 16, 16, 16, 16),
}

# issue 4's shapes: OpenFlamingo's resampler, a 32-shot prompt (32 images x 256 features)
# and a video case (8 clips of 8 frames x 64 features, learned temporal embeddings)
ISSUE_SHAPES = {
    "issue4 32 images x 256": (1024, 6, 8, 64, 64, 32, 256, 1),
    "issue4 video 8 clips x 8 frames x 64": (1024, 6, 8, 64, 64, 8, 64, 8),
}


def _pair(of, dim, depth, heads, dh, L, frames):
    torch.manual_seed(0)
    peer = of.PerceiverResampler(dim=dim, depth=depth, dim_head=dh, heads=heads, num_latents=L,
                                 max_num_frames=frames if frames > 1 else None)
    return peer, PerceiverResampler.from_open_flamingo(peer)


@pytest.mark.parametrize("shape", list(ISSUE_SHAPES))
def test_resampler_issue_shapes_fwd_and_fwd_bwd(benchmark, ceilings, report, of_helpers, shape):
    """fp32 forward (no grad) and forward+backward (grads of every weight and the
    features), ours vs open_flamingo's on the same weights and inputs; ratios printed."""
    dim, depth, heads, dh, L, M, S, frames = ISSUE_SHAPES[shape]
    peer, ours = _pair(of_helpers, dim, depth, heads, dh, L, frames)
    x = torch.randn(1, M, frames, S, dim)
    with torch.no_grad():
        assert torch.allclose(ours(x), peer(x), atol=1e-4, rtol=1e-4)

    def fwd(m):
        def run():
            with torch.no_grad():
                return m(x)
        return run

    xg = x.clone().requires_grad_()

    def fwd_bwd(m):
        def run():
            m.zero_grad(set_to_none=True)
            xg.grad = None
            m(xg).sum().backward()
        return run

    flops = count_flops(lambda: ours(x))
    row = report.compare(f"resampler fwd {shape}", fwd(ours), fwd(peer), "open_flamingo", flops=flops,
                         min_run_time=2.0)
    row2 = report.compare(f"resampler fwd+bwd {shape}", fwd_bwd(ours), fwd_bwd(peer), "open_flamingo",
                          flops=3 * flops, min_run_time=2.0)
    benchmark.extra_info.update(
        fwd_ratio_peer_over_ours=row.speedup, fwd_bwd_ratio_peer_over_ours=row2.speedup,
        fwd_gflops=flops / row.ours_s / 1e9, ceiling_fp32_gflops=ceilings.gemm_fp32_gflops,
    )
    benchmark.pedantic(fwd(ours), rounds=2, iterations=1, warmup_rounds=1)


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
