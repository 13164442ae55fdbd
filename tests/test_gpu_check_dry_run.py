"""bench/gpu_check.py must run before GPU time is spent on it: dry-run it on the CPU."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

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


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_sections_order_and_budget(tmp_path, capsys):
    """--only runs the named sections, timings in the order given; past --budget-s what is
    left is reported as skipped (whole sections in the table's header, single checks and
    timings as rows), never as failed."""
    mod = _load()
    rc = mod.main(["--device", "cpu", "--quick", "--no-build", "--out", str(tmp_path),
                   "--only", "bga_time,xattn_time"])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["checks"] == []
    ops = [t["op"] for t in res["timings"]]
    assert ops[0].startswith("bias_gamma_act") and any(o.startswith("xattn") for o in ops)
    # the cross-attention's forward+backward also through the registered op (the A/B of
    # the plain eager path), and the switch restored afterwards
    impls = {t["impl"] for t in res["timings"] if t["op"] == "xattn fwd+bwd"}
    assert {"cpu", "cpu (registered op)"} <= impls
    assert "FLAMINGO_RT_EAGER_OPS" not in __import__("os").environ
    assert not any(o.startswith(("resampler", "nfnet", "decode")) for o in ops)
    assert all(t["ms"] > 0 for t in res["timings"])
    out = capsys.readouterr().out
    assert out.index("section bga_time") < out.index("section xattn_time")

    mod = _load()
    rc = mod.main(["--device", "cpu", "--quick", "--no-build", "--out", str(tmp_path / "b"),
                   "--only", "bga_checks,decode_time", "--budget-s", "1e-3"])
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert rc == 0 and res["checks"] == [] and res["timings"] == []
    head = (tmp_path / "b" / "table.md").read_text().splitlines()[3]
    assert head.startswith("sections skipped for want of time") and "bga_checks" in head and "decode_time" in head
    # a check reached past the deadline: skipped, not failed
    mod.RUN.deadline = 0.0
    c = mod.run_case("x", lambda t, backend: t, lambda t: t, (torch.randn(3),), (0,), "reference",
                     torch.float32, torch.device("cpu"), "case")
    assert c.skipped and c.ok and c.note == "skipped: time budget"
    try:
        _load().main(["--device", "cpu", "--only", "nope", "--out", str(tmp_path / "c")])
    except SystemExit as e:
        assert "unknown section 'nope'" in str(e)
    else:
        raise AssertionError("an unknown section was accepted")


def test_gpu_check_checks_over_processes(tmp_path):
    """--jobs 2: the checks run in spawned worker processes, all of them, and pass."""
    mod = _load()
    rc = mod.main(["--device", "cpu", "--quick", "--no-build", "--out", str(tmp_path),
                   "--only", "bga_checks", "--jobs", "2"])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert {c["dtype"] for c in res["checks"]} == {"float32", "bfloat16"}
    assert len(res["checks"]) >= 12 and all(c["ok"] and not c["skipped"] for c in res["checks"])
