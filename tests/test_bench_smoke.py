"""The benchmarks still run: ``pytest bench`` at small shapes (``FLAMINGO_RT_BENCH_QUICK=1``,
bench/harness.py) in a subprocess, with every benchmark's own checks (ours against the peer
on the same weights and inputs) and its report. A smoke run, not a measurement: the
timings of a quick run mean nothing, and the memory comparisons are not asserted there.

Without it the benchmarks, which CI does not otherwise run, broke unnoticed: the training
bench's peer could not import transformers (the repo root first on sys.path: its kernels/
shadowed the PyPI package ``kernels``), and FLOP counting raised on the feed-forward op's
(B, T, D) inputs.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# a row or note of each benchmark module in the side-by-side report (bench/conftest.py)
EXPECTED = ("xattn core fwd", "xattn block", "resampler fwd", "resampler bf16", "gated FF residual",
            "gated output projection", "LM head + loss", "decode attention", "nfnet", "connector training step",
            "generation")


def test_benchmarks_run_at_quick_shapes(tmp_path):
    # the pytest script, not `python -m pytest`: -m would put the repo root first on sys.path
    pytest_script = Path(sys.executable).with_name("pytest")
    env = dict(os.environ, FLAMINGO_RT_BENCH_QUICK="1")
    # the bf16 training step is left out (~50 s of fresh processes; the fp32 one runs every helper)
    r = subprocess.run([str(pytest_script), "bench", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                        "--deselect", "bench/test_bench_train.py::test_train_step[bf16]"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    summary = out.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "failed" not in summary and "error" not in summary, summary
    report = out.split("flamingo_rt side by side", 1)[-1].lower()
    missing = [name for name in EXPECTED if name.lower() not in report]
    assert not missing, f"no report line of {missing}:\n{out[-6000:]}"
