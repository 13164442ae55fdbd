"""A whole Flamingo model folder: exact round trip, config, tokenizer, errors."""
from __future__ import annotations

import json

import pytest
import torch

from flamingo_rt.io import CheckpointError, FlamingoTokenizer, load_pretrained, save_pretrained
from flamingo_rt.models import get_preset
from flamingo_rt.models.flamingo import Flamingo


def test_round_trip_is_exact(tmp_path):
    model = Flamingo(get_preset("tiny")).eval()
    with torch.no_grad():
        for blk in model.xattn_blocks():
            blk.attn_gate.fill_(0.4)
    tok = FlamingoTokenizer.train_bpe(["a red square left of a blue circle"] * 20, vocab_size=300)
    save_pretrained(model, tmp_path, tokenizer=tok, max_shard_bytes=400_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    loaded, tok2 = load_pretrained(tmp_path)
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    assert loaded.config == model.config
    assert tok2.encode("a red square") == tok.encode("a red square")
    ids = torch.randint(4, 300, (1, 10))
    ids[0, 2] = 0
    media = torch.randn(1, 1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(ids, media).logits, loaded(ids, media).logits)


def test_load_bf16_and_wrong_shape_error(tmp_path):
    model = Flamingo(get_preset("tiny"))
    save_pretrained(model, tmp_path)
    loaded, tok = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert tok is None
    assert loaded.lm.embed_tokens.weight.dtype == torch.bfloat16
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["lm"]["dim"] = 128
    cfg["lm"]["head_dim"] = 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="lm.embed_tokens.weight"):
        load_pretrained(tmp_path)
    with pytest.raises(TypeError, match="expected dtype to be a floating torch.dtype .*got 'bf16'"):
        load_pretrained(tmp_path, dtype="bf16")
    with pytest.raises(TypeError, match="expected dtype to be a floating torch.dtype .*got torch.int8"):
        load_pretrained(tmp_path, dtype=torch.int8)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device cuda was asked for, but CUDA is not available"):
            load_pretrained(tmp_path, device="cuda")
    # a config key that is not a field (another version's, a typo), at the top or in a section
    for where, edit in (("config", lambda c: c.update(bogus_key=1)),
                        (r"config\.lm", lambda c: c["lm"].update(dimm=3)),
                        (r"config\.vision\.nfnet", lambda c: c["vision"]["nfnet"].update(depth=3))):
        bad = json.loads(json.dumps(cfg))
        edit(bad)
        (tmp_path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=rf"config\.json: not a Flamingo config: {where}: unknown keys \["):
            load_pretrained(tmp_path)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["lm"].update(n_layers="2"), r"config\.lm: expected n_layers: an integer, got '2'"),
    (lambda c: c["lm"].update(dim=64.5), r"config\.lm: expected dim: an integer, got 64\.5"),
    (lambda c: c["lm"].update(tie_embeddings="yes"), r"config\.lm: expected tie_embeddings: true or false"),
    (lambda c: c["lm"].update(norm_eps=0), r"config\.lm: expected rope_theta > 0 and norm_eps > 0"),
    (lambda c: c["xattn"].update(heads=0), r"config\.xattn: expected heads >= 1, got 0"),
    (lambda c: c["xattn"].update(ff_kind="relu"), r"config\.xattn: expected ff_kind in \('gelu', 'sqrelu'\)"),
    (lambda c: c["xattn"].update(placement="last"), r"config\.xattn: expected placement in"),
    (lambda c: c["resampler"].update(num_latents=-1), r"config\.resampler: expected num_latents >= 1"),
    (lambda c: c["resampler"].update(max_num_frames=0), r"config\.resampler: expected max_num_frames >= 1"),
    (lambda c: c["vision"].update(image_size=-1), r"config\.vision: expected image_size >= 1, got -1"),
    (lambda c: c["vision"].update(image_std=[0.5, 0.0, 0.5]), r"config\.vision: expected image_std > 0"),
    (lambda c: c["vision"].update(image_mean=[0.5, 0.5]), r"config\.vision: expected image_mean: a list of 3 numbers"),
    (lambda c: c["vision"]["nfnet"].update(depths=[1, 2, 0, 3]), r"config\.vision\.nfnet: expected depths >= 1"),
    (lambda c: c.update(image_token_id=9999), r"config: expected image_token_id in \[0, \d+\) \(the LM's vocab"),
    (lambda c: c.update(eos_token_id=-1), r"config: expected eos_token_id in \[0, \d+\)"),
])
def test_config_values_are_checked_as_read(tmp_path, edit, message):
    """A config.json whose values have the wrong type or range is a CheckpointError naming
    the section, the field and the value (n_layers = "2" was a TypeError inside torch,
    image_size = -1 and a token id past the vocabulary loaded silently)."""
    model = Flamingo(get_preset("tiny"))
    save_pretrained(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    edit(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: not a Flamingo config: " + message):
        load_pretrained(tmp_path)
