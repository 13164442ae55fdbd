"""A small on-disk world mixture, a tokenizer and a tiny model folder for training tests.

Used in-process by tests/test_train*.py and by the subprocess worker ``train_worker.py``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import torch

IMAGE_SIZE = 32
FRAMES = 3


def tiny_model_config(vocab_size: int):
    from flamingo_rt.models import get_preset

    cfg = get_preset("tiny")
    cfg.lm.vocab_size = vocab_size
    cfg.vision.image_size = IMAGE_SIZE
    cfg.resampler.max_num_frames = FRAMES  # learned temporal embeddings: clips use them, stills do not
    return cfg


def make_world(root: Path) -> Dict[str, Path]:
    """Writes (once) ``root/{docs,pairs,video}`` datasets, ``root/model`` (a random tiny
    model + tokenizer, seed 0). Returns the paths."""
    from flamingo_rt.io.pretrained import save_pretrained
    from flamingo_rt.io.tokenizer import FlamingoTokenizer
    from flamingo_rt.models import Flamingo
    from flamingo_rt.runtime.train import write_dataset
    from flamingo_rt.world import image_text_pairs, interleaved_documents, video_text_pairs, world_corpus

    root = Path(root)
    paths = {k: root / k for k in ("docs", "pairs", "video", "model")}
    if (root / "done").exists():
        return paths
    root.mkdir(parents=True, exist_ok=True)
    tok = FlamingoTokenizer.train_bpe(world_corpus(300), vocab_size=400)
    write_dataset(interleaved_documents(0, image_size=IMAGE_SIZE, max_images=3, n=24), paths["docs"], "interleaved",
                  shard_size=8)
    write_dataset(image_text_pairs(1, image_size=IMAGE_SIZE, n=24), paths["pairs"], "pairs", shard_size=8)
    write_dataset(video_text_pairs(2, image_size=IMAGE_SIZE, num_frames=FRAMES, n=12), paths["video"], "video",
                  shard_size=4)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Flamingo(tiny_model_config(tok.vocab_size))
    save_pretrained(model, paths["model"], tokenizer=tok)
    (root / "done").write_text("ok")
    return paths


def train_config_dict(root: Path, out_dir: Path, steps: int, **over: Any) -> Dict[str, Any]:
    """A JSON-able TrainConfig dict over the world datasets of ``root``."""
    p = make_world(root)
    d: Dict[str, Any] = dict(
        model=str(p["model"]),
        out_dir=str(out_dir),
        steps=steps,
        seed=0,
        progress=False,
        checkpoint_every=2,
        datasets=[
            dict(name="docs", kind="interleaved", path=str(p["docs"]), weight=1.0, batch_size=4, max_images=3,
                 max_tokens=96),
            dict(name="pairs", kind="pairs", path=str(p["pairs"]), weight=0.2, batch_size=4),
            dict(name="video", kind="video", path=str(p["video"]), weight=0.03, batch_size=2, num_frames=FRAMES),
        ],
        optim=dict(lr=3e-3, warmup_steps=2, weight_decay=0.1),
    )
    d.update(over)
    return d


def write_config(path: Path, d: Dict[str, Any]) -> Path:
    path.write_text(json.dumps(d))
    return path
