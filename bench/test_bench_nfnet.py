"""Frozen NFNet encoder (issue 5): ours folded (the frozen fast path) vs timm's dm_nfnet_f0
with the same weights (eager NCHW fp32, and channels-last under bf16 autocast) and vs our
own unfolded model, side by side in one process; plus the unfrozen forward + backward
(the pretraining case, float32 and under bf16 autocast). Ratios peer/ours printed, GFLOP/s against the GEMM ceilings.

Shape: dm_nfnet_f0 at 224x224, batch 4 (issue 5); ``NFNET_BENCH_RES`` / ``NFNET_BENCH_BATCH``
shrink it on a busy machine.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

from flamingo_rt.models.nfnet import NFNet
from harness import QUICK

timm = pytest.importorskip("timm")

RES = int(os.environ.get("NFNET_BENCH_RES", "32" if QUICK else "224"))
BATCH = int(os.environ.get("NFNET_BENCH_BATCH", "1" if QUICK else "4"))


def _conv_flops(model: NFNet, res: int) -> float:
    """2 * multiply-adds of every convolution, one image (the unfolded forward, traced)."""
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    total = [0.0]

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (F.conv2d, torch.conv2d):
                total[0] += 2.0 * out[0].numel() * args[1][0].numel()
            return out

    from flamingo_rt.ops import winograd_conv

    plain = copy.deepcopy(model).unfreeze().eval()
    plain.channels_last = False  # every conv an F.conv2d (channels-last 1x1 convs run as products,
    with torch.no_grad(), Count(), winograd_conv.use(False):  # 3x3 ones as Winograd convolutions)
        plain.forward_features(torch.zeros(1, 3, res, res))
    return total[0]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    tm = timm.create_model("dm_nfnet_f0", pretrained=False).eval()
    with torch.no_grad():  # non-zero skipinit gains, so every residual branch computes
        for n, p in tm.named_parameters():
            if n.endswith("skipinit_gain"):
                p.fill_(0.7)
    tm.requires_grad_(False)
    ours = NFNet.from_timm(tm).freeze()
    unfolded = NFNet.from_timm(tm).freeze(fast=False)
    x = torch.randn(BATCH, 3, RES, RES)
    flops = _conv_flops(ours, RES) * BATCH
    return tm, ours, unfolded, x, flops


def _faults_note(run_ours, run_timm) -> str:
    """Page faults per call of each side (after the timed runs) and where ours' large
    activations came from: its forward runs in a CPU block cache scope
    (:mod:`flamingo_rt.runtime.cpu_cache`; ``FLAMINGO_RT_CPU_CACHE=0`` for glibc's blocks),
    timm's come from glibc's defaults (the bench tunes no malloc)."""
    import resource

    from flamingo_rt.runtime import cpu_cache

    def faults(fn) -> int:
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0

    s0 = cpu_cache.stats()
    fo = faults(run_ours)
    s1 = cpu_cache.stats()
    ft = faults(run_timm)
    return (f"nfnet f0 frozen fp32: page faults per call ours {fo}, timm {ft}; ours' large allocations "
            f"from the CPU block cache: {s1.hits - s0.hits} reused, {s1.misses - s0.misses} new"
            f"{'' if cpu_cache.enabled() else ' (cache off)'}")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_nfnet_frozen_fp32(benchmark, ceilings, report, models):
    tm, ours, unfolded, x, flops = models
    with torch.no_grad():
        err = _rel(ours.forward_features(x), tm.forward_features(x))
    assert err < 1e-4
    report.notes.append(f"nfnet f0 {RES}px b{BATCH}: folded fp32 features vs timm fp32: rel err {err:.1e}")

    def run_ours():
        with torch.no_grad():
            return ours.forward_features(x)

    def run_timm():
        with torch.no_grad():
            return tm.forward_features(x)

    def run_unfolded():
        with torch.no_grad():
            return unfolded.forward_features(x)

    row = report.compare(f"nfnet f0 frozen fp32 {RES}px b{BATCH}", run_ours, run_timm, "timm fp32", flops=flops)
    report.compare(f"nfnet f0 frozen fp32 {RES}px b{BATCH}", run_ours, run_unfolded, "ours unfolded", flops=flops)
    report.notes.append(_faults_note(run_ours, run_timm))
    benchmark.extra_info.update(ratio_timm_over_ours=row.speedup, gflops=flops / row.ours_s / 1e9,
                                ceiling_fp32_gflops=ceilings.gemm_fp32_gflops)
    benchmark.pedantic(run_ours, rounds=3, iterations=1, warmup_rounds=1)


def test_nfnet_frozen_bf16(benchmark, ceilings, report, models):
    tm, ours, _, x, flops = models
    ours16 = copy.deepcopy(ours).to(torch.bfloat16).freeze()
    tm_cl = copy.deepcopy(tm).to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = tm.forward_features(x)
        err = _rel(ours16.forward_features(x), want)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            terr = _rel(tm_cl.forward_features(xc), want)
    report.notes.append(f"nfnet f0 bf16 features vs timm fp32: ours {err:.1e}, timm bf16 autocast {terr:.1e}")
    assert err < 3e-2

    def run_ours():
        with torch.no_grad():
            return ours16.forward_features(x)

    def run_timm_fp32():
        with torch.no_grad():
            return tm.forward_features(x)

    def run_timm_bf16():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return tm_cl.forward_features(xc)

    row = report.compare(f"nfnet f0 frozen bf16 {RES}px b{BATCH}", run_ours, run_timm_fp32, "timm fp32", flops=flops,
                         dtype="bf16")
    report.compare(f"nfnet f0 frozen bf16 {RES}px b{BATCH}", run_ours, run_timm_bf16, "timm CL bf16", flops=flops,
                   dtype="bf16")
    benchmark.extra_info.update(ratio_timm_fp32_over_ours=row.speedup, gflops=flops / row.ours_s / 1e9,
                                ceiling_bf16_gflops=ceilings.gemm_bf16_gflops)
    benchmark.pedantic(run_ours, rounds=3, iterations=1, warmup_rounds=1)


def test_nfnet_train_fwd_bwd(benchmark, ceilings, report, models):
    tm, _, _, x, flops = models
    tmt = copy.deepcopy(tm).train().requires_grad_(True)
    ours = NFNet.from_timm(tmt).train()
    r = torch.randn_like(tmt.forward_features(x[:1]))[:1]

    def run_ours():
        ours.zero_grad(set_to_none=True)
        (ours.forward_features(x) * r).sum().backward()

    def run_timm():
        tmt.zero_grad(set_to_none=True)
        (tmt.forward_features(x) * r).sum().backward()

    row = report.compare(f"nfnet f0 train fwd+bwd fp32 {RES}px b{BATCH}", run_ours, run_timm, "timm fp32",
                         flops=3 * flops)
    benchmark.extra_info.update(ratio_timm_over_ours=row.speedup)
    benchmark.pedantic(run_ours, rounds=2, iterations=1, warmup_rounds=1)


def test_nfnet_train_fwd_bwd_bf16(benchmark, ceilings, report, models):
    """The unfrozen forward + backward under bf16 autocast on both sides (issue 5: training
    at least 1.3x timm in the same dtype): ours (channels-last by default) vs timm NCHW, and
    vs timm channels-last (its model and input made channels-last)."""
    tm, _, _, x, flops = models
    tmt = copy.deepcopy(tm).train().requires_grad_(True)
    tm_cl = copy.deepcopy(tmt).to(memory_format=torch.channels_last)
    ours = NFNet.from_timm(tmt).train()
    xc = x.contiguous(memory_format=torch.channels_last)
    r = torch.randn_like(tmt.forward_features(x[:1]))[:1]

    def step(m, inp):
        def run():
            m.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = m.forward_features(inp)
            (y.float() * r).sum().backward()
        return run

    row = report.compare(f"nfnet f0 train fwd+bwd bf16 autocast {RES}px b{BATCH}", step(ours, x), step(tmt, x),
                         "timm bf16", flops=3 * flops, dtype="bf16")
    row_cl = report.compare(f"nfnet f0 train fwd+bwd bf16 autocast {RES}px b{BATCH}", step(ours, x),
                            step(tm_cl, xc), "timm CL bf16", flops=3 * flops, dtype="bf16")
    benchmark.extra_info.update(ratio_timm_bf16_over_ours=row.speedup, ratio_timm_cl_bf16_over_ours=row_cl.speedup)
    benchmark.pedantic(step(ours, x), rounds=2, iterations=1, warmup_rounds=1)
