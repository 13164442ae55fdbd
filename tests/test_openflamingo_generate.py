"""Greedy generation and beam search (with and without beams that stop, under each stopping rule)
equal open_flamingo's own generate() on converted weights.

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
        for c in r["stopping"]:  # the end of chunk stops beams: HF's finishing and stopping rules
            assert c["ours"] == c["of"], c
        for c in r["penalized"]:  # a repetition penalty, greedy and with beams
            assert c["ours"] == c["of"], c
            assert len(c["of_ids"]) >= 6, c  # long enough for its own tokens to be penalized
    # the cases exercise the rules: answers that stopped early, and answers that differ between
    # the stopping rules (early_stopping True / False) of one prompt, boost and length penalty
    cases = [c for r in out["results"] for c in r["stopping"]]
    assert sum(len(c["of_ids"]) < 12 for c in cases) >= len(cases) // 4
    by_rule = {}
    for i, r in enumerate(out["results"]):
        for c in r["stopping"]:
            boost, es, lp = c["case"]
            by_rule.setdefault((i, boost, lp), {})[str(es)] = c["of"]
    assert sum(rules.get("True") != rules.get("False") for rules in by_rule.values() if len(rules) > 1) >= 3
    # the stopping rules and the kept hypotheses themselves, on random calls
    fuzz = out["hypotheses"]
    assert fuzz["mismatches"] == 0 and 0 < fuzz["done_true"] < fuzz["done_calls"], fuzz
    # the whole search on scripted next-token distributions, against transformers' scorer
    scripted = out["scripted"]
    assert scripted["mismatches"] == [], scripted["mismatches"]
    assert scripted["cases"] // 4 < scripted["stopped_early"] < scripted["cases"], scripted
    assert scripted["penalty_changed"] >= 5, scripted  # repetition penalties that change the answer
