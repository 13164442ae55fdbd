"""This machine's ceilings: GEMM GFLOP/s (fp32, bf16), copy GB/s and read GB/s, measured
with torch.

Copy counts the bytes read plus the bytes written (STREAM's convention); read is a
reduction over the same large buffer, bytes read only: what a memory-bound GEMV (a decode
step's weights) can stream at best. On a 2-core AMD EPYC guest copy measured 47 GB/s and
read 26-28 GB/s, so a read-only kernel sits well below the copy figure at the hardware's limit.

Every benchmark run prints them next to the results, so achieved numbers can be read
as a fraction of what the hardware does on its best-understood workload.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _best_time(fn, device, min_time=0.3, reps_min=3):
    fn()
    _sync(device)
    best, total, reps = float("inf"), 0.0, 0
    while total < min_time or reps < reps_min:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        dt = time.perf_counter() - t0
        best, total, reps = min(best, dt), total + dt, reps + 1
    return best


@dataclass
class Ceilings:
    device: str
    gemm_fp32_gflops: float
    gemm_bf16_gflops: float
    copy_gbps: float
    threads: int
    read_gbps: float = float("nan")
    gemm_fp32_torch_gflops: float = float("nan")
    gemm_fp32_onednn_gflops: float = float("nan")

    def line(self) -> str:
        fp32 = f"GEMM fp32 {self.gemm_fp32_gflops:.0f} GFLOP/s"
        if self.gemm_fp32_onednn_gflops == self.gemm_fp32_onednn_gflops:  # measured (CPU)
            fp32 += (f" (torch.mm {self.gemm_fp32_torch_gflops:.0f}, oneDNN {self.gemm_fp32_onednn_gflops:.0f}; "
                     f"flamingo_rt uses {'oneDNN' if _onednn_active() else 'torch.mm'})")
        return (
            f"machine ceilings [{self.device}, {self.threads} threads]: {fp32}, "
            f"GEMM bf16 {self.gemm_bf16_gflops:.0f} GFLOP/s, copy {self.copy_gbps:.1f} GB/s, read {self.read_gbps:.1f} GB/s"
        )


def _onednn_active() -> bool:
    from flamingo_rt.ops import cpu_gemm

    return cpu_gemm.onednn_active()


def measure(device: str | torch.device = "cpu", n: int | None = None) -> Ceilings:
    """Measure GEMM (n x n x n; default the best of 2048 and 4096 on CPU, 8192 on CUDA) in fp32
    and bf16, a large tensor copy and a large tensor's sum (read bandwidth) on ``device``."""
    from flamingo_rt.ops import cpu_gemm

    device = torch.device(device)
    quick = os.environ.get("FLAMINGO_RT_BENCH_QUICK") == "1" and device.type == "cpu"  # a smoke run
    sizes = [n] if n is not None else ([8192] if device.type == "cuda" else [256] if quick else [2048, 4096])
    res = {}
    onednn = 0.0  # oneDNN's float32 rate, measured on the CPU when torch has it
    for dt in (torch.float32, torch.bfloat16):
        # the best over sizes: on CPUs with AMX, bf16 GEMMs keep speeding up past n = 2048
        # (measured 0.7 TFLOP/s at 2048, 1.5-2 at 8192 rows x 2048 x 8192 on 2 cores);
        # a CPU whose bf16 products are torch's reference loops (AVX2 only, ~0.6 GFLOP/s: a
        # 4096^3 product would take minutes) is measured at 256^3: its rate, not a ceiling
        for size in ([256] if cpu_gemm.half_products_slow(device, dt) else sizes):
            a = torch.randn(size, size, device=device, dtype=dt)
            b = torch.randn(size, size, device=device, dtype=dt)
            t = _best_time(lambda: torch.mm(a, b), device)
            res[dt] = max(res.get(dt, 0.0), 2 * size ** 3 / t / 1e9)
            if dt == torch.float32 and device.type == "cpu":
                # torch's fp32 BLAS (MKL) is not the fastest library on every CPU: the
                # machine's ceiling is the better of it and oneDNN (flamingo_rt.ops.cpu_gemm)
                if cpu_gemm.available():
                    with cpu_gemm.use("onednn"):
                        t = _best_time(lambda: cpu_gemm.mm(a, b), device)
                    onednn = max(onednn, 2 * size ** 3 / t / 1e9)
    numel = (1 << 28) if device.type == "cuda" else (1 << 20) if quick else (1 << 25)  # 1 GiB / 128 MiB of fp32
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = _best_time(lambda: dst.copy_(src), device)
    copy = 2 * src.numel() * 4 / t / 1e9  # read + write
    t = _best_time(lambda: src.sum(), device)
    read = src.numel() * 4 / t / 1e9  # read only (the buffer is 4x the L3 of the CPUs we run on)
    return Ceilings(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        gemm_fp32_gflops=max(res[torch.float32], onednn),
        gemm_fp32_torch_gflops=res[torch.float32],
        gemm_fp32_onednn_gflops=onednn or float("nan"),
        gemm_bf16_gflops=res[torch.bfloat16],
        copy_gbps=copy,
        read_gbps=read,
        threads=torch.get_num_threads(),
    )
