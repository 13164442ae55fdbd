"""DecoderLM: parity with transformers' LlamaForCausalLM on random weights, HF folder
loading (single file and sharded), cross-attention slots, input validation."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from flamingo_rt.models.config import LMConfig
from flamingo_rt.models.lm import (
    DecoderLM,
    expected_hf_keys,
    lm_config_from_hf,
    lm_config_to_hf,
    xattn_layer_indices,
)

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, INTER = 256, 64, 3, 4, 2, 160


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return ((a - b).norm() / b.norm()).item()


def make_hf(seed: int, tie: bool = False, attention_bias: bool = False, mlp_bias: bool = False,
            rope_theta: float = 10000.0, n_layers: int = LAYERS) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=n_layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, intermediate_size=INTER,
        max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        attention_bias=attention_bias, mlp_bias=mlp_bias,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).float().eval()
    # Non-trivial random weights everywhere (norm scales and biases too).
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    if tie:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def left_padded_batch(seed: int, B: int = 3, T: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    lengths = [T, T - 5, T - 2][:B]
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, position_ids


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("attention_bias", [False, True])
def test_logits_parity_no_mask(tie, attention_bias):
    hf = make_hf(0, tie=tie, attention_bias=attention_bias, mlp_bias=attention_bias)
    ours = DecoderLM.from_hf(hf)
    assert ours.cfg.tie_embeddings == tie
    if tie:
        assert ours.lm_head.weight is ours.embed_tokens.weight
    else:
        assert ours.lm_head.weight is not ours.embed_tokens.weight
    # Our tensors are copies, not views of HF's.
    assert ours.embed_tokens.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        out = ours(ids)
    assert out.shape == (2, 17, VOCAB) and out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("tie", [False, True])
def test_logits_parity_left_padding(tie):
    hf = make_hf(2, tie=tie)
    ours = DecoderLM.from_hf(hf)
    ids, mask, pos = left_padded_batch(3)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        out = ours(ids, attention_mask=mask, position_ids=pos)
        out_default_pos = ours(ids, attention_mask=mask.bool())  # derived positions
    assert torch.isfinite(out).all(), "padding rows must not produce NaN"
    keep = mask.bool()
    assert rel_err(out[keep], ref[keep]) < 1e-5
    assert torch.equal(out_default_pos[keep], out[keep])
    # Unpadded row equals the same row run alone, without a mask.
    with torch.no_grad():
        alone = ours(ids[:1])
    assert rel_err(out[0], alone[0]) < 1e-6


def test_gradient_parity():
    hf = make_hf(4, tie=True, attention_bias=True)
    ours = DecoderLM.from_hf(hf)
    ours.train()
    hf.train()  # no dropout in LLaMA (attention_dropout 0)
    ids, mask, pos = left_padded_batch(5)
    w = torch.randn(ids.shape + (VOCAB,), generator=torch.Generator().manual_seed(6))
    keep = mask.bool()[..., None]
    (hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits * w * keep).sum().backward()
    (ours(ids, attention_mask=mask, position_ids=pos) * w * keep).sum().backward()
    hf_params = dict(hf.named_parameters())
    n = 0
    for name, p in ours.named_parameters():
        hp = hf_params["lm_head.weight" if name == "lm_head.weight" else "model." + name]
        assert p.grad is not None, name
        assert rel_err(p.grad, hp.grad) < 1e-5, name
        n += 1
    assert n == len(hf_params)


@pytest.mark.parametrize("sharded", [False, True])
def test_from_hf_folder(tmp_path, sharded):
    hf = make_hf(7, tie=sharded)
    kw = {"max_shard_size": "50KB"} if sharded else {}
    hf.save_pretrained(tmp_path, safe_serialization=True, **kw)
    files = sorted(p.name for p in tmp_path.iterdir())
    if sharded:
        assert "model.safetensors.index.json" in files
        assert sum(f.endswith(".safetensors") for f in files) > 1
    else:
        assert "model.safetensors" in files
    ours = DecoderLM.from_hf(tmp_path)
    assert not any(p.is_meta for p in ours.parameters())
    assert all(p.requires_grad for p in ours.parameters())
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert rel_err(ours(ids), hf(input_ids=ids).logits) < 1e-5
    # dtype conversion on load
    half = DecoderLM.from_hf(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    with torch.no_grad():
        assert half(ids).dtype == torch.bfloat16


def test_hf_round_trip():
    hf = make_hf(9, tie=False, n_layers=2)
    ours = DecoderLM.from_hf(hf)
    cfg2 = LlamaConfig(**lm_config_to_hf(ours.cfg))
    cfg2._attn_implementation = "eager"
    hf2 = LlamaForCausalLM(cfg2).eval()
    missing, unexpected = hf2.load_state_dict(ours.to_hf_state_dict(), strict=True)
    ids = torch.randint(0, VOCAB, (1, 11), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        assert rel_err(hf2(input_ids=ids).logits, ours(ids)) < 1e-6
    assert lm_config_from_hf(lm_config_to_hf(ours.cfg)) == ours.cfg


def test_from_hf_key_errors(tmp_path):
    from safetensors.torch import save_file

    hf = make_hf(11, n_layers=2)
    hf.config.save_pretrained(tmp_path)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    sd.pop("model.layers.1.mlp.up_proj.weight")
    sd["model.layers.0.extra.weight"] = torch.randn(3)
    sd["model.norm.weight"] = torch.randn(HIDDEN + 1)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        DecoderLM.from_hf(tmp_path)
    msg = str(e.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg
    assert "model.layers.0.extra.weight" in msg
    assert "model.norm.weight" in msg and str(HIDDEN + 1) in msg


def test_from_hf_refuses_pickles(tmp_path):
    hf = make_hf(12, n_layers=1)
    hf.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        DecoderLM.from_hf(tmp_path)


class Recorder(nn.Module):
    """Identity-like block that records the layer it sits at, its inputs and kwargs."""

    def __init__(self, idx: int, log: list):
        super().__init__()
        self.idx, self.log = idx, log
        self.scale = nn.Parameter(torch.zeros(()))  # exact identity while zero

    def forward(self, h, media=None, tag=None):
        self.log.append((self.idx, tuple(h.shape), tag, media is not None))
        return h + self.scale * h


@pytest.mark.parametrize("placement,every,expected", [
    ("openflamingo", 2, [1, 3, 5]),
    ("openflamingo", 3, [2, 5]),
    ("first", 2, [0, 2, 4]),
    ("first", 4, [0, 4]),
    ("openflamingo", 1, [0, 1, 2, 3, 4, 5]),
    ("first", 1, [0, 1, 2, 3, 4, 5]),
])
def test_xattn_indices(placement, every, expected):
    assert xattn_layer_indices(6, every, placement) == expected


def test_xattn_insert_and_call_order():
    torch.manual_seed(13)
    cfg = LMConfig(vocab_size=VOCAB, dim=32, n_layers=6, n_heads=4, n_kv_heads=2,
                   intermediate_size=64)
    lm = DecoderLM(cfg).eval()
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        base = lm(ids)
    for placement, every, expected in [("openflamingo", 2, [1, 3, 5]), ("first", 4, [0, 4])]:
        lm.xattn = nn.ModuleDict()
        log: list = []
        idx = lm.insert_xattn(lambda i: Recorder(i, log), every=every, placement=placement)
        assert idx == expected
        assert sorted(lm.xattn.keys(), key=int) == [str(i) for i in expected]
        media = torch.randn(2, 1, 4, 32)
        with torch.no_grad():
            out = lm(ids, xattn_kwargs={"media": media, "tag": placement})
        assert [r[0] for r in log] == expected
        assert all(r[1] == (2, 5, 32) and r[2] == placement and r[3] for r in log)
        assert torch.equal(out, base)  # identity blocks leave the LM unchanged
        # Parameter names of the blocks, kept out of the HF state dict.
        assert f"xattn.{expected[0]}.scale" in dict(lm.named_parameters())
        assert not any("xattn" in k for k in lm.to_hf_state_dict())
    with pytest.raises(ValueError, match="already"):
        lm.insert_xattn(lambda i: Recorder(i, []), every=2)


def test_xattn_bad_arguments():
    lm = DecoderLM(LMConfig(vocab_size=16, dim=16, n_layers=2, n_heads=2, intermediate_size=32))
    with pytest.raises(ValueError, match="placement"):
        lm.insert_xattn(nn.Identity, every=1, placement="last")
    with pytest.raises(ValueError, match="every"):
        lm.insert_xattn(nn.Identity, every=0)
    with pytest.raises(ValueError, match="no layer"):
        lm.insert_xattn(lambda i: nn.Identity(), every=5)


def test_input_id_errors():
    torch.manual_seed(14)
    lm = DecoderLM(LMConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, intermediate_size=32))
    with pytest.raises(ValueError, match=r"token id 50 .*vocab_size 50"):
        lm(torch.tensor([[1, 2, 50]]))
    with pytest.raises(ValueError, match=r"token id -3 .*vocab_size 50"):
        lm.embed(torch.tensor([[1, -3]]))
    with pytest.raises(TypeError, match="integer"):
        lm(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="attention_mask"):
        lm(torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3))
    assert lm(torch.tensor([[1, 49]], dtype=torch.int32)).shape == (1, 2, 50)


def test_unsupported_hf_configs(tmp_path):
    base = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1,
                       num_attention_heads=HEADS, intermediate_size=INTER)
    # rope scaling as transformers 5 stores it, and in the older config.json layout
    scaled = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1,
                         num_attention_heads=HEADS, intermediate_size=INTER,
                         rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="RoPE scaling type 'linear'"):
        lm_config_from_hf(scaled.to_dict())
    old = base.to_dict()
    old.pop("rope_parameters")
    old.update(rope_theta=500000.0, rope_scaling={"type": "dynamic", "factor": 4.0})
    with pytest.raises(ValueError, match="'dynamic'"):
        lm_config_from_hf(old)
    old["rope_scaling"] = None
    assert lm_config_from_hf(old).rope_theta == 500000.0
    gelu = base.to_dict()
    gelu["hidden_act"] = "gelu"
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        lm_config_from_hf(gelu)
    # through a folder, as from_hf reads it
    scaled.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="linear"):
        DecoderLM.from_hf(tmp_path)


def test_config_mapping_fields():
    hf = LlamaConfig(vocab_size=300, hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
                     num_key_value_heads=3, intermediate_size=200, max_position_embeddings=77,
                     rms_norm_eps=1e-6, tie_word_embeddings=True, head_dim=32,
                     attention_bias=True, mlp_bias=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 123.0})
    c = lm_config_from_hf(json.loads(hf.to_json_string()))
    assert c == LMConfig(vocab_size=300, dim=96, n_layers=2, n_heads=6, n_kv_heads=3,
                         intermediate_size=200, max_seq_len=77, rope_theta=123.0, norm_eps=1e-6,
                         tie_embeddings=True, head_dim=32, attention_bias=True, mlp_bias=True)
    keys = expected_hf_keys(c)
    assert keys["model.layers.0.self_attn.q_proj.weight"] == (6 * 32, 96)
    assert keys["model.layers.1.self_attn.o_proj.bias"] == (96,)
    assert "lm_head.weight" not in keys


def test_head_dim_override_parity():
    """head_dim != hidden / heads (as in some LLaMA-layout models), with the theta set."""
    torch.manual_seed(15)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=24, intermediate_size=96,
                      rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    cfg._attn_implementation = "eager"
    hf = LlamaForCausalLM(cfg).eval()
    ours = DecoderLM.from_hf(hf)
    assert ours.cfg.head_dim == 24 and ours.cfg.rope_theta == 500.0
    ids = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        assert rel_err(ours(ids), hf(input_ids=ids).logits) < 1e-5


def test_return_hidden_and_dtype_cast():
    torch.manual_seed(16)
    lm = DecoderLM(LMConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                            intermediate_size=64)).eval()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        logits, hidden = lm(ids, return_hidden=True)
        assert hidden.shape == (2, 7, 32)
        assert torch.allclose(logits, lm.lm_head(hidden))
        lm64 = lm.double()
        assert lm64(ids).dtype == torch.float64
        # rotary frequencies stay float32 after a dtype cast
        assert lm64.rotary.inv_freq().dtype == torch.float32


def test_torch_export():
    """The LM traces with torch.export (id checks are skipped while tracing)."""
    torch.manual_seed(17)
    lm = DecoderLM(LMConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                            intermediate_size=64)).eval()
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    ep = torch.export.export(lm, (ids,), {"attention_mask": mask})
    with torch.no_grad():
        assert torch.allclose(ep.module()(ids, attention_mask=mask), lm(ids, attention_mask=mask),
                              rtol=1e-6, atol=1e-6)
