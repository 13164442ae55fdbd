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
from ..world import COLOUR_NAMES, SHAPES, image_text_pairs
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
        self.per_token = cfg.per_token
        self.kind_proj = nn.ModuleDict({k: nn.Linear(nfnet.num_features, cfg.embed_dim, bias=False)
                                        for k in dict.fromkeys(cfg.single_kinds)} if cfg.kind_heads else {})

    def forward(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, head: Optional[str] = None):
        feats = self.nfnet(images)  # (B, S, Dv)
        img = feats if self.per_token else feats.mean(1)
        proj = self.kind_proj[head] if head in self.kind_proj else self.image_proj
        return (F.normalize(proj(img), dim=-1),
                F.normalize(self.text_proj(self.text(ids, mask)), dim=-1))

    def loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor, same: Optional[torch.Tensor]) -> torch.Tensor:
        """:func:`info_nce` of the batch; (B, S, E) image embeddings (``per_token``): the mean
        of each token's loss."""
        if image_emb.dim() == 2:
            return info_nce(image_emb, text_emb, self.logit_scale, same)
        return torch.stack([info_nce(image_emb[:, s], text_emb, self.logit_scale, same)
                            for s in range(image_emb.shape[1])]).mean()


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
    if i.dim() == 3:  # per-token embeddings: their normalised mean
        i = F.normalize(i.mean(1), dim=-1)
    return float(((i @ t.t()).argmax(1) == torch.arange(len(i))).float().mean())


class _Cycler:
    """Batches of indices into a pool of ``n``: a fresh permutation (from ``g``) each epoch."""

    def __init__(self, n: int, batch_size: int, g: torch.Generator):
        self.n, self.bs, self.g = n, batch_size, g
        self.order, self.pos = torch.randperm(n, generator=g), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.bs > self.n:
            self.order, self.pos = torch.randperm(self.n, generator=self.g), 0
        b = self.order[self.pos:self.pos + self.bs]
        self.pos += self.bs
        return b


def _hard_batch(combo: torch.Tensor, k: int, batch_size: int, g: torch.Generator) -> Optional[torch.Tensor]:
    """``batch_size`` indices of images whose (shape, colour) ``combo`` row lies in k random
    shapes x k random colours (fewer when the product holds fewer images); None when it holds
    fewer than two."""
    shapes = torch.randperm(len(SHAPES), generator=g)[:k]
    colours = torch.randperm(len(COLOUR_NAMES), generator=g)[:k]
    ok = torch.isin(combo[:, 0], shapes) & torch.isin(combo[:, 1], colours)
    cand = ok.nonzero().squeeze(1)
    if len(cand) < 2:
        return None
    return cand[torch.randperm(len(cand), generator=g)[:batch_size]]


def pretrain_vision(model_config: FlamingoConfig, tokenizer: FlamingoTokenizer, cfg: ContrastiveConfig,
                    seed: int, image_size: int, progress: bool = True, nfnet: Optional[NFNet] = None):
    """Train an NFNet (``model_config.vision.nfnet``) contrastively on ``cfg.pool_size``
    training image-caption pairs of the world (rendered at ``image_size``, normalised like
    the runtime normalises prompts) for ``cfg.steps`` steps of ``cfg.batch_size``.

    With ``cfg.single_frac`` > 0, that share of the pool is single-object images
    (:func:`~flamingo_rt.world.data.attribute_pairs`) and that share of the steps trains on
    batches of them, each batch captioned by one kind of ``cfg.single_kinds`` in turn
    ("a star." / "a red shape." / "a red star."): equal captions are positives of each other
    (``same``), so shape and colour must each separate the images.

    Returns ``(nfnet, ContrastiveStats)``; the NFNet is in train mode, not frozen."""
    import time

    from ..world.data import attribute_pairs

    t0 = time.perf_counter()
    if not 0.0 <= cfg.single_frac <= 1.0:
        raise ValueError(f"expected single_frac in [0, 1], got {cfg.single_frac}")
    torch.manual_seed(seed)
    if nfnet is None:
        nfnet = NFNet(model_config.vision.nfnet)
    model = ContrastiveModel(nfnet, tokenizer.vocab_size, cfg)
    vis = model_config.vision
    n_attr = int(round(cfg.single_frac * cfg.pool_size))
    n_pairs = cfg.pool_size - n_attr
    if n_attr and (n_attr < cfg.batch_size or not cfg.single_kinds):
        raise ValueError(f"single_frac={cfg.single_frac} gives {n_attr} attribute images, fewer than a batch "
                         f"({cfg.batch_size}), or single_kinds is empty")
    if cfg.single_frac < 1.0 and n_pairs < cfg.batch_size:
        raise ValueError(f"single_frac={cfg.single_frac} leaves {n_pairs} captioned pairs, fewer than a batch")
    pool = list(image_text_pairs(seed, "train", image_size, n=n_pairs + cfg.batch_size))
    images = normalize_pixels(torch.stack([p["image"] for p in pool]), vis)
    ids, mask = _tokenize(tokenizer, [p["text"] for p in pool], cfg.text_max_len)
    if n_attr:
        attr = list(attribute_pairs(seed, "train", image_size, n=n_attr))
        a_images = normalize_pixels(torch.stack([p["image"] for p in attr]), vis)
        a_text = {k: _tokenize(tokenizer, [p["captions"][k] for p in attr], cfg.text_max_len)
                  for k in cfg.single_kinds}
        combo = torch.tensor([[SHAPES.index(p["scene"].subject.shape), COLOUR_NAMES.index(p["scene"].subject.colour)]
                              for p in attr])
    # the last batch is held back to measure retrieval
    hb = slice(n_pairs, n_pairs + cfg.batch_size)
    stats = ContrastiveStats()
    stats.retrieval_before = _retrieval(model, images[hb], ids[hb], mask[hb])
    vlr = cfg.lr if cfg.vision_lr is None else cfg.vision_lr
    slr = vlr if cfg.skipinit_lr is None else cfg.skipinit_lr
    groups = []
    for vision, lr in ((False, cfg.lr), (True, vlr)):
        named = [(n, p) for n, p in model.named_parameters() if n.startswith("nfnet.") == vision
                 and not (vision and n.endswith("skipinit_gain"))]
        groups += [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr": lr},
                   {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0, "lr": lr}]
    groups.append({"params": [p for n, p in model.named_parameters() if n.startswith("nfnet.")
                              and n.endswith("skipinit_gain")], "weight_decay": 0.0, "lr": slr})
    opt = torch.optim.AdamW([gr for gr in groups if gr["params"]], lr=cfg.lr)
    sched = warmup_cosine(opt, cfg.warmup, cfg.steps)
    g = torch.Generator().manual_seed(seed)
    pairs = _Cycler(n_pairs, cfg.batch_size, g) if n_pairs >= cfg.batch_size else None
    attrs = _Cycler(n_attr, cfg.batch_size, torch.Generator().manual_seed(seed + 1)) if n_attr else None
    n_attr_steps = 0
    model.train()
    bar = progress_bar(range(cfg.steps), "stage 1/3 contrastive NFNet", progress)
    for step in bar:
        # attribute steps spread evenly: step s is one when floor((s+1) f) > floor(s f)
        lead = step < cfg.lead_steps
        s = step - cfg.lead_steps
        if attrs is not None and (lead or math.floor((s + 1) * cfg.single_frac) > math.floor(s * cfg.single_frac)):
            b = _hard_batch(combo, cfg.hard_k, cfg.batch_size, attrs.g) if cfg.hard_k else None
            if b is None:
                b = attrs.next()
            if lead:
                kind = cfg.single_kinds[0]
            else:
                kind = cfg.single_kinds[n_attr_steps % len(cfg.single_kinds)]
                n_attr_steps += 1
            a_ids, a_mask = a_text[kind]
            T = int(a_mask[b].sum(1).max())
            bi, bm, bx, head = a_ids[b, :T], a_mask[b, :T], a_images[b], kind
        else:
            head = None
            b = pairs.next()
            T = int(mask[b].sum(1).max())
            bi, bm, bx = ids[b, :T], mask[b, :T], images[b]
        ie, te = model(bx, bi, bm, head)
        same = (bi[:, None, :] == bi[None, :, :]).all(-1)
        loss = model.loss(ie, te, same)
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
