"""A randomly initialised tiny Flamingo with a tokenizer trained on the procedural world's
text, saved as a model folder (for the evaluation and demo tests)."""
from __future__ import annotations

from pathlib import Path

import torch

from flamingo_rt.io import FlamingoTokenizer, save_pretrained
from flamingo_rt.models import Flamingo, get_preset
from flamingo_rt.world import world_corpus


def tiny_world_model(folder: Path, seed: int = 0) -> Path:
    """Save a random ``tiny`` model (gates opened, so the images matter) with a 512-token
    BPE tokenizer of ``world_corpus`` to ``folder``; returns the folder."""
    tok = FlamingoTokenizer.train_bpe(world_corpus(300, seed=0), vocab_size=512)
    torch.manual_seed(seed)
    cfg = get_preset("tiny")
    cfg.lm.vocab_size = tok.vocab_size
    model = Flamingo(cfg)
    with torch.no_grad():
        for b in model.xattn_blocks():
            b.attn_gate.fill_(0.9)
            b.ff_gate.fill_(0.5)
    return save_pretrained(model, folder, tokenizer=tok)
