"""Stage 1 of the recipe: contrastive pretraining of the NFNet on image-caption pairs.

As in the paper (which pretrains its NFNet with a BERT text encoder and a CLIP-style loss),
the NFNet's mean-pooled final features and a small text encoder of our own are projected
into a joint space and trained with the symmetric InfoNCE loss and a learned temperature.
Only the NFNet is kept; the text encoder and the projections are discarded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..io.tokenizer import FlamingoTokenizer
from ..models.config import FlamingoConfig
from ..models.nfnet import NFNet
from ..world import image_text_pairs
from .batching import normalize_pixels
from .presets import ContrastiveConfig
from .progress import progress_bar
from .schedule import warmup_cosine


class TextEncoder(nn.Module):
    """A small pre-norm Transformer encoder over token ids, masked-mean pooled.

    ``forward(ids, mask)``: ids (B, T) int64, mask (B, T) bool (True on real tokens)
    -> (B, dim) float32 pooled features.
    """

    def __init__(self, vocab_size: int, dim: int, layers: int, heads: int, max_len: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.max_len = max_len

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape[1] > self.max_len:
            raise ValueError(f"expected ids of shape (B, T <= {self.max_len}), got {tuple(ids.shape)}")
        h = self.embed(ids) + self.pos[: ids.shape[1]]
        h = self.norm(self.encoder(h, src_key_padding_mask=~mask))
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


class ContrastiveModel(nn.Module):
    """NFNet + text encoder with projections into a joint ``embed_dim`` space.

    ``forward(images, ids, mask)``: images (B, 3, S, S) normalised float32, ids/mask as
    :class:`TextEncoder` -> (image_emb (B, E), text_emb (B, E)), both L2-normalised.
    """

    def __init__(self, nfnet: NFNet, vocab_size: int, cfg: ContrastiveConfig):
        super().__init__()
        self.nfnet = nfnet
        self.text = TextEncoder(vocab_size, cfg.text_dim, cfg.text_layers, cfg.text_heads, cfg.text_max_len)
        self.image_proj = nn.Linear(nfnet.num_features, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

    def forward(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
        img = self.nfnet(images).mean(1)  # (B, S, Dv) -> (B, Dv)
        return (F.normalize(self.image_proj(img), dim=-1),
                F.normalize(self.text_proj(self.text(ids, mask)), dim=-1))


def info_nce(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
             same: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Symmetric InfoNCE: (B, E) and (B, E) L2-normalised embeddings, pair i matching i.

    ``same`` (B, B) bool, optional: True where captions i and j are literally equal (the
    world repeats short captions); such pairs share the target probability instead of
    being pushed apart. Returns a scalar float32 loss."""
    logits = logit_scale.clamp(max=math.log(100.0)).exp() * image_emb @ text_emb.t()
    if same is None:
        target = torch.eye(len(logits), dtype=logits.dtype)
    else:
        if same.shape != logits.shape:
            raise ValueError(f"expected same of shape {tuple(logits.shape)}, got {tuple(same.shape)}")
        target = same.to(logits.dtype)
    target = target / target.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


@dataclass
class ContrastiveStats:
    """Per-step losses and the retrieval accuracy (image -> its caption among the batch)
    on a held-back batch before and after training."""

    losses: List[float] = field(default_factory=list)
    retrieval_before: float = 0.0
    retrieval_after: float = 0.0
    seconds: float = 0.0


def _tokenize(tokenizer: FlamingoTokenizer, texts: List[str], max_len: int):
    enc = tokenizer(texts, padding_side="right", max_length=max_len)
    return enc["input_ids"], enc["attention_mask"].bool()


@torch.no_grad()
def _retrieval(model: ContrastiveModel, images, ids, mask) -> float:
    was = model.training
    model.eval()
    i, t = model(images, ids, mask)
    model.train(was)
    return float(((i @ t.t()).argmax(1) == torch.arange(len(i))).float().mean())


def pretrain_vision(model_config: FlamingoConfig, tokenizer: FlamingoTokenizer, cfg: ContrastiveConfig,
                    seed: int, image_size: int, progress: bool = True, nfnet: Optional[NFNet] = None):
    """Train an NFNet (``model_config.vision.nfnet``) contrastively on ``cfg.pool_size``
    training image-caption pairs of the world (rendered at ``image_size``, normalised like
    the runtime normalises prompts) for ``cfg.steps`` steps of ``cfg.batch_size``.

    Returns ``(nfnet, ContrastiveStats)``; the NFNet is in train mode, not frozen."""
    import time

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    if nfnet is None:
        nfnet = NFNet(model_config.vision.nfnet)
    model = ContrastiveModel(nfnet, tokenizer.vocab_size, cfg)
    vis = model_config.vision
    pool = list(image_text_pairs(seed, "train", image_size, n=cfg.pool_size + cfg.batch_size))
    images = normalize_pixels(torch.stack([p["image"] for p in pool]), vis)
    ids, mask = _tokenize(tokenizer, [p["text"] for p in pool], cfg.text_max_len)
    # the last batch is held back to measure retrieval
    hb = slice(cfg.pool_size, cfg.pool_size + cfg.batch_size)
    stats = ContrastiveStats()
    stats.retrieval_before = _retrieval(model, images[hb], ids[hb], mask[hb])
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr)
    sched = warmup_cosine(opt, cfg.warmup, cfg.steps)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(cfg.pool_size, generator=g)
    pos = 0
    model.train()
    bar = progress_bar(range(cfg.steps), "stage 1/3 contrastive NFNet", progress)
    for step in bar:
        if pos + cfg.batch_size > cfg.pool_size:
            order, pos = torch.randperm(cfg.pool_size, generator=g), 0
        b = order[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        T = int(mask[b].sum(1).max())
        ie, te = model(images[b], ids[b, :T], mask[b, :T])
        bi = ids[b, :T]
        same = (bi[:, None, :] == bi[None, :, :]).all(-1)
        loss = info_nce(ie, te, model.logit_scale, same)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        stats.losses.append(loss.item())
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{stats.losses[-1]:.3f}")
    stats.retrieval_after = _retrieval(model, images[hb], ids[hb], mask[hb])
    stats.seconds = time.perf_counter() - t0
    return nfnet, stats
