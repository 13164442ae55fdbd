"""Training across processes: SIGKILL then resume equals an uninterrupted run (bitwise);
2 processes (torchrun, gloo, DDP) equal 1 process on the same global batch; the CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent / "train"
sys.path.insert(0, str(HERE))
from world_fixture import make_world, train_config_dict, write_config  # noqa: E402

from flamingo_rt.io.checkpoint import load_state_dict  # noqa: E402

WORKER = str(HERE / "train_worker.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]) + os.pathsep
           + os.environ.get("PYTHONPATH", ""))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


def _losses(out_dir: Path):
    return [(r["step"], r["loss"]) for r in map(json.loads, (out_dir / "log.jsonl").read_text().splitlines())]


def _run(cfg_path: Path, timeout=300, extra=()):
    r = subprocess.run([sys.executable, WORKER, str(cfg_path), *extra], env=ENV, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_sigkill_then_resume_equals_uninterrupted(world, tmp_path):
    steps = 12
    ref = write_config(tmp_path / "ref.json", train_config_dict(world["model"].parent, tmp_path / "ref", steps))
    _run(ref)
    cfg = write_config(tmp_path / "run.json", train_config_dict(world["model"].parent, tmp_path / "run", steps))
    latest = tmp_path / "run" / "checkpoints" / "latest"
    p = subprocess.Popen([sys.executable, WORKER, str(cfg)], env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        if latest.exists() and latest.read_text().strip() >= "step-00000004":
            break
        if p.poll() is not None:
            pytest.fail(f"the training process ended early: {p.stderr.read()[-2000:]}")
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "final").exists(), "the run finished before it was killed"
    killed_at = latest.read_text().strip()
    _run(cfg)  # resumes from the latest checkpoint
    assert killed_at < "step-00000012"
    assert _losses(tmp_path / "run") == _losses(tmp_path / "ref")  # exactly, every step
    a = load_state_dict(tmp_path / "run" / "final")
    b = load_state_dict(tmp_path / "ref" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _torchrun(cfg: Path):
    """torchrun with 2 workers; each worker's stdout/stderr is also kept whole in a log folder
    beside the config (--tee), and a failure reports the end of each worker's stderr, not
    only the launcher's (a rank that aborts at exit is otherwise hard to tell apart)."""
    logs = cfg.with_suffix(".logs")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "--log-dir", str(logs), "--tee", "3", WORKER, str(cfg)], env=ENV, capture_output=True,
                       text=True, timeout=300)
    if r.returncode != 0:
        ranks = "".join(f"\n--- {f.relative_to(logs)} ---\n{f.read_text(errors='replace')[-4000:]}"
                        for f in sorted(logs.rglob("stderr.log")))
        pytest.fail(f"torchrun exited {r.returncode}\n--- launcher ---\n{r.stderr[-3000:]}{ranks}")
    return r


def _ranks_stderr(cfg: Path) -> str:
    """The workers' stderr of the last :func:`_torchrun` of ``cfg``, all ranks."""
    return "".join(f.read_text(errors="replace") for f in sorted(cfg.with_suffix(".logs").rglob("stderr.log")))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one(world, tmp_path, strategy):
    """The same global batch on 2 processes (gloo) gives the 1-process losses and weights.
    For FSDP2 the run is also stopped at step 2 and resumed from its sharded-then-gathered
    checkpoint; the DDP run makes its batches ahead in a thread."""
    steps = 4
    root = world["model"].parent
    one = write_config(tmp_path / "one.json", train_config_dict(root, tmp_path / "one", steps))
    _run(one)
    # the 2-process DDP run also makes its batches ahead in a thread (prefetch_steps 1)
    two_d = train_config_dict(root, tmp_path / "two", steps, strategy=strategy,
                              **({"prefetch_steps": 1} if strategy == "ddp" else {}))
    if strategy == "fsdp":
        _torchrun(write_config(tmp_path / "two_a.json", dict(two_d, steps=2)))
        assert (tmp_path / "two" / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    _torchrun(write_config(tmp_path / "two.json", two_d))
    # FSDP2 warns about every wrapped module returning a view (an in-place op on it would skip
    # the module's all-gather): the resampler and the blocks return fresh tensors
    assert "returned a view tensor" not in _ranks_stderr(tmp_path / "two.json")
    l1, l2 = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in l1] == [s for s, _ in l2] == list(range(1, steps + 1))
    for (_, a), (_, b) in zip(l1, l2):
        assert a.keys() == b.keys()
        for k in a:
            assert abs(a[k] - b[k]) <= 1e-5 * abs(a[k]), (k, a[k], b[k])
    w1 = load_state_dict(tmp_path / "one" / "final")
    w2 = load_state_dict(tmp_path / "two" / "final")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(w1[k], load_state_dict(world["model"])[k]) for k in w1)  # it trained


def test_two_processes_bf16_store_frozen_linears_in_bf16(world, tmp_path):
    """precision = "bf16" under DDP: frozen_linear_dtype "auto" stores the frozen LM's linears
    in bf16 in each process (mixed-dtype parameters through DDP's broadcast); the losses follow
    the 1-process bf16 run within bf16 rounding, and the final folder holds the frozen
    weights as loaded (float32), not their bf16 rounding."""
    steps = 2
    root = world["model"].parent
    _run(write_config(tmp_path / "one.json", train_config_dict(root, tmp_path / "one", steps, precision="bf16")))
    out = _torchrun(write_config(tmp_path / "two.json", train_config_dict(root, tmp_path / "two", steps,
                                                                          precision="bf16", strategy="ddp")))
    assert "frozen LM linear tensors stored in bf16 (freeze.frozen_linear_dtype = 'auto'" in out.stdout, out.stdout[-2000:]
    l1, l2 = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in l1] == [s for s, _ in l2] == list(range(1, steps + 1))
    for (_, a), (_, b) in zip(l1, l2):
        for k in a:
            assert abs(a[k] - b[k]) <= 2e-2 * abs(a[k]), (k, a[k], b[k])
    source = load_state_dict(world["model"])
    final = load_state_dict(tmp_path / "two" / "final")
    frozen = [k for k in final if k.startswith("lm.layers.") and k.endswith(".weight") and final[k].dim() == 2]
    assert frozen and all(final[k].dtype == torch.float32 and torch.equal(final[k], source[k]) for k in frozen)
    assert any(not torch.equal(final[k].bfloat16().float(), final[k]) for k in frozen)  # not bf16-rounded


def test_cli_train(world, tmp_path):
    cfg = write_config(tmp_path / "c.json", train_config_dict(world["model"].parent, tmp_path / "out", 3))
    r = subprocess.run([sys.executable, "-m", "flamingo_rt.cli", "train", str(cfg), "--steps", "2", "--no-progress"],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trained 2 steps" in r.stdout
    assert len(_losses(tmp_path / "out")) == 2 and (tmp_path / "out" / "final" / "config.json").exists()
    r = subprocess.run([sys.executable, "-m", "flamingo_rt.cli", "train", str(tmp_path / "nope.json")],
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "does not exist" in r.stderr
