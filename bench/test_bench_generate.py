"""Few-shot generation vs open_flamingo's generate() (issue 6's benchmark).

open_flamingo's generate() needs transformers 4.36 (.venv/peers/openflamingo, installed by
./dev setup); ours needs no transformers, so both run side by side in one subprocess
with that folder first on sys.path. FLAMINGO_RT_BENCH_QUICK=1 runs a small smoke shape.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PEER = Path(sys.prefix) / "peers" / "openflamingo"


@pytest.mark.parametrize("dtype", ["float32"])
def test_generate_side_by_side(benchmark, ceilings, report, dtype):
    if not (PEER / "transformers").exists():
        pytest.skip(f"{PEER} missing (./dev setup installs it)")
    args = [sys.executable, str(ROOT / "bench" / "peers" / "generate_side_by_side.py"), "--dtype", dtype]
    if os.environ.get("FLAMINGO_RT_BENCH_QUICK") == "1":
        args.append("--quick")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PEER), str(ROOT)]))

    def run():
        return subprocess.run(args, capture_output=True, text=True, env=env, timeout=1800)

    proc = benchmark.pedantic(run, rounds=1, iterations=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report.notes.append(f"few-shot generation vs open_flamingo generate() ({dtype}):")
    for line in proc.stdout.splitlines():
        if line.startswith("JSON "):
            benchmark.extra_info.update(json.loads(line[5:]))
        elif not line.startswith("machine ceilings"):
            report.notes.append("  " + line)
