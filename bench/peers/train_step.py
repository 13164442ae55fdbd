"""One connector training step, ours and open_flamingo's, on the same weights and data.

Shape (issue 7's benchmark): an OpenFlamingo-3B-shaped cross-attention. The LM is a
transformers ``LlamaForCausalLM`` with width 2048 and 2 decoder layers (TinyLlama-1.1B's
layer shape: 32 heads x 64, 4 key/value heads, SwiGLU 5632, vocabulary 32000), a gated
cross-attention block before each layer (8 heads x 64, FF x4, media width 1024); the
resampler has depth 6, width 1024, 8 heads x 64, 64 latents. Batch 2 sequences of 256
tokens with 8 images each; the vision features are given, (B*M, 257, 1024) float32 as a
ViT-L/14 at 224 px makes them (the vision encoder is frozen and outside the step).

Trainable: the resampler and the cross-attention blocks; the LM is frozen (no gradients,
gradients still flow through its activations). The step: zero grads, forward under
optional bf16 autocast, mean next-token cross-entropy, backward, clip the gradient norm
to 1.0, AdamW step.

- ours: :class:`flamingo_rt.models.Flamingo` converted with ``Flamingo.from_open_flamingo``,
  stepped by :func:`flamingo_rt.runtime.train.step.train_step` (the runtime's own step).
- peer: the open_flamingo model (its ``PerceiverResampler``, ``GatedCrossAttentionBlock``s in
  ``FlamingoLayer``s around the transformers decoder layers), stepped as open_flamingo's
  ``train_one_epoch`` does (forward with labels, ``loss.backward()``, ``clip_grad_norm_``,
  ``optimizer.step()``, ``zero_grad(set_to_none=True)``).

Importable (the benchmark) and runnable (``python bench/peers/train_step.py --side ours
--dtype bf16``: one process per side, prints the step's peak resident memory as JSON; with
``--time --steps 5`` the step times of that side alone instead).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "peers"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

FULL = dict(vocab=32000, dim=2048, layers=2, heads=32, kv_heads=4, intermediate=5632,
            vis=1024, S=257, B=2, M=8, T=256)
QUICK = dict(vocab=512, dim=128, layers=2, heads=4, kv_heads=2, intermediate=256,
             vis=64, S=17, B=2, M=3, T=48)
IMG, EOC = 0, 1  # the <image> and <|endofchunk|> token ids of tests/peers/of_models.py
LR, WD, CLIP = 1e-4, 0.1, 1.0


def shape() -> Dict[str, int]:
    """FULL, or QUICK when FLAMINGO_RT_BENCH_QUICK=1 (a seconds-long smoke run)."""
    return QUICK if os.environ.get("FLAMINGO_RT_BENCH_QUICK") == "1" else FULL


def build_peer(sh: Dict[str, int], seed: int = 0, token_rows: bool = False) -> nn.Module:
    """The open_flamingo Flamingo over a random LLaMA, connectors trainable, in train mode
    (no dropout anywhere), open gates (0.6) and re-randomized connector weights.
    ``token_rows``: the LM's input embeddings train too, as open_flamingo's factory sets them
    (its training loop keeps only the ``<image>`` / ``<|endofchunk|>`` rows of their gradient:
    :func:`peer_stepper`)."""
    from of_models import build_of_llama

    of = build_of_llama(vocab=sh["vocab"], dim=sh["dim"], layers=sh["layers"], heads=sh["heads"],
                        kv_heads=sh["kv_heads"], intermediate=sh["intermediate"], every=1,
                        vis_width=sh["vis"], patch=14, seed=seed, attn_implementation="sdpa")
    of.requires_grad_(False)
    of.perceiver.requires_grad_(True)
    of.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    if token_rows:
        of.lang_encoder.get_input_embeddings().requires_grad_(True)
    return of.train()


def build_ours(peer: nn.Module, frozen_linears_bf16: bool = False, token_rows: bool = False) -> nn.Module:
    """Ours with the peer's weights: vision encoder and LM frozen, connectors trainable;
    with ``frozen_linears_bf16`` the frozen LM's linear weights stored in bfloat16
    (``freeze.frozen_linear_dtype = "bf16"`` of ``flamingo-rt train``; for bf16 autocast).
    ``token_rows``: the vocabulary rows of ``<image>`` and ``<|endofchunk|>`` train too, by
    ``flamingo-rt train``'s rule (:func:`~flamingo_rt.runtime.train.freeze.apply_freeze`: as
    ``lm.token_rows``, also those rows of an untied output projection)."""
    from flamingo_rt.models import Flamingo
    from flamingo_rt.runtime.train.config import FreezeConfig
    from flamingo_rt.runtime.train.freeze import apply_freeze, store_frozen_linears

    ours = Flamingo.from_open_flamingo(peer)
    ours.freeze_backbones()
    if token_rows and apply_freeze(ours, FreezeConfig(), [IMG, EOC]):
        raise RuntimeError("expected the vocabulary rows to train as lm.token_rows, not through masked tables")
    if frozen_linears_bf16:
        store_frozen_linears(ours, torch.bfloat16)
    return ours.train()


@dataclass
class Data:
    """feats (B*M, S, Dv) float32; input_ids, labels (B, T) int64; locations (B, T) bool."""

    feats: torch.Tensor
    input_ids: torch.Tensor
    labels: torch.Tensor
    locations: torch.Tensor

    def media(self, B: int) -> torch.Tensor:
        """(B, M, 1, S, Dv): the features as the resamplers take them."""
        n, S, D = self.feats.shape
        return self.feats.view(B, n // B, 1, S, D)


def make_data(sh: Dict[str, int], seed: int = 1) -> Data:
    """Random features and tokens; each row has M ``<image>`` tokens at different places,
    text before the first (which gets no cross-attention); labels mask the ``<image>``
    tokens (open_flamingo's rule)."""
    g = torch.Generator().manual_seed(seed)
    B, M, T = sh["B"], sh["M"], sh["T"]
    feats = torch.randn(B * M, sh["S"], sh["vis"], generator=g)
    ids = torch.randint(2, sh["vocab"], (B, T), generator=g)
    for b in range(B):
        first = 3 + 5 * b
        pos = torch.linspace(first, T - 12 - 7 * b, M).long()
        ids[b, pos] = IMG
    labels = ids.clone()
    labels[ids == IMG] = -100
    return Data(feats, ids, labels, ids == IMG)


# --------------------------------------------------------------------------- ours


class _OursFromFeatures(nn.Module):
    """Adapts Flamingo to the runtime's ``loss_sum``: ``media`` are vision features
    (B, M, 1, S, Dv), so the step starts at the resampler (the encoder is frozen, outside)."""

    def __init__(self, flamingo: nn.Module):
        super().__init__()
        self.flamingo = flamingo

    def forward(self, input_ids, media=None, num_media=None, backend=None, **kw):
        tokens = self.flamingo.resampler(media, backend=backend)
        return self.flamingo(input_ids, media_tokens=tokens, num_media=num_media, backend=backend, **kw)


def ours_loss(ours: nn.Module, data: Data, B: int) -> torch.Tensor:
    """Mean next-token cross-entropy (float32 scalar) through the runtime's ``loss_sum``."""
    from flamingo_rt.runtime.train.step import loss_sum

    batch = _batch(data, B)
    return loss_sum(_OursFromFeatures(ours), batch) / batch.num_targets


def _batch(data: Data, B: int):
    from flamingo_rt.runtime.train.collate import Batch

    n_img = data.locations.sum(1)
    return Batch(input_ids=data.input_ids, attention_mask=torch.ones_like(data.input_ids),
                 labels=data.labels, media=data.media(B), num_media=n_img)


def ours_stepper(ours: nn.Module, data: Data, B: int, autocast: Optional[torch.dtype]) -> Callable[[], float]:
    """A closure running one ``train_step`` with the runtime's optimizer (``build_optimizer``:
    AdamW, weight decay 0.1 on weight matrices) and clipping at 1.0; returns the loss."""
    from flamingo_rt.runtime.train.config import OptimConfig
    from flamingo_rt.runtime.train.optim import build_optimizer
    from flamingo_rt.runtime.train.step import train_step

    model = _OursFromFeatures(ours)
    params = [p for p in ours.parameters() if p.requires_grad]
    opt = build_optimizer(ours, OptimConfig(lr=LR, weight_decay=WD))
    batch = _batch(data, B)
    n = batch.num_targets

    def step() -> float:
        r = train_step(model, {"bench": batch}, {"bench": 1.0}, {"bench": n}, opt,
                       grad_clip=CLIP, autocast_dtype=autocast, params=params)
        return r.losses["bench"]

    return step


# --------------------------------------------------------------------------- peer


def peer_loss(of: nn.Module, data: Data, B: int) -> torch.Tensor:
    """open_flamingo's ``Flamingo.forward`` from the resampler on: condition every
    FlamingoLayer on the media tokens, then the LM with its own loss (mean over labels)."""
    vis = of.perceiver(data.media(B))  # as Flamingo._encode_vision_x, after the encoder
    for layer in of.lang_encoder._get_decoder_layers():
        layer.condition_vis_x(vis)
    # the mixin's forward conditions the layers on the <image> locations of input_ids
    out = of.lang_encoder(input_ids=data.input_ids, attention_mask=None, labels=data.labels, use_cache=False)
    of.lang_encoder.clear_conditioned_layers()
    return out.loss


def peer_stepper(of: nn.Module, data: Data, B: int, autocast: Optional[torch.dtype]) -> Callable[[], float]:
    """A closure running one step as open_flamingo's training loop does (its optimizer:
    AdamW, weight decay 0.1 on the cross-attention blocks' parameters); returns the loss."""
    params = [p for p in of.parameters() if p.requires_grad]
    named = [(n, p) for n, p in of.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([
        {"params": [p for n, p in named if "gated_cross_attn" in n], "weight_decay": WD},
        {"params": [p for n, p in named if "gated_cross_attn" not in n], "weight_decay": 0.0},
    ], lr=LR)

    embed = of.lang_encoder.get_input_embeddings().weight

    def step() -> float:
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = peer_loss(of, data, B)
        loss.backward()
        if embed.requires_grad:  # open_flamingo's train_one_epoch: only the added tokens' rows
            zero_mask = torch.zeros_like(embed.grad)
            zero_mask[IMG] = torch.ones_like(zero_mask[IMG])
            zero_mask[EOC] = torch.ones_like(zero_mask[EOC])
            embed.grad = embed.grad * zero_mask
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


# --------------------------------------------------------------------------- memory


def default_frozen_linears_bf16(dtype: str) -> bool:
    """Whether ours stores its frozen LM linears in bfloat16 by default, as ``flamingo-rt
    train`` does from a model folder (``freeze.frozen_linear_dtype = "auto"``, one process)."""
    from flamingo_rt.runtime.train.config import resolve_frozen_linear_dtype

    return resolve_frozen_linear_dtype("auto", dtype) == "bf16"


def _side(side: str, dtype: str, frozen_linears_bf16: bool, token_rows: bool = False) -> tuple:
    """(model, step closure) of one side alone: both models are built (the conversion needs
    the peer), the other side dropped."""
    torch.manual_seed(0)
    sh = shape()
    peer = build_peer(sh, token_rows=token_rows)
    data = make_data(sh)
    autocast = torch.bfloat16 if dtype == "bf16" else None
    if side == "ours":
        model = build_ours(peer, frozen_linears_bf16, token_rows)
        del peer
        return model, ours_stepper(model, data, sh["B"], autocast)
    return peer, peer_stepper(peer, data, sh["B"], autocast)


def measure_memory(side: str, dtype: str, steps: int = 2, frozen_linears_bf16: bool = False,
                   token_rows: bool = False) -> dict:
    """Peak resident memory of one step of ``side`` in this (fresh) process (:mod:`rss`).

    Builds both models (the conversion needs the peer), drops the side not measured, runs
    one warm-up step (it allocates AdamW's state), then ``steps`` more: ``peak_mib`` is the
    process's high-water RSS during those steps, ``base_mib`` the RSS just before them
    (weights, gradients freed, optimizer state), ``step_mib`` their difference: what the step
    itself adds (activations kept for backward, gradients, temporaries); ``grad_mib`` the
    trainable parameters' gradients alone, which both sides hold at the step's end.
    ``frozen_linears_bf16``: ours with its frozen LM linear weights in bfloat16 (see
    :func:`build_ours`).
    """
    import rss

    model, step = _side(side, dtype, frozen_linears_bf16, token_rows)
    trainable = model.parameters()
    grad = sum(p.numel() * p.element_size() for p in trainable if p.requires_grad)
    return dict(side=side, dtype=dtype, threads=torch.get_num_threads(), grad_mib=grad / 2 ** 20,
                **rss.measure(step, steps, before_base=rss.release_ours_kept if side == "ours" else None))


def measure_time(side: str, dtype: str, steps: int, frozen_linears_bf16: bool = False,
                 token_rows: bool = False) -> dict:
    """Step times of ``side`` alone in this (fresh) process, with the C library's default
    malloc: two warm-up steps, then ``steps`` timed ones; ``median_s`` and ``all_s``. The
    benchmark's main rows alternate both sides in one process, where each side's page faults
    depend on what the other keeps mapped; these rows take that interplay out."""
    import statistics
    import time

    _, step = _side(side, dtype, frozen_linears_bf16, token_rows)
    step()
    step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return dict(side=side, dtype=dtype, threads=torch.get_num_threads(), median_s=statistics.median(times),
                all_s=times)



if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", choices=("ours", "peer"), required=True)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), required=True)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--frozen-linears", choices=("auto", "bf16", "none"), default="auto",
                    help="ours only: the frozen LM's linear weights stored in bfloat16 (bf16), in float32 "
                         "(none), or as `flamingo-rt train` does by default (auto: bf16 with --dtype bf16)")
    ap.add_argument("--time", action="store_true",
                    help="time --steps steps (after two warm-up steps) instead of measuring memory; "
                         "run it without MALLOC_MMAP_THRESHOLD_")
    ap.add_argument("--token-rows", action="store_true",
                    help="the vocabulary rows of <image> and <|endofchunk|> train too (each side by its own "
                         "rule: open_flamingo's masked input-embedding gradient, flamingo-rt train's apply_freeze)")
    a = ap.parse_args()
    if a.frozen_linears != "auto" and a.side != "ours":
        ap.error("--frozen-linears applies to --side ours")
    frozen16 = default_frozen_linears_bf16(a.dtype) if a.frozen_linears == "auto" else a.frozen_linears == "bf16"
    if a.steps < 1:
        ap.error(f"--steps: expected at least 1, got {a.steps}")
    import rss

    if a.time:
        rss.emit(measure_time(a.side, a.dtype, a.steps, frozen16, a.token_rows))
    else:
        rss.emit(measure_memory(a.side, a.dtype, a.steps, frozen16, a.token_rows))
