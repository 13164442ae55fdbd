"""Safetensors checkpoints: exact round trips, tied weights, sharding, atomicity, errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from flamingo_rt.io import checkpoint as ckpt
from flamingo_rt.io.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_config,
    load_metadata,
    load_state_dict,
    save_checkpoint,
    save_config,
)


# ----------------------------------------------------------------------------- helpers


def _bytes_of(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.numel() == 0:
        return b""
    return bytes(t.view(torch.uint8).numpy())


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert _bytes_of(a) == _bytes_of(b)


def _no_temp_files(folder: Path) -> None:
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert leftovers == []


def _random_state_dict() -> dict:
    g = torch.Generator().manual_seed(1234)
    f32 = torch.randn(7, 5, generator=g)
    f32[0, 0] = float("nan")
    f32[0, 1] = -0.0
    f32[0, 2] = float("inf")
    base = torch.randn(6, 9, generator=g, dtype=torch.float64)
    return {
        "f32": f32,
        "f64": torch.randn(3, 4, 2, generator=g, dtype=torch.float64),
        "f16": torch.randn(11, generator=g).half(),
        "bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "i64": torch.randint(-(2**62), 2**62, (4, 4), generator=g, dtype=torch.int64),
        "i32": torch.randint(-(2**31), 2**31 - 1, (9,), generator=g, dtype=torch.int32),
        "i8": torch.randint(-128, 127, (3, 3), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (13,), generator=g, dtype=torch.uint8),
        "bool": torch.rand(2, 7, generator=g) > 0.5,
        "scalar": torch.tensor(3.25),
        "empty": torch.empty(0, 4),
        "transposed": base.t(),  # non-contiguous
        "strided": base[::2, 1::3],  # non-contiguous, partial view of the same storage
        "odd_bf16": torch.randn(3, generator=g).to(torch.bfloat16),  # misaligns what follows
    }


class TinyLM(nn.Module):
    """A model with tied input/output embeddings, a buffer and a config."""

    class Config:
        def __init__(self, vocab: int = 37, dim: int = 8) -> None:
            self.vocab, self.dim = vocab, dim

        def to_dict(self) -> dict:
            return {"vocab": self.vocab, "dim": self.dim}

    def __init__(self, vocab: int = 37, dim: int = 8) -> None:
        super().__init__()
        self.config = TinyLM.Config(vocab, dim)
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied
        self.register_buffer("scale", torch.randn(dim))


# ----------------------------------------------------------------------------- round trips


def test_round_trip_bitwise_all_dtypes(tmp_path):
    sd = _random_state_dict()
    assert not sd["transposed"].is_contiguous() and not sd["strided"].is_contiguous()
    files = save_checkpoint(sd, tmp_path / "ck")
    assert [f.name for f in files] == ["model.safetensors"]
    loaded = load_state_dict(tmp_path / "ck")
    assert set(loaded) == set(sd)
    for k, v in sd.items():
        assert_bitwise_equal(loaded[k], v)
    # the file path itself works too
    loaded2 = load_state_dict(tmp_path / "ck" / "model.safetensors")
    for k, v in sd.items():
        assert_bitwise_equal(loaded2[k], v)
    _no_temp_files(tmp_path / "ck")


def test_readable_by_reference_safetensors_reader(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    sd = _random_state_dict()
    save_checkpoint(sd, tmp_path, metadata={"note": "hello", "n": 3})
    ref = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    assert set(ref) == set(sd)
    for k, v in sd.items():
        assert_bitwise_equal(ref[k], v)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["note"] == "hello" and meta["n"] == "3"
    assert load_metadata(tmp_path) == {"format": "pt", "note": "hello", "n": "3"}


def test_dtype_cast_only_floats(tmp_path):
    sd = _random_state_dict()
    save_checkpoint(sd, tmp_path)
    loaded = load_state_dict(tmp_path, dtype=torch.float16)
    assert loaded["f64"].dtype == torch.float16 and loaded["bf16"].dtype == torch.float16
    assert loaded["i64"].dtype == torch.int64 and loaded["bool"].dtype == torch.bool
    assert_bitwise_equal(loaded["i32"], sd["i32"])
    torch.testing.assert_close(loaded["f64"], sd["f64"].half())


def test_tied_weights_stored_once_and_stay_tied(tmp_path):
    model = TinyLM()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    files = save_checkpoint(model, tmp_path)
    assert sorted(f.name for f in files) == ["config.json", "model.safetensors"]
    assert load_config(tmp_path) == {"vocab": 37, "dim": 8}

    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) != ("embed_tokens.weight" in keys)  # stored once

    sd = load_state_dict(tmp_path)
    assert sd["lm_head.weight"] is sd["embed_tokens.weight"]

    fresh = TinyLM()
    out = load_checkpoint(fresh, tmp_path)
    assert out is fresh
    assert fresh.lm_head.weight is fresh.embed_tokens.weight
    fresh_sd = fresh.state_dict()
    for k, v in model.state_dict().items():
        assert_bitwise_equal(fresh_sd[k], v)
    with torch.no_grad():
        fresh.embed_tokens.weight[0, 0] = 123.0
    assert fresh.lm_head.weight[0, 0].item() == 123.0


def test_load_into_model_with_dtype_and_missing_tied_key(tmp_path):
    model = TinyLM()
    sd = model.state_dict()
    del sd["lm_head.weight"]  # e.g. a checkpoint written by a tool that drops tied copies
    save_checkpoint(sd, tmp_path)
    fresh = TinyLM()
    load_checkpoint(fresh, tmp_path, dtype=torch.float64)  # tied key is not "missing"
    assert fresh.proj.weight.dtype == torch.float64
    torch.testing.assert_close(fresh.lm_head.weight, model.embed_tokens.weight.double())


def test_explicit_config_and_atomic_config(tmp_path):
    save_config(tmp_path / "c", {"a": 1, "b": [1, 2]})
    assert load_config(tmp_path / "c") == {"a": 1, "b": [1, 2]}
    save_checkpoint({"x": torch.randn(3)}, tmp_path / "c", config={"a": 2})
    assert load_config(tmp_path / "c") == {"a": 2}
    _no_temp_files(tmp_path / "c")
    with pytest.raises(CheckpointError, match="nothing: no such model folder or config file"):
        load_config(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json: no such config file \(expected a model folder"):
        load_config(tmp_path / "empty")


# ----------------------------------------------------------------------------- sharding


def _shardable_state_dict(n: int = 12) -> dict:
    g = torch.Generator().manual_seed(7)
    sd = {f"layers.{i}.weight": torch.randn(16, 16, generator=g) for i in range(n)}  # 1 KiB each
    sd["layers.0.bias"] = torch.randn(16, generator=g).to(torch.bfloat16)
    sd["head.weight"] = sd["layers.0.weight"]  # tied across the state dict
    return sd


def test_sharded_round_trip_and_index(tmp_path):
    sd = _shardable_state_dict()
    files = save_checkpoint(sd, tmp_path, max_shard_bytes=3000)
    names = sorted(p.name for p in tmp_path.iterdir())
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) == 6  # 2 x 1 KiB (+ the 32-byte bias) per 3000-byte shard
    assert shards[0] == "model-00001-of-00006.safetensors"
    assert "model.safetensors.index.json" in names and "model.safetensors" not in names
    assert files[-1].name == "model.safetensors.index.json"

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 12 * 1024 + 32
    assert set(index["weight_map"]) == set(sd) - {"head.weight"}
    assert set(index["weight_map"].values()) == set(shards)
    for s in shards:
        assert (tmp_path / s).stat().st_size <= 3000 + 1024  # header included

    loaded = load_state_dict(tmp_path)
    assert set(loaded) == set(sd)
    for k, v in sd.items():
        assert_bitwise_equal(loaded[k], v)
    assert loaded["head.weight"] is loaded["layers.0.weight"]
    _no_temp_files(tmp_path)


def test_resave_removes_stale_files(tmp_path):
    sd = _shardable_state_dict()
    save_checkpoint(sd, tmp_path, max_shard_bytes=3000)  # 6 shards
    sd2 = _shardable_state_dict(3)
    for k, v in sd2.items():
        if k != "head.weight":
            v.mul_(2)  # different values; head.weight stays tied to layers.0.weight
    save_checkpoint(sd2, tmp_path, max_shard_bytes=3000)  # 2 shards
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    loaded = load_state_dict(tmp_path)
    assert set(loaded) == set(sd2)
    for k, v in sd2.items():
        assert_bitwise_equal(loaded[k], v)

    save_checkpoint(sd, tmp_path)  # single file now: shards and index go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert set(load_state_dict(tmp_path)) == set(sd)

    save_checkpoint(sd2, tmp_path, max_shard_bytes=3000)  # and back: the single file goes
    assert "model.safetensors" not in {p.name for p in tmp_path.iterdir()}
    assert set(load_state_dict(tmp_path)) == set(sd2)


def test_failed_save_leaves_previous_checkpoint_and_no_temp_files(tmp_path, monkeypatch):
    old = {"w": torch.randn(64, 64), "b": torch.randn(64)}
    save_checkpoint(old, tmp_path, max_shard_bytes=10_000)
    before = sorted(p.name for p in tmp_path.iterdir())

    calls = {"n": 0}
    real_fsync = os.fsync

    def flaky_fsync(fd):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(ckpt.os, "fsync", flaky_fsync)
    new = {f"t{i}": torch.randn(32, 32) for i in range(4)}
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(new, tmp_path, max_shard_bytes=5000)
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == before
    _no_temp_files(tmp_path)
    loaded = load_state_dict(tmp_path)
    for k, v in old.items():
        assert_bitwise_equal(loaded[k], v)


# ----------------------------------------------------------------------------- errors


def test_truncated_file(tmp_path):
    save_checkpoint(_random_state_dict(), tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-37])
    with pytest.raises(CheckpointError) as ei:
        load_state_dict(tmp_path)
    msg = str(ei.value)
    assert "model.safetensors" in msg and "truncated" in msg
    assert isinstance(ei.value, ValueError)

    path.write_bytes(data[:200])  # cut inside the header
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_state_dict(path)

    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="too short"):
        load_state_dict(path)


def test_corrupted_header(tmp_path):
    save_checkpoint(_random_state_dict(), tmp_path)
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    g = torch.Generator().manual_seed(3)
    garbage = bytes(torch.randint(0, 256, (40,), generator=g, dtype=torch.uint8).tolist())
    data[8:48] = garbage
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*corrupted header"):
        load_state_dict(tmp_path)

    # an absurd header length field
    path.write_bytes((2**60).to_bytes(8, "little") + bytes(data[8:]))
    with pytest.raises(CheckpointError, match="corrupted header"):
        load_state_dict(tmp_path)

    # valid JSON, inconsistent entry
    hdr = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(len(hdr).to_bytes(8, "little") + hdr + b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"'x'.*needs 16 bytes"):
        load_state_dict(tmp_path)

    # unknown dtype
    hdr = json.dumps({"x": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}).encode()
    path.write_bytes(len(hdr).to_bytes(8, "little") + hdr + b"\0")
    with pytest.raises(CheckpointError, match="'Q7'"):
        load_state_dict(tmp_path)


def test_pickle_is_never_loaded(tmp_path):
    torch.save({"w": torch.randn(3)}, tmp_path / "model.safetensors")  # a pickle in disguise
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_state_dict(tmp_path)


def test_missing_shard_and_bad_index(tmp_path):
    save_checkpoint(_shardable_state_dict(), tmp_path, max_shard_bytes=3000)
    (tmp_path / "model-00003-of-00006.safetensors").unlink()
    with pytest.raises(CheckpointError) as ei:
        load_state_dict(tmp_path)
    msg = str(ei.value)
    assert "model-00003-of-00006.safetensors" in msg and "do not exist" in msg
    assert "model.safetensors.index.json" in msg

    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="index is not valid JSON"):
        load_state_dict(tmp_path)

    index = {"metadata": {}, "weight_map": {"w": "../../etc/passwd"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="invalid shard file name"):
        load_state_dict(tmp_path)

    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="shard files but no model.safetensors.index.json"):
        load_state_dict(tmp_path)


def test_shard_from_another_save_is_detected(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    save_checkpoint(_shardable_state_dict(), a, max_shard_bytes=3000)
    save_checkpoint(_shardable_state_dict(), b, max_shard_bytes=3000)
    os.replace(b / "model-00002-of-00006.safetensors", a / "model-00002-of-00006.safetensors")
    with pytest.raises(CheckpointError, match="different save"):
        load_state_dict(a)


def test_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match=r"no checkpoint found.*notes\.txt"):
        load_state_dict(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_state_dict(tmp_path / "absent")


def test_wrong_shape_key(tmp_path):
    save_checkpoint(TinyLM(vocab=37, dim=8), tmp_path)
    other = TinyLM(vocab=40, dim=8)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(other, tmp_path)
    err = ei.value
    msg = str(err)
    assert "mis-shaped" in msg
    assert "embed_tokens.weight: model expects (40, 8), checkpoint has (37, 8)" in msg
    assert "lm_head.weight" in msg
    assert err.mismatched_shapes["embed_tokens.weight"] == ((40, 8), (37, 8))
    # shape mismatches are an error even when not strict
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_checkpoint(other, tmp_path, strict=False)


def test_missing_and_unexpected_keys(tmp_path):
    model = TinyLM()
    sd = dict(model.state_dict())
    del sd["proj.bias"], sd["scale"]
    sd["extra.weight"] = torch.randn(2)
    save_checkpoint(sd, tmp_path)

    fresh = TinyLM()
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(fresh, tmp_path)
    msg = str(ei.value)
    assert "2 missing keys" in msg and "proj.bias" in msg and "scale" in msg
    assert "1 unexpected key" in msg and "extra.weight" in msg
    assert sorted(ei.value.missing_keys) == ["proj.bias", "scale"]
    assert ei.value.unexpected_keys == ["extra.weight"]

    # not strict: the rest loads
    load_checkpoint(fresh, tmp_path, strict=False)
    assert_bitwise_equal(fresh.proj.weight, model.proj.weight)


def test_long_key_lists_are_truncated(tmp_path):
    big = nn.ModuleDict({f"l{i}": nn.Linear(2, 2) for i in range(30)})
    save_checkpoint({"unrelated": torch.zeros(1)}, tmp_path)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(big, tmp_path)
    msg = str(ei.value)
    assert "60 missing keys" in msg and "... and 50 more" in msg
    assert len(msg) < 2000
    assert len(ei.value.missing_keys) == 60


def test_bad_inputs_to_save(tmp_path):
    with pytest.raises(TypeError, match="not a tensor"):
        save_checkpoint({"a": 3}, tmp_path)
    with pytest.raises(ValueError, match="max_shard_bytes"):
        save_checkpoint({"a": torch.zeros(1)}, tmp_path, max_shard_bytes=0)
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint({"a": torch.zeros(1)}, tmp_path, metadata={"flamingo_rt.aliases": "x"})
