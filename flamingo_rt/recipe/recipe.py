"""The whole recipe, end to end: tokenizer -> (1) contrastive NFNet -> (2) LM pretraining ->
(3) connectors on the mixture -> a model folder (safetensors, ``config.json``,
``tokenizer.json``) that :meth:`flamingo_rt.runtime.Generator.from_pretrained` loads.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from ..io.pretrained import save_pretrained
from ..io.tokenizer import FlamingoTokenizer
from ..models.flamingo import Flamingo
from .connectors import ConnectorStats, build_flamingo, train_connectors
from .contrastive import ContrastiveStats, pretrain_vision
from .lm_pretrain import LMStats, pretrain_lm, train_tokenizer
from .presets import RecipeConfig, get_recipe_preset

#: written next to the weights: the recipe's settings and a summary of each stage
RECIPE_LOG = "recipe.json"


def loss_ends(xs, n: int = 20) -> list:
    """``[mean of the first n, mean of the last n]`` of a loss curve ([] when empty)."""
    return [sum(xs[:n]) / max(1, len(xs[:n])), sum(xs[-n:]) / max(1, len(xs[-n:]))] if xs else []


@dataclass
class RecipeResult:
    """What :func:`run_recipe` produced: the trained model (eval mode), its tokenizer, the
    folder it was saved to (or None), each stage's statistics and wall times."""

    model: Flamingo
    tokenizer: FlamingoTokenizer
    out_dir: Optional[Path]
    config: RecipeConfig
    contrastive: ContrastiveStats
    lm: LMStats
    connectors: ConnectorStats
    seconds: Dict[str, float]

    def summary(self) -> Dict[str, Any]:
        """A JSON-able summary: settings, first/last losses of each stage, timings."""
        return {
            "preset": self.config.name,
            "recipe": dataclasses.asdict(self.config),
            "seconds": self.seconds,
            "stage1": {"loss_first_last": loss_ends(self.contrastive.losses),
                       "retrieval_before": self.contrastive.retrieval_before,
                       "retrieval_after": self.contrastive.retrieval_after},
            "stage2": {"loss_first_last": loss_ends(self.lm.losses), "heldout_before": self.lm.heldout_before,
                       "heldout_after": self.lm.heldout_after, "tokens_seen": self.lm.tokens_seen,
                       "bind_scale": self.lm.bind_scale, "bind_loss_first_last": loss_ends(self.lm.bind_losses),
                       "binding_accuracy": self.lm.binding_accuracy},
            "stage3": {"loss_first_last": loss_ends(self.connectors.losses),
                       "dataset_loss_first_last": {k: loss_ends(v) for k, v in self.connectors.dataset_losses.items()},
                       "gates": {str(k): v for k, v in self.connectors.gates.items()},
                       "trainable_parameters": self.connectors.trainable_parameters},
        }


def run_recipe(preset: Union[str, RecipeConfig] = "tiny-world", out_dir: Union[str, os.PathLike, None] = None,
               seed: int = 0, progress: bool = True, num_threads: Optional[int] = None) -> RecipeResult:
    """Run the three stages and, when ``out_dir`` is given, save the model folder there
    (with ``recipe.json``: settings, loss summaries, timings).

    Args:
        preset: a recipe preset name (``"tiny-world"``, ``"toy"``) or a :class:`RecipeConfig`.
        out_dir: folder to write; created if missing.
        seed: the only source of randomness (same seed, same thread count and same kind of
            CPU -> the same weights, bit for bit).
        progress: tqdm bars for each stage.
        num_threads: torch intra-op threads for the run (restored afterwards); None takes
            the preset's ``num_threads`` (1 for ``tiny-world``: the same weights however
            many cores a machine has, and the fastest on a busy one). CPUs whose GEMM
            kernels differ (AVX2 vs AVX-512) round differently, and the differences grow
            with training: tiny-world's stage-1 NFNet differed by up to 2e-2 per weight
            between two such CPUs (stage 2 was bit-identical).
    """
    if num_threads is None:
        num_threads = (get_recipe_preset(preset) if isinstance(preset, str) else preset).num_threads
    if num_threads is None:
        return _run(preset, out_dir, seed, progress)
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        return _run(preset, out_dir, seed, progress)
    finally:
        torch.set_num_threads(before)


def run_stage3(cfg: RecipeConfig, tokenizer: FlamingoTokenizer, nfnet, lm, seed: int, progress: bool = True,
               pools=None):
    """Stage 3 alone: a Flamingo around the pretrained ``nfnet`` and ``lm`` (connectors
    initialised from ``seed``) with its connectors trained. A function of the two backbones,
    the tokenizer, ``cfg`` and ``seed`` only, so stage-3 variants can start from saved
    backbones and give the weights the whole recipe gives. ``pools``: data pools of
    :func:`~flamingo_rt.recipe.build_pools` to reuse (built from ``cfg`` and ``seed`` when
    None). Returns ``(model, ConnectorStats)``."""
    torch.manual_seed(seed + 3)
    model = build_flamingo(cfg.model, nfnet, lm)
    c = cfg.connectors
    with torch.no_grad():
        for blk in model.lm.xattn.values():
            blk.attn.to_out.weight.mul_(c.out_init_scale)
            blk.ff.fc2.weight.mul_(c.out_init_scale)
            if blk.gated:
                blk.attn_gate.fill_(c.gate_init)
                blk.ff_gate.fill_(c.gate_init)
    return model, train_connectors(model, tokenizer, cfg.connectors, seed, cfg.image_size, progress, pools)


def _run(preset, out_dir, seed: int, progress: bool) -> RecipeResult:
    cfg = get_recipe_preset(preset) if isinstance(preset, str) else copy.deepcopy(preset)
    torch.manual_seed(seed)
    times: Dict[str, float] = {}
    t = time.perf_counter()
    tok = train_tokenizer(cfg.lm, seed)
    times["tokenizer"] = time.perf_counter() - t
    cfg.model.lm.vocab_size = tok.vocab_size
    if cfg.model.image_token_id != tok.image_token_id or cfg.model.eoc_token_id != tok.eoc_token_id:
        raise ValueError("expected the tokenizer's <image>/<|endofchunk|> ids to be the config's "
                         f"({cfg.model.image_token_id}, {cfg.model.eoc_token_id}), got "
                         f"({tok.image_token_id}, {tok.eoc_token_id})")
    cfg.model.pad_token_id = tok.pad_token_id
    cfg.model.eos_token_id = tok.eos_token_id

    t = time.perf_counter()
    nfnet, s1 = pretrain_vision(cfg.model, tok, cfg.contrastive, seed, cfg.image_size, progress)
    times["stage1_contrastive"] = time.perf_counter() - t
    t = time.perf_counter()
    lm, s2 = pretrain_lm(cfg.model.lm, tok, cfg.lm, seed, progress)
    times["stage2_lm"] = time.perf_counter() - t
    t = time.perf_counter()
    model, s3 = run_stage3(cfg, tok, nfnet, lm, seed, progress)
    times["stage3_connectors"] = time.perf_counter() - t
    times["total"] = sum(times.values())

    folder = None
    result = RecipeResult(model, tok, None, cfg, s1, s2, s3, times)
    if out_dir is not None:
        folder = Path(out_dir)
        save_pretrained(model, folder, tokenizer=tok)
        (folder / RECIPE_LOG).write_text(json.dumps(result.summary(), indent=1, default=str) + "\n")
        result.out_dir = folder
    return result
