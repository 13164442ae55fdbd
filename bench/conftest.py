"""Benchmark session setup: measured machine ceilings and the side-by-side report."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ceilings import measure  # noqa: E402
from harness import REPORT  # noqa: E402

_CEILINGS = {}


@pytest.fixture(scope="session")
def ceilings(request):
    """This machine's GEMM and copy ceilings, measured once per run and printed."""
    if "cpu" not in _CEILINGS:
        _CEILINGS["cpu"] = measure("cpu")
        tr = request.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line("")
            tr.write_line(_CEILINGS["cpu"].line())
    return _CEILINGS["cpu"]


@pytest.fixture(scope="session")
def of_helpers():
    """open_flamingo's src/helpers.py (the peer modules, bench/peers/of_helpers.py); skips
    when open_flamingo is not installed."""
    sys.path.insert(0, str(Path(__file__).parent / "peers"))
    import of_helpers as ofh

    if not ofh.installed():
        pytest.skip("open_flamingo (peer) not installed")
    return ofh.load("_of_helpers_bench")


@pytest.fixture(scope="session")
def report():
    return REPORT


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not REPORT.rows and not REPORT.notes and not _CEILINGS:
        return
    tr = terminalreporter
    tr.section("flamingo_rt side by side")
    c = _CEILINGS.get("cpu")
    if c is not None:
        tr.write_line(c.line())
    for row in REPORT.rows:
        tr.write_line(row.format((c.gemm_bf16_gflops if row.dtype == "bf16" else c.gemm_fp32_gflops) if c else None))
    for line in REPORT.notes:
        tr.write_line(line)


def _asks_for_bf16(item) -> bool:
    """A benchmark of bf16 products: "bf16" in its name or id, or a bf16 parameter."""
    import torch

    if "bf16" in item.nodeid or "bfloat16" in item.nodeid:
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(v is torch.bfloat16 or v in ("bf16", "bfloat16") for v in params.values()
               if isinstance(v, (str, torch.dtype)))


def pytest_collection_modifyitems(config, items):
    """bf16 benchmarks are skipped, with the reason, on a CPU whose bf16 products are torch's
    reference loops (oneDNN has no bf16 kernels for it: an AVX2-only CPU, ~0.6 GFLOP/s): the
    peer (under autocast) would run at that rate, hours for one table, while ours run widened
    to float32 (ops.half_widening) at float32's speed: a ratio that says nothing about bf16
    kernels."""
    import torch

    from flamingo_rt.ops import cpu_gemm

    if not cpu_gemm.half_products_slow("cpu", torch.bfloat16):
        return
    skip = pytest.mark.skip(reason="bf16 products on this CPU are torch's reference loops (no oneDNN bf16 "
                                   "kernels: an AVX2-only CPU, ~0.6 GFLOP/s; ours run widened to float32 there); "
                                   "bf16 rows need AVX-512 bf16 or AMX")
    for item in items:
        if _asks_for_bf16(item):
            item.add_marker(skip)
