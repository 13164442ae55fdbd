"""``flamingo-rt export``: a model folder -> AOTInductor packages a C++ host runs.

Output folder::

    encode_media.pt2   MediaEncoderStep: pixels (N, F, 3, S, S) -> media keys/values (X, 2, N, L, H, dh)
    token_step.pt2     TokenStep: a chunk of T tokens -> last logits (1, V), writes the KV cache
    decode_step.pt2    DecodeStep: the same at T = 1 for B rows (beams) at one position, rows-first
                       caches (on the CPU our fused decode ops)
    score_step.pt2     ScoreStep: candidates packed past the context -> every position's logits (1, T, V)
    tokenizer.json     the model's tokenizer
    manifest.json      shapes, dtypes, special token ids, preprocessing, versions

The packages call flamingo_rt's C++ ops (``flamingo_rt_C::*``) where a C++ kernel exists
for the device; every other op is compiled into the package. A host loads our op library
(``libflamingo_rt_ops``) and libtorch, nothing else.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from .. import __version__ as _version
from .._values import is_integer
from ..io.pretrained import load_pretrained
from ..models.flamingo import Flamingo
from ..ops import backend as _backend
from .modules import DecodeStep, MediaEncoderStep, ScoreStep, TokenStep

__all__ = ["export_model", "cache_shapes", "MANIFEST_VERSION"]

# 2 (2026-12-07): the media encoder takes N media a call, (N, F, 3, S, S) -> (X, 2, N, L, H, dh); the
# decode step B rows, B in [1, max_beams]
MANIFEST_VERSION = 2


def cache_shapes(model: Flamingo, max_seq_len: int, max_media: int) -> Dict[str, list]:
    """Shapes of the host-owned caches (batch 1) for ``model``."""
    c = model.config
    blk = next(iter(model.lm.xattn.values()))
    return {
        "kv_cache": [c.lm.n_layers, 2, 1, c.lm.n_kv_heads, max_seq_len, c.lm.head_dim],
        "media_cache": [len(model.lm.xattn), 2, 1, max_media, c.resampler.num_latents,
                        blk.attn.heads, blk.attn.dim_head],
        "media_kv": [len(model.lm.xattn), 2, c.resampler.num_latents, blk.attn.heads, blk.attn.dim_head],
    }


def decode_row_shape(cache_shape: list) -> list:
    """One row of the decode step's rows-first caches from a host cache's shape: (n_layers,
    2, 1, Hkv, S, Dh) -> (n_layers, 2, Hkv, S, Dh); (X, 2, 1, M, L, H, dh) -> (X, 2, M, L, H, dh)."""
    return [*cache_shape[:2], *cache_shape[3:]]


def _check_no_python_ops(ep, name: str) -> None:
    """A C++ host cannot run ops defined in Python (``torch.library.custom_op``): refuse an
    exported graph that calls one (every flamingo_rt op must take its export-mode path)."""
    bad = sorted({str(n.target) for n in ep.graph.nodes if n.op == "call_function"
                  and getattr(getattr(n.target, "namespace", None), "__str__", lambda: "")() == "flamingo_rt"})
    if bad:
        raise RuntimeError(f"the exported {name} calls Python-defined ops {bad}, which a C++ host cannot run; "
                           "each must call its kernel directly under ops.backend.export_mode()")


def _compile(ep, path: Path) -> float:
    _check_no_python_ops(ep, path.name)
    t = time.perf_counter()
    torch._inductor.aoti_compile_and_package(ep, package_path=str(path))
    return time.perf_counter() - t


def export_model(model_or_dir: Union[str, Path, Flamingo], out_dir: Union[str, Path], device: str = "cpu",
                 max_seq_len: int = 512, max_media: int = 16, max_frames: Optional[int] = None,
                 max_beams: int = 8, tokenizer=None, progress: bool = False) -> Dict[str, Any]:
    """Export a model (a folder, or a model plus ``tokenizer``) into ``out_dir``; returns
    the manifest. ``max_frames``: the most frames a clip may have (default: the
    resampler's trained frame count, or 8). ``max_beams``: the most rows the decode step
    takes at once (a host's beam search decodes its K beams in one call).
    """
    if isinstance(model_or_dir, (str, Path)):
        model, tokenizer = load_pretrained(model_or_dir, device=device)
        if tokenizer is None:
            raise FileNotFoundError(f"{model_or_dir} has no tokenizer.json; a host needs one")
    else:
        model = model_or_dir.to(device)
        if tokenizer is None:
            raise ValueError("expected the model's tokenizer with an in-memory model")
    model = model.eval()
    if hasattr(model.vision_encoder, "freeze"):
        model.vision_encoder.freeze()  # the standardization folded once
    c = model.config
    if not len(model.lm.xattn):
        raise ValueError("the model has no cross-attention layer; nothing to export for media")
    if not is_integer(max_seq_len) or not 1 <= max_seq_len <= c.lm.max_seq_len:
        raise ValueError(f"expected max_seq_len an integer in [1, {c.lm.max_seq_len}], got {max_seq_len!r}")
    if not is_integer(max_media) or max_media < 1:
        raise ValueError(f"expected max_media an integer >= 1, got {max_media!r}")
    if max_frames is not None and (not is_integer(max_frames) or max_frames < 1):
        raise ValueError(f"expected max_frames None or an integer >= 1, got {max_frames!r}")
    max_seq_len, max_media = int(max_seq_len), int(max_media)
    max_frames = int(max_frames) if max_frames is not None else (c.resampler.max_num_frames or 8)
    if not is_integer(max_beams) or max_beams < 1:
        raise ValueError(f"expected max_beams an integer >= 1, got {max_beams!r}")
    max_beams = int(max_beams)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype
    shapes = cache_shapes(model, max_seq_len, max_media)
    S_img = c.vision.image_size
    dev = torch.device(device)
    times = {}
    with torch.no_grad(), _backend.export_mode():
        # media encoder: N media dynamic in [1, max_media], F frames in [1, max_frames]
        # (each static when its maximum is 1: a torch.export.Dim needs min < max)
        enc = MediaEncoderStep(model).eval()
        pixels = torch.randn(min(2, max_media), min(2, max_frames), 3, S_img, S_img, device=dev, dtype=dtype)
        media_dims = {}
        if max_media > 1:
            media_dims[0] = torch.export.Dim("media", min=1, max=max_media)
        if max_frames > 1:
            media_dims[1] = torch.export.Dim("frames", min=1, max=max_frames)
        ep = torch.export.export(enc, (pixels,), dynamic_shapes=(media_dims,) if media_dims else None)
        if progress:
            print("compiling encode_media.pt2 ...", flush=True)
        times["encode_media"] = _compile(ep, out / "encode_media.pt2")
        # token step: T tokens dynamic in [1, max_seq_len] (static T = 1 when max_seq_len = 1)
        step = TokenStep(model).eval()
        T0 = min(2, max_seq_len)
        ids = torch.zeros(1, T0, dtype=torch.long, device=dev)
        start = torch.zeros(1, dtype=torch.long, device=dev)
        midx = torch.full((1, T0), -1, dtype=torch.int32, device=dev)
        kv = torch.zeros(shapes["kv_cache"], dtype=dtype, device=dev)
        mc = torch.zeros(shapes["media_cache"], dtype=dtype, device=dev)
        token_dims = None
        if max_seq_len > 1:
            T = torch.export.Dim("tokens", min=1, max=max_seq_len)
            token_dims = ({1: T}, None, {1: T}, None, None)
        ep = torch.export.export(step, (ids, start, midx, kv, mc), dynamic_shapes=token_dims)
        if progress:
            print("compiling token_step.pt2 ...", flush=True)
        times["token_step"] = _compile(ep, out / "token_step.pt2")
        # the decode step: the same function at T = 1, for B rows in [1, max_beams] at one
        # position (a session: 1; beam search: its beams); on the CPU our fused decode ops (one
        # call per layer and block), else the modules with decode-sized kernels
        decode = DecodeStep(model).eval()
        decode_fused = decode.fused(kv)
        R = min(2, max_beams)
        rows_kv = torch.zeros([R, *decode_row_shape(shapes["kv_cache"])], dtype=dtype, device=dev)
        rows_mc = torch.zeros([R, *decode_row_shape(shapes["media_cache"])], dtype=dtype, device=dev)
        decode_dims = None
        if max_beams > 1:
            rows = torch.export.Dim("rows", min=1, max=max_beams)
            decode_dims = ({0: rows}, None, {0: rows}, {0: rows}, {0: rows})
        ep = torch.export.export(decode, (ids[:1, :1].expand(R, 1).contiguous(), start,
                                          midx[:1, :1].expand(R, 1).contiguous(), rows_kv, rows_mc),
                                 dynamic_shapes=decode_dims)
        if progress:
            print("compiling decode_step.pt2 ...", flush=True)
        times["decode_step"] = _compile(ep, out / "decode_step.pt2")
        # the score step: candidates packed past the context, every position's logits
        score = ScoreStep(model).eval()
        offset = torch.zeros(1, T0, dtype=torch.long, device=dev)
        score_dims = None if token_dims is None else ({1: T}, None, {1: T}, {1: T}, None, None)
        ep = torch.export.export(score, (ids, start, offset, midx, kv, mc), dynamic_shapes=score_dims)
        if progress:
            print("compiling score_step.pt2 ...", flush=True)
        times["score_step"] = _compile(ep, out / "score_step.pt2")
    tokenizer.save(out / "tokenizer.json")
    manifest = {
        "format": "flamingo_rt-export",
        "manifest_version": MANIFEST_VERSION,
        "flamingo_rt_version": _version,
        "torch_version": torch.__version__,
        "device": dev.type,
        "dtype": str(dtype).replace("torch.", ""),
        "max_seq_len": max_seq_len,
        "max_media": max_media,
        "max_frames": max_frames,
        "max_beams": max_beams,
        "image_size": S_img,
        "image_mean": list(c.vision.image_mean),
        "image_std": list(c.vision.image_std),
        "vocab_size": c.lm.vocab_size,
        "special_tokens": {"image": tokenizer.image_token_id, "endofchunk": tokenizer.eoc_token_id,
                           "pad": tokenizer.pad_token_id, "eos": tokenizer.eos_token_id},
        "shapes": shapes,
        "packages": {"encode_media": "encode_media.pt2", "token_step": "token_step.pt2",
                     "decode_step": "decode_step.pt2", "score_step": "score_step.pt2"},
        "inputs": {
            "encode_media": ["pixels (N, F, 3, image_size, image_size) normalised: N media of F frames",
                             "-> media keys/values (X, 2, N, L, H, dh)"],
            "token_step": ["ids (1, T) int64", "start (1,) int64", "media_index (1, T) int32",
                           "kv_cache (written)", "media_cache"],
            "decode_step": ["ids (B, 1) int64", "start (1,) int64", "media_index (B, 1) int32",
                            "kv_rows (B, n_layers, 2, Hkv, S, Dh) (written)", "media_rows (B, X, 2, M, L, H, dh)",
                            "-> logits (B, V) float32", "B in [1, max_beams], every row at position start; for "
                            "B = 1 the caches' memory as they are (kv_cache.squeeze(2)[None])"],
            "score_step": ["ids (1, T) int64", "start (1,) int64", "offset (1, T) int64 (index inside its candidate)",
                           "media_index (1, T) int32", "kv_cache (written past start)", "media_cache",
                           "-> logits (1, T, V) float32"],
        },
        "decode_step_fused": decode_fused,
        "compile_seconds": {k: round(v, 1) for k, v in times.items()},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
