"""Stage 3 of the recipe: freeze the pretrained NFNet and LM, train the Perceiver Resampler
and the gated cross-attention layers (plus the ``<image>`` and ``<|endofchunk|>`` rows of
the LM's embedding and output matrices) on the weighted mixture of the world's interleaved
documents, image-text pairs and video-text pairs.

Each step draws one batch from every dataset and accumulates the weighted losses' gradients
before one AdamW step (the paper accumulates over all datasets every step). Records become
tensors in :func:`flamingo_rt.recipe.batching.collate` only.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..io.tokenizer import FlamingoTokenizer
from ..models.config import FlamingoConfig
from ..models.flamingo import Flamingo
from ..models.lm import DecoderLM
from ..models.nfnet import NFNet
from ..io.tokenizer import EOC_TOKEN, IMAGE_TOKEN
from ..world import CLASSIFY_BY, DOCUMENT_KINDS, few_shot_episode, image_text_pairs, sample_document, video_text_pairs
from .batching import Record, add_features, collate, doc_record, pair_record, to_uint8, video_record
from .presets import ConnectorConfig
from .progress import progress_bar
from .schedule import warmup_cosine


#: std of the resampler's frame / media-time embeddings at the start of stage 3
EMBED_INIT_STD = 0.02


def build_flamingo(config: FlamingoConfig, nfnet: NFNet, lm: DecoderLM) -> Flamingo:
    """A Flamingo with the pretrained ``nfnet`` as its vision encoder and ``lm``'s weights in
    its language model (fresh resampler and cross-attention blocks, gates at 0, so the
    model equals ``lm`` on text). ``config`` must describe both backbones' shapes."""
    if config.lm != lm.cfg:
        raise ValueError(f"expected the LM config of the model, {config.lm}, got the pretrained LM's {lm.cfg}")
    if config.vision.nfnet != nfnet.config:
        raise ValueError(f"expected the NFNet config {config.vision.nfnet}, got {nfnet.config}")
    model = Flamingo(config, vision_encoder=nfnet)
    # The resampler's learned frame (and media-time, spatial) embeddings start as randn (std
    # 1, as in OpenFlamingo, whose CLIP features are of that scale). The small NFNet's pooled
    # features are ~0.07 in size, so std-1 embeddings added to them drown the image: the
    # resampler's output then varies ~0.2% between images and stage 3 never opens the
    # attention gates (FEASIBILITY.md). Start them at the features' scale instead (same
    # random draws, scaled).
    with torch.no_grad():
        for name in ("frame_embs", "media_time_embs", "spatial_embs"):
            emb = getattr(model.resampler, name, None)
            if emb is not None:
                emb.mul_(EMBED_INIT_STD)
    missing, unexpected = model.lm.load_state_dict(lm.state_dict(), strict=False)
    missing = [k for k in missing if not k.startswith("xattn.")]
    if missing or unexpected:
        raise ValueError(f"pretrained LM weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def train_special_rows(model: Flamingo, token_ids: Sequence[int]) -> List[torch.nn.Parameter]:
    """Let the rows ``token_ids`` of the (frozen) LM's input embedding and output head learn,
    as their own (k, D) parameters (:meth:`~flamingo_rt.models.lm.DecoderLM.train_token_rows`,
    ``model.lm.token_rows``): the same gradients and AdamW updates as the whole tables with
    every other row's gradient masked (OpenFlamingo's rule), without a (V, D) gradient, AdamW
    moments or update over the tables. The tables stay frozen; their other rows do not change.
    :meth:`~flamingo_rt.models.lm.DecoderLM.merge_token_rows` writes the rows back (the
    recipe does at the end of :func:`train_connectors`). Returns the (k, D) parameters (to put
    in a no-decay parameter group)."""
    rows = model.lm.train_token_rows(sorted({int(i) for i in token_ids}))
    return list(rows.parameters())


def _doc_pool(cfg: ConnectorConfig, seed: int, image_size: int) -> List[Record]:
    kinds = [k for k in DOCUMENT_KINDS if cfg.doc_kinds.get(k, 0) > 0]
    p = np.array([cfg.doc_kinds[k] for k in kinds], dtype=np.float64)
    p /= p.sum()
    pool = []
    for i in range(cfg.doc_pool):
        g = np.random.default_rng([seed, 3, i])
        kind = kinds[int(g.choice(len(kinds), p=p))]
        d = sample_document(g, "train", image_size, cfg.max_images, kind=kind)
        pool.append(doc_record({"text": d.text, "images": d.images}))
    return pool


def naming_record(rng: np.random.Generator, ways: tuple, max_shots: int, image_size: int) -> Record:
    """A training-split few-shot naming episode as one record, in the layout the evaluation
    prompts with: ``<image>This is a blicket<|endofchunk|>`` for 1..``max_shots`` shuffled
    examples of each of ``ways[0]..ways[1]`` classes, then the query image with its word."""
    n_way = int(rng.integers(ways[0], ways[1] + 1))
    k = int(rng.integers(1, max_shots + 1))
    by = CLASSIFY_BY[int(rng.integers(len(CLASSIFY_BY)))]
    ep = few_shot_episode("classify", k, rng, "train", n_way=n_way, by=by, image_size=image_size)
    texts = [t for t in ep.prompt if isinstance(t, str)]
    texts[-1] = f"{texts[-1]} {ep.answer}{EOC_TOKEN}"
    media = [m for m in ep.prompt if not isinstance(m, str)]
    return {"text": "".join(IMAGE_TOKEN + t for t in texts), "media": [to_uint8(m)[None] for m in media]}


def build_pools(cfg: ConnectorConfig, seed: int, image_size: int, progress: bool = False) -> Dict[str, List[Record]]:
    """The training pools, rendered once (training split): ``{"docs", "pairs", "videos",
    "naming"}`` lists of records, deterministic under ``seed``."""
    pools = {}
    for name, make in progress_bar(
            [("naming", lambda: [naming_record(np.random.default_rng([seed, 13, i]), cfg.naming_ways,
                                               cfg.naming_shots, image_size) for i in range(cfg.naming_pool)]),
             ("docs", lambda: _doc_pool(cfg, seed, image_size)),
             ("pairs", lambda: [pair_record(r) for r in image_text_pairs(seed + 11, "train", image_size,
                                                                          n=cfg.pair_pool)]),
             ("videos", lambda: [video_record(r) for r in video_text_pairs(seed + 12, "train", image_size,
                                                                            cfg.num_frames, n=cfg.video_pool)])],
            "stage 3/3 rendering data", progress):
        pools[name] = make()
    return pools


@dataclass
class ConnectorStats:
    """Per-step weighted total loss and per-dataset losses, final gate values, timing."""

    losses: List[float] = field(default_factory=list)
    dataset_losses: Dict[str, List[float]] = field(default_factory=dict)
    gates: Dict[int, tuple] = field(default_factory=dict)
    trainable_parameters: int = 0
    seconds: float = 0.0
    data_seconds: float = 0.0


def train_connectors(model: Flamingo, tokenizer: FlamingoTokenizer, cfg: ConnectorConfig, seed: int = 0,
                     image_size: int = 64, progress: bool = True,
                     pools: Optional[Dict[str, List[Record]]] = None) -> ConnectorStats:
    """Freeze ``model``'s backbones and train its connectors in place.

    Args:
        model: a Flamingo built by :func:`build_flamingo` (pretrained backbones).
        tokenizer: the LM's tokenizer.
        cfg: stage-3 settings (steps, lr, batch sizes and weights of the three datasets,
            pool sizes, document-kind mixture).
        seed: seeds the data pools, the batch draws and the connectors' initialisation.
        image_size: side the world renders images at (resized to the encoder's size).
        pools: pools from :func:`build_pools` to reuse (e.g. across ablation runs); built
            from ``cfg``, ``seed`` and ``image_size`` when None.
    Returns:
        :class:`ConnectorStats`. The model is left in eval mode.
    """
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model.freeze_backbones(lm=cfg.freeze_lm)
    xattn_ids = {id(p) for p in model.lm.xattn.parameters()}
    lm_params = [p for p in model.lm.parameters() if id(p) not in xattn_ids] if not cfg.freeze_lm else []
    lm_ids = {id(p) for p in lm_params}
    special = train_special_rows(model, [tokenizer.image_token_id, tokenizer.eoc_token_id]) if cfg.freeze_lm else []
    special_ids = {id(p) for p in special}
    conn = [p for _, p in model.trainable_parameters() if id(p) not in special_ids and id(p) not in lm_ids]
    decay = [p for p in conn if p.dim() >= 2]
    other = [p for p in conn if p.dim() < 2]
    stats = ConnectorStats(trainable_parameters=sum(p.numel() for p in conn + special + lm_params))
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": other + special, "weight_decay": 0.0}]
    if lm_params:
        groups.append({"params": lm_params, "weight_decay": 0.0, "lr": cfg.lm_lr})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))
    sched = warmup_cosine(opt, cfg.warmup, cfg.steps)

    if pools is None:
        pools = build_pools(cfg, seed, image_size, progress)
    plan = [("docs", cfg.doc_batch, cfg.doc_weight), ("pairs", cfg.pair_batch, cfg.pair_weight),
            ("videos", cfg.video_batch, cfg.video_weight), ("naming", cfg.naming_batch, cfg.naming_weight)]
    plan = [(n, b, w) for n, b, w in plan if b > 0 and w > 0 and pools.get(n)]
    if cfg.cache_features:
        for name, _, _ in plan:
            if not all("feats" in r for r in pools[name]):
                add_features(pools[name], model.vision_encoder, model.config.vision)
    stats.data_seconds = time.perf_counter() - t0
    stats.dataset_losses = {n: [] for n, _, _ in plan}
    g = torch.Generator().manual_seed(seed)
    vision = model.config.vision
    model.train()
    bar = progress_bar(range(cfg.steps), "stage 3/3 connectors", progress)
    for _ in bar:
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for name, bs, w in plan:
            pool = pools[name]
            idx = torch.randint(0, len(pool), (bs,), generator=g).tolist()
            batch = collate([pool[i] for i in idx], tokenizer, vision, cfg.max_seq_len, features=cfg.cache_features)
            if cfg.cache_features:
                out = model(batch.input_ids, media_tokens=model.resampler(batch.media),
                            attention_mask=batch.attention_mask, labels=batch.labels, num_media=batch.num_media)
            else:
                out = model(batch.input_ids, batch.media, attention_mask=batch.attention_mask,
                            labels=batch.labels, num_media=batch.num_media)
            (w * out.loss).backward()
            stats.dataset_losses[name].append(out.loss.item())
            total += w * stats.dataset_losses[name][-1]
        torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], 1.0)
        opt.step()
        sched.step()
        stats.losses.append(total)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{total:.3f}", **{n[:3]: f"{v[-1]:.2f}" for n, v in stats.dataset_losses.items()})
    model.lm.merge_token_rows()  # the trained rows into the tables: a plain LM again
    model.eval()
    with torch.no_grad():
        stats.gates = model.gate_values()
    stats.seconds = time.perf_counter() - t0
    return stats
