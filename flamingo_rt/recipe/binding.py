"""Signature-binding rows: the text-side analogue of few-shot naming, for stage 2.

In a few-shot naming prompt ``<image>This is a blicket.<|endofchunk|> ... <image>This is a``
the only thing that tells the chunks' images apart is what the gated cross-attention adds to
the residual stream of the chunk's tokens. So the LM can bind a word to an image only if it
can bind a word to *a vector added to its input over a chunk*, and look that vector up again
when the query chunk carries a similar one. Text alone never asks for that, and an LM
pretrained on text alone does not do it (FEASIBILITY.md: every frozen-LM stage 3 was at
chance). These rows ask for it: each class of a naming episode gets a random vector (its
"signature"), added to the input embeddings of every token of each of its chunks (plus
per-chunk noise, as two images of one class differ); the words are fresh nonsense words, so
the only way to predict a word the second time is to find the earlier chunk with the same
signature. Stage 3 then only has to make the cross-attention write class-consistent vectors.

``binding_rows`` builds a batch; ``binding_accuracy`` measures the skill (the few-shot
naming evaluation with signatures in place of images).
"""
from __future__ import annotations

import functools
import re
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..io.tokenizer import EOC_TOKEN, FlamingoTokenizer
from ..models.lm import DecoderLM

__all__ = ["naming_chunks", "binding_rows", "binding_accuracy", "random_format"]


@functools.lru_cache(maxsize=1)
def _train_words() -> Tuple[str, ...]:
    """The words of the world's training-split phrasings and answers (never a word that only
    a held-out phrasing has)."""
    from ..world.text import ANSWER_SETS, CAPTION_PREFIXES, CLASSIFY_FORMATS, TEMPLATES

    words = set()
    for t in [t for fam in TEMPLATES.values() for t in fam] + CLASSIFY_FORMATS + CAPTION_PREFIXES:
        if t.split == "train":
            words.update(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", t.text.lower())))
    for vals in ANSWER_SETS.values():
        for v in vals:
            words.update(v.split())
    return tuple(sorted(words))


def random_format(rng: np.random.Generator) -> str:
    """A naming phrasing that is none of the world's: 1 to 3 random words of the training
    texts (first one capitalised), then "a" ("Shape left two a"). Binding rows that use such
    phrasings teach the LM that the bound word does not depend on the words before it, so
    that it binds under phrasings it never saw (the evaluation's held-out ones). A draw that
    contains a held-out phrasing's marker is drawn again."""
    from ..world.text import heldout_markers

    words, markers = _train_words(), [m.lower() for m in heldout_markers()]
    while True:
        n = int(rng.integers(1, 4))
        text = " ".join(words[int(i)] for i in rng.integers(len(words), size=n)) + " a"
        if not any(m in text for m in markers):
            return text[0].upper() + text[1:]


def naming_chunks(tokenizer: FlamingoTokenizer, rng: np.random.Generator, n_way: int, shots: int,
                  split: str = "train", fmt: Optional[str] = None) -> Tuple[List[int], List[int], int, List[str]]:
    """One naming episode as token ids, in the layout the evaluation prompts with:
    ``shots`` shuffled ``<image>{fmt} {word}<|endofchunk|>`` chunks of each of ``n_way``
    classes, then the query chunk ``<image>{fmt}``; ``fmt`` one of the training phrasings
    (drawn from ``rng``) unless given.

    Returns ``(ids, classes, query_class, words)``: ``classes[t]`` is the class of the chunk
    token ``t`` belongs to (the query's for the query chunk)."""
    from ..world import CLASSIFY_FORMATS, nonsense_words
    from ..world.text import _pick

    words = nonsense_words(rng, n_way, split)
    if fmt is None:
        fmt = _pick(rng, "", "train", CLASSIFY_FORMATS).text
    order = [c for c in range(n_way) for _ in range(shots)]
    order = [order[i] for i in rng.permutation(len(order))]
    img = tokenizer.image_token_id
    ids: List[int] = []
    classes: List[int] = []
    for c in order:
        t = [img] + tokenizer.encode(f"{fmt} {words[c]}{EOC_TOKEN}")
        ids += t
        classes += [c] * len(t)
    q = int(rng.integers(n_way))
    t = [img] + tokenizer.encode(fmt)
    return ids + t, classes + [q] * len(t), q, words


def _signatures(rng: np.random.Generator, ids: Sequence[int], classes: Sequence[int], image_token_id: int,
                dim: int, scale: float, noise: float, amplitude: float = 1.0, common: float = 0.0) -> torch.Tensor:
    """(len(ids), dim) float32 offsets ``scale * (common * a + amplitude * (s_c + e_j))``:
    a shared vector ``a`` (one per episode), class signatures ``s_c`` and per-chunk noise
    ``e_j ~ N(0, noise^2)``, all standard normal before scaling."""
    n_cls = max(classes) + 1
    sig = rng.standard_normal((n_cls, dim)).astype(np.float32)
    chunk = np.cumsum(np.asarray(ids) == image_token_id)  # 1.. per chunk
    eps = rng.standard_normal((int(chunk.max()) + 1, dim)).astype(np.float32) * noise
    shared = rng.standard_normal(dim).astype(np.float32) * common
    return torch.from_numpy((shared + amplitude * (sig[np.asarray(classes)] + eps[chunk])) * scale)


def binding_rows(tokenizer: FlamingoTokenizer, rows: int, length: int, dim: int, rng: np.random.Generator, *,
                 max_ways: int = 5, max_shots: int = 4, scale: float = 0.04, noise: float = 0.3,
                 amplitude: Tuple[float, float] = (1.0, 1.0), common: float = 0.0,
                 split: str = "train", random_formats: float = 0.0
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of signature-binding rows for next-token training.

    Each row is one naming episode (2..``max_ways`` classes, 1..``max_shots`` examples of
    each, fresh nonsense words of ``split``) followed by the query's word and
    ``<|endofchunk|>``, cut to ``length + 1`` tokens. Class ``c`` of the row gets a signature
    ``s_c ~ N(0, I)``, chunk ``j`` noise ``e_j ~ N(0, noise^2 I)``, and every token of the
    chunk the offset ``scale * (c * a + r * (s_c + e_j))`` (``scale``: the LM's embedding RMS
    is right), with a vector ``a ~ N(0, I)`` shared by the whole row, ``c ~ U(0, common)`` and
    the class amplitude ``r`` log-uniform in ``amplitude``. What cross-attention writes over a
    chunk is mostly the same for every image (the shared part) with a small image-specific
    part, so the LM must bind on small differences on top of a large common offset. A share
    ``random_formats`` of the rows use a :func:`random_format` phrasing instead of a
    training one (drawn from ``rng`` only when the share is > 0).

    Returns ``(input_ids (rows, length) int64, offsets (rows, length, dim) float32,
    labels (rows, length) int64 with -100 past each row's end)``; padding inputs are
    ``tokenizer.eos_token_id`` with zero offsets."""
    if max_ways < 2 or max_shots < 1:
        raise ValueError(f"expected max_ways >= 2 and max_shots >= 1, got {max_ways} and {max_shots}")
    x = torch.full((rows, length), tokenizer.eos_token_id, dtype=torch.long)
    off = torch.zeros(rows, length, dim)
    y = torch.full((rows, length), -100, dtype=torch.long)
    for r in range(rows):
        fmt = random_format(rng) if random_formats > 0 and rng.random() < random_formats else None
        ids, classes, q, words = naming_chunks(tokenizer, rng, int(rng.integers(2, max_ways + 1)),
                                               int(rng.integers(1, max_shots + 1)), split, fmt)
        tail = tokenizer.encode(f" {words[q]}{EOC_TOKEN}")
        ids, classes = (ids + tail)[:length + 1], (classes + [q] * len(tail))[:length + 1]
        lo, hi = amplitude
        amp = float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) if hi > lo else float(lo)
        s = _signatures(rng, ids, classes, tokenizer.image_token_id, dim, scale, noise, amp,
                        float(rng.uniform(0.0, common)) if common > 0 else 0.0)
        n = len(ids) - 1
        x[r, :n] = torch.tensor(ids[:-1])
        y[r, :n] = torch.tensor(ids[1:])
        off[r, :n] = s[:-1]
    return x, off, y


@torch.no_grad()
def binding_accuracy(lm: DecoderLM, tokenizer: FlamingoTokenizer, n_way: int, shots: int, episodes: int,
                     seed: int, *, scale: float = 0.04, noise: float = 0.3, amplitude: float = 1.0,
                     common: float = 0.0, split: str = "heldout") -> float:
    """Fraction of ``episodes`` signature-naming episodes (held-out words by default) in
    which the query's word has the highest log-likelihood among the ``n_way`` words (each
    scored with its leading space, the signature of the query chunk on its tokens), as the
    few-shot evaluation ranks candidates. ``amplitude`` and ``common`` as in
    :func:`binding_rows` (fixed values here)."""
    was = lm.training
    lm.eval()
    hits = 0
    for e in range(episodes):
        g = np.random.default_rng([seed, n_way, shots, e])
        ids, classes, q, words = naming_chunks(tokenizer, g, n_way, shots, split)
        cands = [tokenizer.encode(" " + w) for w in words]
        # one signature draw per episode; the candidate's tokens continue the query chunk
        s = _signatures(g, ids, classes, tokenizer.image_token_id, lm.cfg.dim, scale, noise, amplitude, common)
        longest = len(ids) + max(len(c) for c in cands)
        s = torch.cat([s, s[-1:].expand(longest - len(ids), -1)])
        # all candidates in one causal forward, right-padded (padding only follows what is scored)
        x = torch.full((len(cands), longest), tokenizer.eos_token_id, dtype=torch.long)
        for i, c in enumerate(cands):
            x[i, :len(ids) + len(c)] = torch.tensor(ids + c)
        logp = lm(x, embed_offsets=s.expand(len(cands), -1, -1).to(lm.embed_tokens.weight.dtype))
        logp = logp.float().log_softmax(-1)
        scores = [sum(float(logp[i, len(ids) - 1 + j, t]) for j, t in enumerate(c)) for i, c in enumerate(cands)]
        hits += int(np.argmax(scores)) == q
    lm.train(was)
    return hits / episodes
