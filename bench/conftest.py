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
        tr.write_line(row.format(c.gemm_fp32_gflops if c else None))
    for line in REPORT.notes:
        tr.write_line(line)
