"""bench/gpu_check.py must run before GPU time is spent on it: dry-run it on the CPU."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_runs_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses need their module registered
    spec.loader.exec_module(mod)
    rc = mod.main(["--device", "cpu", "--quick", "--no-build", "--out", str(tmp_path)])
    assert rc == 0
    table = (tmp_path / "table.md").read_text()
    assert "image_causal_attention" in table and "resampler_attention" in table and "FAIL" not in table
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["checks"] and all(c["ok"] for c in res["checks"])
    assert any(t["impl"].startswith("sdpa") for t in res["timings"])
    assert {t["impl"] for t in res["timings"] if t["op"].startswith("decode step")} >= {"eager", "compiled (aot_eager)"}
    assert all(t["ms"] > 0 for t in res["timings"])
