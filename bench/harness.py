"""Side-by-side timing of ours and a peer in one process, with ratios and rates."""
from __future__ import annotations

import ctypes
import gc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.utils.benchmark as tbench
from torch.utils.flop_counter import FlopCounterMode

#: ``FLAMINGO_RT_BENCH_QUICK=1``: every benchmark at a small shape, each timing a few calls
#: (:func:`median_seconds`): a smoke run that the benchmarks still work (tests/test_bench_smoke.py),
#: not a measurement. The modules of bench/ and bench/peers/ read the same variable.
QUICK = os.environ.get("FLAMINGO_RT_BENCH_QUICK") == "1"
QUICK_RUN_TIME = 0.02  # seconds per timing in a quick run


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (torch's counter, with flamingo_rt's op formulas)."""
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


def peak_added_mib(fn: Callable[[], object]) -> float:
    """How far one call of ``fn`` raises this process's resident set above where it started
    (MiB; Linux with glibc). glibc's mmap threshold is pinned at 64 KiB first (for the rest
    of the process: later timings map fresh pages for every large tensor, on both sides
    alike), so every tensor buffer is mapped on allocation and unmapped on free and the
    resident set follows live memory. ``fn`` runs once before the baseline, so what persists
    across calls (gradient buffers kept by the caller) is not counted."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    fn()
    gc.collect()
    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    fn()
    return (_status_kib("VmHWM") - base) / 1024


def median_seconds(fn: Callable[[], object], min_run_time: float = 1.0) -> float:
    if QUICK:
        min_run_time = min(min_run_time, QUICK_RUN_TIME)
    m = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time
    )
    return m.median


def gemms_alone(shapes: Sequence[Tuple[int, int, int]], dtype: torch.dtype, train: bool) -> Callable[[], None]:
    """A closure doing only a model's matrix products, for "ours vs its GEMMs alone": for each
    (rows, in, out), y = x W^T; with ``train`` also dx = dy W and dW = dy^T x (transposed
    operands as autograd passes them). Tensors of ``dtype``, made once. The products run as
    flamingo_rt runs them on this machine: float32 through :mod:`flamingo_rt.ops.cpu_gemm`
    when its policy picks oneDNN, else ``torch.mm`` into preallocated outputs (the weight
    gradient through ``cpu_gemm.mm``, which copies a bf16 ``dy^T`` to rows where that pays:
    :func:`cpu_gemm.rows_first`).

    oneDNN's op returns a new output for every product, and glibc maps each block of 32 MiB
    or more anew, so without care the oneDNN branch would also time the first touch of
    fresh pages (a 2048 x 8192 float32 output: 16384 page faults), which the ``torch.mm``
    branch never pays. It runs in a :func:`flamingo_rt.runtime.cpu_cache.scope`, whose
    blocks stay mapped from one call to the next: both branches time the products alone.
    Measured on a Zen 4 guest, issue 3's block at B1: 734 -> 692 ms forward, 2314 -> 2108 ms
    forward+backward."""
    from flamingo_rt.ops import cpu_gemm
    from flamingo_rt.runtime import cpu_cache
    g = torch.Generator().manual_seed(0)
    ops = []
    for r, i, o in shapes:
        xin = torch.randn(r, i, generator=g).to(dtype)
        w = torch.randn(o, i, generator=g).to(dtype)
        dy = torch.randn(r, o, generator=g).to(dtype)
        ops.append((xin, w, dy, torch.empty(r, o, dtype=dtype), torch.empty(r, i, dtype=dtype),
                    torch.empty(o, i, dtype=dtype)))

    def run():
        for xin, w, dy, y, dx, dw in ops:
            torch.mm(xin, w.t(), out=y)
            if train:
                torch.mm(dy, w, out=dx)
                cpu_gemm.mm(dy.t(), xin, out=dw)  # bf16: its transposed operand copied to rows first

    def run_onednn():
        with cpu_cache.scope():
            for xin, w, dy, *_ in ops:
                cpu_gemm.linear(xin, w)
                if train:
                    cpu_gemm.mm(dy, w)
                    cpu_gemm.mm(dy.t(), xin)

    return run_onednn if dtype == torch.float32 and cpu_gemm.onednn_active() else run


@dataclass
class Row:
    name: str
    ours_s: float
    peer_s: float
    peer_name: str
    flops: Optional[int] = None
    dtype: str = "fp32"  # of ours' products: which GEMM ceiling its GFLOP/s are set against

    @property
    def speedup(self) -> float:
        return self.peer_s / self.ours_s

    def format(self, ceiling_gflops: Optional[float] = None) -> str:
        s = (
            f"{self.name:<44} ours {self.ours_s * 1e3:9.3f} ms   {self.peer_name} {self.peer_s * 1e3:9.3f} ms"
            f"   ratio peer/ours {self.speedup:5.2f}x"
        )
        if self.flops:
            g = self.flops / self.ours_s / 1e9
            s += f"   ours {g:7.1f} GFLOP/s"
            if ceiling_gflops:
                s += f" ({100 * g / ceiling_gflops:4.1f}% of {self.dtype} GEMM)"
        return s


@dataclass
class Report:
    rows: List[Row] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # free-form lines printed after the rows

    def compare(self, name: str, ours: Callable, peer: Callable, peer_name: str,
                flops: Optional[int] = None, min_run_time: float = 1.0, dtype: str = "fp32",
                alternations: int = 3) -> Row:
        """Time ``ours`` and ``peer`` alternately (ours, peer, ours, peer, ...: ``alternations``
        blocks each, ``min_run_time / alternations`` seconds per block) and keep the best
        block median of each, so drift in machine load hits both alike (this guest slows
        down by 10-30% for seconds to minutes at a time; with two blocks each, one side's
        both blocks fell in such a phase often enough to move a ratio by 15%). ``dtype``
        (``"fp32"`` / ``"bf16"``): the precision of ours' products, whose GEMM ceiling the
        printed GFLOP/s are set against."""
        if alternations < 1:
            raise ValueError(f"expected alternations >= 1, got {alternations}")
        if dtype not in ("fp32", "bf16"):
            raise ValueError(f"expected dtype 'fp32' or 'bf16', got {dtype!r}")
        o_times, p_times = [], []
        for _ in range(alternations):
            o_times.append(median_seconds(ours, min_run_time / alternations))
            p_times.append(median_seconds(peer, min_run_time / alternations))
        row = Row(name, min(o_times), min(p_times), peer_name, flops, dtype)
        self.rows.append(row)
        return row


REPORT = Report()
