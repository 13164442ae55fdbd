"""Stage 2 of the recipe: a BPE tokenizer on the world's text and next-token pretraining of
the decoder LM (:class:`flamingo_rt.models.lm.DecoderLM`) on it.

The corpus is :func:`flamingo_rt.world.world_corpus` (training split): captions, scene
descriptions with questions and answers, naming paragraphs that bind nonsense words to
described objects in context, documents without their images, video captions, and a
quarter of the texts in few-shot layout with ``<|endofchunk|>``. Texts are joined with
``<|endoftext|>`` and cut into windows of ``seq_len`` tokens.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..io.tokenizer import FlamingoTokenizer
from ..models.config import LMConfig
from ..models.lm import DecoderLM
from ..world import world_corpus
from .binding import binding_accuracy, binding_rows
from .presets import LMPretrainConfig
from .progress import progress_bar
from .schedule import warmup_cosine


def train_tokenizer(cfg: LMPretrainConfig, seed: int) -> FlamingoTokenizer:
    """A byte-level BPE tokenizer of ``cfg.vocab_size`` ids trained on
    ``world_corpus(cfg.tokenizer_corpus, seed)`` (special tokens at ids 0..3)."""
    return FlamingoTokenizer.train_bpe(world_corpus(cfg.tokenizer_corpus, seed=seed), vocab_size=cfg.vocab_size)


def naming_texts(n: int, seed: int, split: str = "train") -> List[str]:
    """``n`` naming paragraphs: 2..5 nonsense words bound (freshly per paragraph) to shapes,
    colours or shape-colour pairs, then 1..3 described examples of each class in random
    order, e.g. ``"a small red star: This is a blicket. a large red circle: This is a dax.
    ..."``. The text analogue of the few-shot naming task; more of them than
    :func:`flamingo_rt.world.text_corpus` holds (a fifth) teaches the LM to copy the word
    bound to a matching description from its context."""
    from ..world import CLASSIFY_BY, CLASSIFY_FORMATS, nonsense_words
    from ..world.attributes import article
    from ..world.episodes import _classify_class_values, _classify_scene
    from ..world.text import _pick

    out = []
    for i in range(n):
        g = np.random.default_rng([seed, 5, i])
        by = CLASSIFY_BY[int(g.integers(len(CLASSIFY_BY)))]
        nc = int(g.integers(2, 6))
        values = _classify_class_values(g, by, nc, split)
        words = nonsense_words(g, nc, split)
        fmt = _pick(g, "", split, CLASSIFY_FORMATS).text
        order = [c for c in range(nc) for _ in range(int(g.integers(1, 4)))]
        order = [order[j] for j in g.permutation(len(order))]
        parts = []
        for c in order:
            o = _classify_scene(g, by, values[c], split).subject
            parts.append(f"{article(o.size_name)} {o.size_name} {o.colour} {o.shape}: {fmt} {words[c]}.")
        out.append(" ".join(parts))
    return out


def copy_texts(n: int, seed: int, split: str = "train") -> List[str]:
    """``n`` repetition paragraphs: a list of 3..8 nonsense words said again (2 or 3 times in
    all), e.g. ``"sloka spufum sliro. again: sloka spufum sliro."``. Exact repeats of
    unpredictable tokens are what makes a small LM form induction (copying) heads quickly;
    the naming task needs them, and the world's own text alone grows them too slowly."""
    from ..world import nonsense_words

    out = []
    for i in range(n):
        g = np.random.default_rng([seed, 7, i])
        words = " ".join(nonsense_words(g, int(g.integers(3, 9)), split))
        out.append(" again: ".join([words] * int(g.integers(2, 4))) + ".")
    return out


def repeated_tokens(rows: int, length: int, vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    """(rows, length) int64 rows of random segments (3..12 random token ids >= 4, no special
    token), about half of them repeats of an earlier segment of the same row, at varying
    distances. Only copying predicts a repeat, and since the distance varies it must be
    copying by content (an induction head), not by a fixed offset. A small share of such
    rows grows induction heads within a few hundred steps; the world's text alone (whose
    repeats are partly predictable) takes far longer."""
    out = torch.empty((rows, length), dtype=torch.long)
    for r in range(rows):
        segs: List[torch.Tensor] = []
        row: List[torch.Tensor] = []
        n = 0
        while n < length:
            if segs and float(torch.rand((), generator=generator)) < 0.5:
                seg = segs[int(torch.randint(len(segs), (), generator=generator))]
            else:
                seg = torch.randint(4, vocab_size, (int(torch.randint(3, 13, (), generator=generator)),),
                                    generator=generator)
                segs.append(seg)
            row.append(seg)
            n += len(seg)
        out[r] = torch.cat(row)[:length]
    return out


def pack_corpus(tokenizer: FlamingoTokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Texts -> one int64 stream ``t_1 <|endoftext|> t_2 <|endoftext|> ...`` of shape (N,)."""
    ids: List[int] = []
    eos = tokenizer.eos_token_id
    for enc in tokenizer.encode_batch(list(texts)):
        ids += enc
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class LMStats:
    """Per-step training losses and the loss on held-out text (first and last windows of
    a stream the LM never trains on) before and after training."""

    losses: List[float] = field(default_factory=list)
    heldout_before: float = 0.0
    heldout_after: float = 0.0
    tokens_seen: int = 0
    seconds: float = 0.0
    #: the signature-binding phase (``cfg.bind_rows > 0``): the offsets' scale (the token
    #: embeddings' RMS when the phase starts), its per-step losses, and the held-out
    #: signature-naming accuracy after training (``{"5way_k1": ..., "5way_k2": ..., "2way_k1": ...}``)
    bind_scale: float = 0.0
    bind_losses: List[float] = field(default_factory=list)
    binding_accuracy: dict = field(default_factory=dict)


@torch.no_grad()
def _eval_loss(lm: DecoderLM, windows: torch.Tensor) -> float:
    was = lm.training
    lm.eval()
    logits = lm(windows)
    lm.train(was)
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), windows[:, 1:].reshape(-1)))


def pretrain_lm(lm_config: LMConfig, tokenizer: FlamingoTokenizer, cfg: LMPretrainConfig, seed: int,
                progress: bool = True, texts: Optional[Sequence[str]] = None) -> Tuple[DecoderLM, LMStats]:
    """Train a :class:`DecoderLM` of ``lm_config`` (its ``vocab_size`` must equal the
    tokenizer's) for ``cfg.steps`` steps of ``cfg.batch_size`` random windows of
    ``cfg.seq_len + 1`` tokens, AdamW with warmup and cosine decay.

    ``texts`` defaults to ``world_corpus(cfg.corpus, seed + 1)`` plus ``cfg.naming``
    :func:`naming_texts` and ``cfg.copy`` :func:`copy_texts`, shuffled; a share
    ``cfg.repeat_frac`` of each batch's rows are :func:`repeated_tokens` instead.
    Returns ``(lm, LMStats)``."""
    if lm_config.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"expected LM vocab_size {tokenizer.vocab_size} (the tokenizer's), "
                         f"got {lm_config.vocab_size}")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    lm = DecoderLM(lm_config)
    with torch.no_grad():  # GPT-style small init: std 0.02 for every matrix
        for p in lm.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    if texts is None:
        texts = (world_corpus(cfg.corpus, seed=seed + 1) + naming_texts(cfg.naming, seed + 1)
                 + copy_texts(cfg.copy, seed + 1))
        texts = [texts[i] for i in np.random.default_rng([seed, 6]).permutation(len(texts))]
    stream = pack_corpus(tokenizer, texts)
    L = cfg.seq_len + 1
    if len(stream) < 2 * L:
        raise ValueError(f"expected a corpus of at least {2 * L} tokens, got {len(stream)}")
    heldout_text = world_corpus(max(16, cfg.batch_size), seed=seed + 2)
    hs = pack_corpus(tokenizer, heldout_text)
    nh = min(8, len(hs) // L)
    held = hs[: nh * L].view(nh, L)
    stats = LMStats()
    stats.heldout_before = _eval_loss(lm, held)
    def optimizer(steps: int):
        decay = [p for p in lm.parameters() if p.dim() >= 2]
        other = [p for p in lm.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
        return opt, warmup_cosine(opt, cfg.warmup, steps)

    # With binding rows the curriculum's two phases get their own optimizer and schedule:
    # the pure-repeat phase ends with a low learning rate, the binding phase starts afresh.
    phased = cfg.bind_rows > 0 and 0 < cfg.pure_repeat_steps < cfg.steps
    opt, sched = optimizer(cfg.pure_repeat_steps if phased else cfg.steps)
    g = torch.Generator().manual_seed(seed)
    bind_rng = np.random.default_rng([seed, 8])
    offsets = torch.arange(L)
    n_rep = int(round(cfg.repeat_frac * cfg.batch_size))
    lm.train()
    bar = progress_bar(range(cfg.steps), "stage 2/3 LM pretraining", progress)
    for step in bar:
        if phased and step == cfg.pure_repeat_steps:
            opt, sched = optimizer(cfg.steps - cfg.pure_repeat_steps)
        if step < cfg.pure_repeat_steps:
            win = repeated_tokens(cfg.batch_size, L, tokenizer.vocab_size, g)
        else:
            starts = torch.randint(0, len(stream) - L, (cfg.batch_size,), generator=g)
            win = stream[starts[:, None] + offsets]  # (B, L)
            if n_rep:
                win[:n_rep] = repeated_tokens(n_rep, L, tokenizer.vocab_size, g)
        logits = lm(win[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), win[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        stats.losses.append(loss.item())  # the text windows' loss (binding rows: bind_losses)
        if cfg.bind_rows and step >= cfg.pure_repeat_steps:
            if not stats.bind_scale:
                stats.bind_scale = float(lm.embed_tokens.weight.detach().float().pow(2).mean().sqrt())
            ramp = min(1.0, (step - cfg.pure_repeat_steps) / max(1.0, 0.7 * (cfg.steps - cfg.pure_repeat_steps)))
            bx, boff, by = binding_rows(tokenizer, cfg.bind_rows, cfg.bind_len, lm_config.dim, bind_rng,
                                        max_ways=cfg.bind_max_ways, max_shots=cfg.bind_max_shots,
                                        scale=stats.bind_scale, noise=cfg.bind_noise,
                                        amplitude=(cfg.bind_min_amplitude ** ramp, cfg.bind_max_amplitude ** ramp),
                                        common=cfg.bind_common * ramp, random_formats=cfg.bind_random_formats)
            blogits = lm(bx, embed_offsets=boff)
            bloss = F.cross_entropy(blogits.reshape(-1, blogits.shape[-1]).float(), by.reshape(-1), ignore_index=-100)
            stats.bind_losses.append(bloss.item())
            loss = loss + bloss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        sched.step()
        stats.tokens_seen += win.numel()
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{stats.losses[-1]:.3f}")
    stats.heldout_after = _eval_loss(lm, held)
    if cfg.bind_rows and stats.bind_scale:
        cases = {"5way_k1": (5, 1, 1.0, 0.0), "5way_k2": (5, 2, 1.0, 0.0), "2way_k1": (2, 1, 1.0, 0.0)}
        for a, c in ((cfg.bind_min_amplitude, 0.0), (cfg.bind_max_amplitude, cfg.bind_common)):
            if (a, c) != (1.0, 0.0):  # the curriculum's end points, when it has one
                cases[f"5way_k1_amp{a}_common{c}"] = (5, 1, a, c)
        stats.binding_accuracy = {
            key: binding_accuracy(lm, tokenizer, n, k, 100, seed + 9, scale=stats.bind_scale, noise=cfg.bind_noise,
                                  amplitude=a, common=c)
            for key, (n, k, a, c) in cases.items()}
    stats.seconds = time.perf_counter() - t0
    return lm, stats
