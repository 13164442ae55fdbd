"""Greedy generation and beam search equal open_flamingo's own generate() on converted weights.

open_flamingo's generate() needs transformers 4.36, which ./dev setup installs into
.venv/peers/openflamingo; it runs in a subprocess with that folder first on sys.path.
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


def test_greedy_and_beams_equal_open_flamingo_generate():
    if not (PEER / "transformers").exists():
        if os.environ.get("CI", "").lower() == "true":
            raise RuntimeError(f"{PEER} is missing; ./dev setup installs it")
        pytest.skip(f"{PEER} not installed (./dev setup installs it)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PEER), str(ROOT)]))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "peers" / "of_generate_parity.py")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["transformers"] == "4.36.2"
    for r in out["results"]:
        assert len(r["of"]) >= 3
        assert r["ours"] == r["of"], r
        assert len(r["of_beam_ids"]) == 8 and r["ours_beams"] == r["of_beams"], r
