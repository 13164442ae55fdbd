"""Batches made ahead in a background thread (runtime/train/prefetch.py): the Prefetcher's
order, count and errors; a Trainer with prefetching gives the steps, checkpoints and stream
positions of one without, and leaves its streams where the last step taken left them."""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "train"))
from world_fixture import make_world, train_config_dict  # noqa: E402

from flamingo_rt.io.checkpoint import load_state_dict  # noqa: E402
from flamingo_rt.runtime.train import NonFiniteLossError, TrainConfig, Trainer  # noqa: E402
from flamingo_rt.runtime.train.prefetch import Prefetcher  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_items_in_order_made_ahead_in_one_other_thread():
    made, threads = [], set()

    def make():
        threads.add(threading.current_thread().name)
        made.append(len(made))
        return made[-1]

    with Prefetcher(make, count=5, depth=2) as pf:
        deadline = time.monotonic() + 10
        while len(made) < 2 and time.monotonic() < deadline:  # made before anything is asked
            time.sleep(0.01)
        assert len(made) == 2
        assert [pf.get() for _ in range(5)] == [0, 1, 2, 3, 4]
        with pytest.raises(IndexError, match="all 5"):
            pf.get()
    assert made == [0, 1, 2, 3, 4]  # exactly count calls
    assert threads == {"flamingo_rt-prefetch"}


def test_depth_zero_makes_in_get():
    calls = []
    pf = Prefetcher(lambda: calls.append(threading.current_thread()) or len(calls), count=3, depth=0)
    assert calls == []
    assert pf.get() == 1 and calls == [threading.current_thread()]
    pf.close()


def test_an_error_is_raised_by_the_get_of_its_item_and_ends_the_stream():
    n = [0]

    def make():
        n[0] += 1
        if n[0] == 3:
            raise OSError("disk gone")
        return n[0]

    with Prefetcher(make, count=6, depth=2) as pf:
        assert pf.get() == 1 and pf.get() == 2
        with pytest.raises(OSError, match="disk gone"):
            pf.get()
        with pytest.raises(IndexError):
            pf.get()
    assert n[0] == 3  # nothing made after the failure


def test_close_stops_the_thread_and_bad_arguments_are_named():
    started = threading.Event()

    def make():
        started.set()
        return 0

    pf = Prefetcher(make, count=1000, depth=1)
    started.wait(10)
    pf.close()
    assert pf._thread is None
    with pytest.raises(ValueError, match="depth >= 0, got -1"):
        Prefetcher(make, count=1, depth=-1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


def test_prefetch_steps_config_default_and_errors(world, tmp_path):
    for bad in (-2, 1.5, True):
        with pytest.raises(ValueError, match=r"prefetch_steps: an integer( >= 0)? \(or unset\), got"):
            TrainConfig.from_dict(train_config_dict(world["model"].parent, tmp_path, 1, prefetch_steps=bad))
    cfg = TrainConfig.from_dict(train_config_dict(world["model"].parent, tmp_path, 1))
    assert cfg.prefetch_steps is None
    assert cfg.resolved_prefetch_steps("cuda") == 1 and cfg.resolved_prefetch_steps("cpu") == 0
    cfg = TrainConfig.from_dict(train_config_dict(world["model"].parent, tmp_path, 1, prefetch_steps=3))
    assert cfg.resolved_prefetch_steps("cpu") == 3


def test_the_background_threads_ops_use_one_thread_and_the_loops_keep_theirs():
    torch.set_num_threads(2)
    seen = []
    with Prefetcher(lambda: seen.append(torch.get_num_threads()), count=1, depth=1) as pf:
        pf.get()
    assert seen == [1] and torch.get_num_threads() == 2


def _fit(world, out: Path, steps: int, prefetch: int, **over):
    cfg = TrainConfig.from_dict(train_config_dict(world["model"].parent, out, steps, prefetch_steps=prefetch,
                                                  **over))
    tr = Trainer(cfg)
    made_in = []
    make = tr._make_step

    def spy():
        made_in.append(threading.current_thread().name)
        return make()

    tr._make_step = spy
    hist = tr.fit()
    return tr, hist, made_in


def test_trainer_with_prefetch_equals_without(world, tmp_path):
    a, ha, made_a = _fit(world, tmp_path / "a", 4, prefetch=0)
    b, hb, made_b = _fit(world, tmp_path / "b", 4, prefetch=2)
    assert set(made_a) == {threading.current_thread().name} and set(made_b) == {"flamingo_rt-prefetch"}
    assert len(made_b) == 4  # no batch made beyond the last step
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]
    wa, wb = load_state_dict(tmp_path / "a" / "final"), load_state_dict(tmp_path / "b" / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # checkpoints record the positions after the step they hold, whatever was read ahead
    for step in (2, 4):
        sa = torch.load(tmp_path / "a" / "checkpoints" / f"step-{step:08d}" / "state.pt", weights_only=True)
        sb = torch.load(tmp_path / "b" / "checkpoints" / f"step-{step:08d}" / "state.pt", weights_only=True)
        assert sa["data"] == sb["data"]
    assert a.stream_positions() == b.stream_positions()
    assert {n: s.state_dict() for n, s in b.streams.items()} == b.stream_positions()


def test_a_stopped_run_rewinds_its_streams_to_the_last_step_taken(world, tmp_path):
    cfg = TrainConfig.from_dict(train_config_dict(world["model"].parent, tmp_path / "run", 6, prefetch_steps=3,
                                                  checkpoint_every=100))
    tr = Trainer(cfg)
    with torch.no_grad():
        tr.model.resampler.latents[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="at step 1"):
        tr.fit()
    # the thread had read up to 3 steps ahead; the streams are back after step 1's batches
    ref = Trainer(TrainConfig.from_dict(train_config_dict(world["model"].parent, tmp_path / "ref", 6)))
    ref._batches()
    assert {n: s.state_dict() for n, s in tr.streams.items()} == ref.stream_positions()


def test_bf16_on_a_cpu_without_bf16_products_is_named_at_the_start(world, tmp_path, monkeypatch, capsys):
    """precision bf16 where oneDNN runs no bf16 products (torch's reference loops, ~270x
    slower than float32): the run says at its start that its products run widened to float32
    (the default), or warns when FLAMINGO_RT_WIDEN_HALF=0 keeps torch's loops; it trains
    either way."""
    from flamingo_rt.ops import cpu_gemm

    monkeypatch.setattr(cpu_gemm, "bf16_available", lambda: False)
    _, hist, _ = _fit(world, tmp_path / "slow", 1, 0, precision="bf16")
    assert len(hist) == 1
    out = capsys.readouterr().out
    assert "the products run on bf16-rounded operands widened to float32" in out and "reference loops" not in out
    monkeypatch.setenv("FLAMINGO_RT_WIDEN_HALF", "0")
    _, hist, _ = _fit(world, tmp_path / "slow0", 1, 0, precision="bf16")
    assert len(hist) == 1
    assert "precision bf16, but bf16 matrix products on this CPU run in torch's reference loops" in capsys.readouterr().out
    monkeypatch.delenv("FLAMINGO_RT_WIDEN_HALF")
    monkeypatch.setattr(cpu_gemm, "bf16_available", lambda: True)
    _fit(world, tmp_path / "fast", 1, 0, precision="bf16")
    out = capsys.readouterr().out
    assert "reference loops" not in out and "widened" not in out
