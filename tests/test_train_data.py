"""Training data: the on-disk format, deterministic streams with exact positions, bad
records skipped and counted, the collate's labels, padding and media."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "train"))
from world_fixture import FRAMES, IMAGE_SIZE, make_world  # noqa: E402

from flamingo_rt.io.tokenizer import FlamingoTokenizer  # noqa: E402
from flamingo_rt.models.config import VisionConfig  # noqa: E402
from flamingo_rt.runtime.train import (  # noqa: E402
    BadRecord, Collator, DatasetConfig, DatasetStream, NoUsableRecordError, decode_record, write_dataset,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def tok(world):
    return FlamingoTokenizer.from_file(world["model"] / "tokenizer.json")


def _ds(path, kind, **kw):
    return DatasetConfig(name=kind, kind=kind, path=str(path), **kw)


def test_write_and_decode_round_trip(tmp_path):
    img = torch.rand(3, 8, 8)
    write_dataset([{"image": img, "text": "a red circle."}], tmp_path / "p", "pairs")
    write_dataset([{"text": "hi <image>one.<|endofchunk|><image>two.<|endofchunk|>", "images": [img, img.flip(1)]}],
                  tmp_path / "d", "interleaved", image_format="npy")
    write_dataset([{"video": torch.rand(4, 3, 8, 8), "text": "a square moves left."}], tmp_path / "v", "video")
    line = (tmp_path / "p" / "shard-00000.jsonl").read_text()
    s = decode_record(line, tmp_path / "p", "pairs", 5)
    assert s.text == "<image>a red circle.<|endofchunk|>"
    assert len(s.media) == 1 and s.media[0].shape == (1, 3, 8, 8) and s.media[0].dtype == torch.uint8
    expect = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    assert torch.equal(s.media[0][0], expect)  # PNG is lossless
    s = decode_record((tmp_path / "d" / "shard-00000.jsonl").read_text(), tmp_path / "d", "interleaved", 5)
    assert s.text.count("<image>") == 2 and torch.equal(s.media[1][0], (img.flip(1) * 255).round().to(torch.uint8))
    s = decode_record((tmp_path / "v" / "shard-00000.jsonl").read_text(), tmp_path / "v", "video", 5, num_frames=2)
    assert s.media[0].shape == (2, 3, 8, 8)  # 4 frames resampled to 2 (first and last)


def test_write_dataset_names_the_record_it_cannot_write(tmp_path):
    """Missing fields, images of the wrong shape, dtype or range, and marker counts that do
    not match: a ValueError / TypeError naming the record and field (they were KeyErrors, a
    sparse-permute RuntimeError, an AttributeError on numpy input, or a silently clamped
    0-255 float image). (3, H, W) numpy arrays work like tensors."""
    img = torch.rand(3, 8, 8)
    cases = [
        ([{"image": img}], "pairs", ValueError, r"record 0: a record of kind 'pairs' needs 'text'; got \['image'\]"),
        ([{"image": img, "text": "a"}, {"image": img[0], "text": "b"}], "pairs", ValueError,
         r"record 1 'image': expected an image of shape \(3, H, W\), got \(8, 8\)"),
        ([{"image": img * 255, "text": "a"}], "pairs", ValueError, r"expected float pixels in \[0, 1\].*pass uint8"),
        ([{"image": img.double().mul(2).int(), "text": "a"}], "pairs", TypeError, "expected uint8 or float pixels, got torch.int32"),
        ([{"image": "a.png", "text": "a"}], "pairs", TypeError, "expected an image tensor or numpy array"),
        ([{"text": "<image>a"}], "interleaved", ValueError, "needs 'images'"),
        ([{"text": "<image>a <image>", "images": [img]}], "interleaved", ValueError, "2 <image> markers in its text for 1 images"),
        ([{"video": img, "text": "a"}], "video", ValueError, r"expected 'video' of shape \(F, 3, H, W\)"),
        ([{"image": img, "text": 3}], "pairs", TypeError, "expected 'text' to be a str, got int"),
    ]
    for i, (records, kind, exc, msg) in enumerate(cases):
        with pytest.raises(exc, match=msg):
            write_dataset(records, tmp_path / f"bad{i}", kind)
    arr = (img * 255).round().to(torch.uint8).numpy()
    arr.setflags(write=False)
    write_dataset([{"image": arr, "text": "a red circle."}], tmp_path / "np", "pairs", image_format="npy")
    s = decode_record((tmp_path / "np" / "shard-00000.jsonl").read_text(), tmp_path / "np", "pairs", 5)
    assert torch.equal(s.media[0][0], torch.from_numpy(arr.copy()))


@pytest.mark.parametrize("record,reason", [
    ("not json", "malformed"),
    ('{"text": "x"}', "malformed"),
    ('{"text": "<image>a", "images": ["media/missing.png"]}', "missing_image"),
    ('{"text": "<image>a", "images": ["media/bad.png"]}', "undecodable_image"),
    ('{"text": "<image><image>", "images": ["media/ok.npy", "media/ok.npy"]}', "too_many_images"),
    ('{"text": "<image>a", "images": ["media/ok.npy"], "extra": 1, "z": "<image>"}', None),
    ('{"text": "<image>a <image>", "images": ["media/ok.npy"]}', "marker_mismatch"),
    ('{"text": " <image> ", "images": ["media/ok.npy"]}', "empty_text"),
])
def test_bad_records_are_named(tmp_path, record, reason):
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    np.save(tmp_path / "media" / "ok.npy", np.zeros((4, 4, 3), np.uint8))
    if reason is None:  # a good record (unknown keys are ignored)
        assert decode_record(record, tmp_path, "interleaved", max_images=1).media[0].shape == (1, 3, 4, 4)
        return
    with pytest.raises(BadRecord) as e:
        decode_record(record, tmp_path, "interleaved", max_images=1)
    assert e.value.reason == reason


def test_stream_skips_and_counts_bad_records(tmp_path):
    write_dataset([{"image": torch.rand(3, 8, 8), "text": f"caption {i}."} for i in range(6)], tmp_path, "pairs",
                  shard_size=3)
    (tmp_path / "media" / "0000001.png").write_bytes(b"not a png")  # undecodable
    (tmp_path / "media" / "0000004.png").unlink()  # missing
    with open(tmp_path / "shard-00001.jsonl", "a") as f:
        f.write("{broken\n")
    stream = DatasetStream(_ds(tmp_path, "pairs"), seed=0)
    texts = [stream.next_sample().text for _ in range(8)]  # more than one epoch: never crashes
    assert not any("caption 1." in t or "caption 4." in t for t in texts)
    assert {t for t in texts} == {f"<image>caption {i}.<|endofchunk|>" for i in (0, 2, 3, 5)}
    assert stream.bad["undecodable_image"] >= 1 and stream.bad["missing_image"] >= 1 and stream.bad["malformed"] >= 1


def test_stream_all_bad_raises_clearly(tmp_path):
    (tmp_path / "shard-00000.jsonl").write_text('{"image": "media/nope.png", "text": "x"}\n')
    stream = DatasetStream(_ds(tmp_path, "pairs"), seed=0)
    with pytest.raises(NoUsableRecordError, match="no usable record"):
        for _ in range(5):
            stream.next_sample()


def test_stream_missing_folder_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DatasetStream(_ds(tmp_path / "nope", "pairs"), 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="jsonl shards"):
        DatasetStream(_ds(tmp_path / "empty", "pairs"), 0)


def test_stream_is_deterministic_shuffled_and_resumes_exactly(world):
    cfg = _ds(world["docs"], "interleaved", max_images=3)
    a = DatasetStream(cfg, seed=7)
    seq = [a.next_sample().text for _ in range(60)]  # 24 records: 2.5 epochs
    b = DatasetStream(cfg, seed=7)
    assert [b.next_sample().text for _ in range(60)] == seq
    c = DatasetStream(cfg, seed=8)
    assert [c.next_sample().text for _ in range(24)] != seq[:24]  # another seed, another order
    assert sorted(seq[:24]) == sorted(seq[24:48])  # each epoch is a permutation of all records
    assert seq[:24] != seq[24:48]  # reshuffled per epoch
    for cut in (5, 24, 31):
        d = DatasetStream(cfg, seed=7)
        for _ in range(cut):
            d.next_sample()
        state = json.loads(json.dumps(d.state_dict()))
        e = DatasetStream(cfg, seed=7)
        e.load_state_dict(state)
        assert [e.next_sample().text for _ in range(60 - cut)] == seq[cut:]


def test_collate_labels_padding_and_media(tok, tmp_path):
    vis = VisionConfig(kind="nfnet", width=64, image_size=IMAGE_SIZE)
    img = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    from flamingo_rt.runtime.train import Sample

    a = Sample("intro text <image>a red circle.<|endofchunk|> between <image>a blue star.<|endofchunk|>", [img, img])
    b = Sample("<image>short.<|endofchunk|>", [img])
    col = Collator(tok, vis, _ds(tmp_path, "interleaved"))
    batch = col([a, b])
    ids_a = tok.encode(a.text) + [tok.eos_token_id]
    T = len(ids_a)
    assert batch.input_ids.shape == (2, T) and batch.media.shape == (2, 2, 1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch.num_media.tolist() == [2, 1]
    assert batch.attention_mask[1].sum() == len(tok.encode(b.text)) + 1
    assert (batch.input_ids[1, batch.attention_mask[1] == 0] == tok.pad_token_id).all()
    assert (batch.labels[1, batch.attention_mask[1] == 0] == -100).all()
    assert batch.media[1, 1].abs().sum() == 0  # padding medium
    lab = batch.labels[0].tolist()
    img_pos = [t for t, i in enumerate(ids_a) if i == tok.image_token_id]
    eoc_pos = [t for t, i in enumerate(ids_a) if i == tok.eoc_token_id]
    assert all(lab[t] == -100 for t in range(img_pos[0] + 1))  # before and at the first <image>
    assert lab[img_pos[0] + 1] == ids_a[img_pos[0] + 1]  # the caption trains
    assert lab[eoc_pos[0]] == tok.eoc_token_id  # <|endofchunk|> is a target
    assert all(lab[t] == -100 for t in range(eoc_pos[0] + 1, img_pos[1] + 1))  # " between " does not train
    assert lab[T - 1] == -100  # as OpenFlamingo: nothing after the last <|endofchunk|> trains
    # pairs keep every text token; truncation drops the media whose <image> was cut
    col2 = Collator(tok, vis, _ds(tmp_path, "pairs"))
    pb = col2([b])
    assert (pb.labels[0, 1:] != -100).all() and pb.labels[0, -1] == tok.eos_token_id
    cut = Collator(tok, vis, _ds(tmp_path, "interleaved", max_tokens=img_pos[1]))([a])
    assert cut.num_media.tolist() == [1] and cut.media.shape[1] == 1 and cut.input_ids.shape[1] == img_pos[1]


def test_collate_rejects_mixed_frame_counts(tok, tmp_path):
    from flamingo_rt.runtime.train import Sample

    vis = VisionConfig(kind="nfnet", width=64, image_size=IMAGE_SIZE)
    col = Collator(tok, vis, _ds(tmp_path, "video"))
    s = lambda f: Sample("<image>x.<|endofchunk|>", [torch.zeros(f, 3, 8, 8, dtype=torch.uint8)])  # noqa: E731
    with pytest.raises(ValueError, match="num_frames"):
        col([s(2), s(3)])
    assert col([s(FRAMES), s(FRAMES)]).media.shape[2] == FRAMES
