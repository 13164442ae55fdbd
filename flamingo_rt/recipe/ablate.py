"""The paper's ablations in miniature (Flamingo, Table 3): short runs of stage 3 of the recipe,
each with one change, scored by held-out few-shot evaluation.

Every run starts from the same frozen backbones (the NFNet and the LM of a model folder, by
default the shipped ``tiny-world`` model), the same rendered data pools (their vision
features computed once) and the same seed, and trains fresh connectors for the same number
of steps; only the change differs. The rows (:data:`ABLATIONS`):

- ``baseline``: the recipe as it is;
- ``no_tanh_gating``: the gated blocks without their tanh gates (y = x + XAttn, z = y + FF);
- ``all_previous_images``: text attends to the tokens of all previous images instead of only
  the latest one;
- ``mlp_resampler``: an MLP (per-token feed-forward layers, then average pooling to the same
  number of tokens) instead of the Perceiver Resampler;
- ``xattn_every_2nd_layer``: a gated block before every second LM layer instead of every one;
- ``unfrozen_lm``: the LM trained too (the paper's "freezing LM" row, the other way round).

The score of a row is the held-out evaluation of :mod:`flamingo_rt.eval` (held-out attribute
combinations and nonsense words, training phrasings, as the demo): 5-way nonsense-word naming
(classes by ``by``) at each shot count, and question answering; ``score`` is the mean naming
accuracy over the shot counts >= 1.

The ``<image>`` / ``<|endofchunk|>`` embedding rows start from the folder's values (the other
LM weights are the stage-2 weights exactly: stage 3 keeps them frozen), the same for every row.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..io.pretrained import load_pretrained
from ..io.tokenizer import FlamingoTokenizer
from ..models.config import FlamingoConfig
from ..models.lm import DecoderLM
from ..models.nfnet import NFNet
from .connectors import build_pools
from .presets import RecipeConfig, get_recipe_preset
from .recipe import loss_ends, run_stage3

__all__ = ["ABLATIONS", "AblationRow", "format_table", "load_backbones", "run_ablations", "save_json"]


def _no_tanh_gating(cfg: RecipeConfig) -> None:
    cfg.model.xattn.gated = False


def _all_previous(cfg: RecipeConfig) -> None:
    cfg.model.xattn.all_previous = True


def _mlp_resampler(cfg: RecipeConfig) -> None:
    cfg.model.resampler.kind = "mlp"


def _every_2nd(cfg: RecipeConfig) -> None:
    x, layers = cfg.model.xattn, cfg.model.lm.n_layers
    if layers < 2 * x.every:
        raise ValueError(f"cross-attention every {2 * x.every} layers leaves no block in a {layers}-layer LM "
                         f"(the model has one every {x.every})")
    x.every = 2 * x.every


def _unfrozen_lm(cfg: RecipeConfig) -> None:
    cfg.connectors.freeze_lm = False


#: name -> (what changes, in the paper's words, function applying it to a recipe config)
ABLATIONS: Dict[str, Tuple[str, Callable[[RecipeConfig], None]]] = {
    "baseline": ("the recipe as it is", lambda cfg: None),
    "no_tanh_gating": ("no tanh gating on the gated blocks", _no_tanh_gating),
    "all_previous_images": ("attend to all previous images, not the latest one", _all_previous),
    "mlp_resampler": ("an MLP instead of the Perceiver Resampler", _mlp_resampler),
    "xattn_every_2nd_layer": ("cross-attention every 2nd LM layer instead of every one", _every_2nd),
    "unfrozen_lm": ("the LM trained too (not frozen)", _unfrozen_lm),
}


@dataclass
class AblationRow:
    """One ablation run: what changed, its trainable parameters, training time (stage 3
    only, data rendering excluded), the first/last training losses (mean of 20 steps),
    the final gates, and the held-out scores: ``naming`` {shots: 5-way accuracy},
    ``qa`` {shots: VQA accuracy of the generated answers}, ``score`` = mean naming accuracy over shots >= 1."""

    name: str
    change: str
    steps: int
    trainable_parameters: int
    train_seconds: float
    loss_first: float
    loss_last: float
    naming: Dict[int, float]
    qa: Dict[int, float]
    score: float
    gates: Dict[int, Tuple[float, float]] = field(default_factory=dict)

    @property
    def seconds_per_step(self) -> float:
        return self.train_seconds / max(1, self.steps)


def load_backbones(folder: Union[str, Path]) -> Tuple[NFNet, DecoderLM, FlamingoTokenizer, FlamingoConfig]:
    """The frozen backbones of a model folder written by the recipe: (its NFNet, its LM
    without the cross-attention blocks, its tokenizer, its :class:`FlamingoConfig`)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"expected a model folder with config.json (the recipe's output), got {folder}")
    model, tok = load_pretrained(folder)
    if tok is None:
        raise FileNotFoundError(f"expected tokenizer.json in {folder}: the ablations train on the world's text")
    if not isinstance(model.vision_encoder, NFNet):
        raise ValueError(f"expected a model with an NFNet vision encoder, got {type(model.vision_encoder).__name__}")
    lm = DecoderLM(model.config.lm)
    missing, unexpected = lm.load_state_dict(
        {k: v for k, v in model.lm.state_dict().items() if not k.startswith("xattn.")}, strict=False)
    if missing or unexpected:
        raise ValueError(f"LM weights of {folder} do not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.vision_encoder, lm.eval(), tok, model.config


def _evaluate(model, tok, cfg: RecipeConfig, episodes: int, shots: Sequence[int], seed: int, by: str):
    from ..eval import TaskSuite, evaluate
    from ..eval.runner import media_needed
    from ..runtime import Generator

    suite = TaskSuite(tasks=("classify", "qa"), shots=tuple(shots), episodes=episodes, seed=seed, split="heldout",
                      format_split="train", n_way=5, by=by, selection="random", image_size=cfg.image_size,
                      num_frames=cfg.connectors.num_frames)
    res = evaluate(Generator(model, tok, max_media=media_needed(suite)), suite)
    naming = {k: res.score("classify", k) for k in shots}
    qa = {k: res.score("qa", k, "vqa_accuracy") for k in shots}
    return naming, qa


def run_ablations(model_dir: Union[str, Path], preset: str = "tiny-world", names: Optional[Sequence[str]] = None,
                  steps: Optional[int] = None, seed: int = 0, episodes: int = 40,
                  shots: Sequence[int] = (0, 1, 2, 4), by: str = "colour", eval_seed: int = 100,
                  progress: bool = True, num_threads: Optional[int] = 1,
                  on_row: Optional[Callable[[AblationRow], None]] = None, backbones: Optional[tuple] = None
                  ) -> List[AblationRow]:
    """Run the ablations ``names`` (default: all of :data:`ABLATIONS`, baseline first).

    Args:
        model_dir: model folder whose NFNet, LM and tokenizer are the frozen backbones.
        preset: the recipe preset whose stage-3 settings every row uses (``"tiny-world"``,
            ``"toy"``); its model shapes are replaced by the folder's.
        steps: stage-3 steps per row (default: the preset's).
        seed: seeds the data pools, the batch draws and the connectors' initialisation.
        episodes, shots, by, eval_seed: the held-out evaluation (queries per cell, shot
            counts, what a naming class is, the episodes' seed).
        num_threads: torch threads during the runs (restored after; None keeps them).
        on_row: called with each finished row (e.g. to print it).
        backbones: :func:`load_backbones`'s tuple to use instead of loading ``model_dir``
            (every row trains copies; these stay unchanged).
    Returns:
        One :class:`AblationRow` per name, in order.
    """
    names = list(ABLATIONS) if names is None else list(names)
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown or not names:
        raise ValueError(f"expected ablation names from {list(ABLATIONS)}, got {names}")
    if any(k < 0 for k in shots) or not any(k >= 1 for k in shots):
        raise ValueError(f"expected shot counts >= 0 with at least one >= 1, got {list(shots)}")
    before = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        nfnet, lm, tok, model_cfg = backbones if backbones is not None else load_backbones(model_dir)
        base = get_recipe_preset(preset)
        base.model = copy.deepcopy(model_cfg)
        if steps is not None:
            if steps < 1:
                raise ValueError(f"expected steps >= 1, got {steps}")
            base.connectors.steps = steps
            base.connectors.warmup = min(base.connectors.warmup, max(1, steps // 10))
        pools = build_pools(base.connectors, seed, base.image_size, progress)
        rows = []
        for name in names:
            change, apply = ABLATIONS[name]
            cfg = copy.deepcopy(base)
            apply(cfg)
            model, stats = run_stage3(cfg, tok, nfnet, lm, seed, progress=progress, pools=pools)
            naming, qa = _evaluate(model, tok, cfg, episodes, shots, eval_seed, by)
            loss_first, loss_last = loss_ends(stats.losses)
            ks = [k for k in shots if k >= 1]
            row = AblationRow(
                name=name, change=change, steps=cfg.connectors.steps,
                trainable_parameters=stats.trainable_parameters,
                train_seconds=stats.seconds - stats.data_seconds,
                loss_first=loss_first, loss_last=loss_last,
                naming=naming, qa=qa, score=sum(naming[k] for k in ks) / len(ks), gates=stats.gates)
            rows.append(row)
            if on_row is not None:
                on_row(row)
        return rows
    finally:
        torch.set_num_threads(before)


def format_table(rows: Sequence[AblationRow]) -> str:
    """The ablation table: one row per run, naming accuracy by shots, QA at the largest shot
    count, the score and its change from the baseline (when present), the training time."""
    if not rows:
        return "(no ablation rows)"
    shots = sorted(rows[0].naming)
    base = next((r for r in rows if r.name == "baseline"), None)
    head = (f"{'ablation':<24}{'trained':>9}" + "".join(f"{f'name k={k}':>10}" for k in shots)
            + f"{f'QA k={shots[-1]}':>9}{'score':>8}{'vs base':>9}{'s/step':>8}{'train s':>9}{'loss':>14}")
    lines = [head, "-" * len(head)]
    for r in rows:
        delta = f"{100 * (r.score - base.score):+8.1f}" if base is not None else f"{'':>8}"
        lines.append(
            f"{r.name:<24}{r.trainable_parameters / 1e3:>8.0f}k" + "".join(f"{100 * r.naming[k]:>9.0f}%" for k in shots)
            + f"{100 * r.qa[shots[-1]]:>8.0f}%{100 * r.score:>7.1f}%{delta} {r.seconds_per_step:>7.3f}"
            f"{r.train_seconds:>9.1f}{r.loss_first:>7.2f}>{r.loss_last:<6.2f}")
    lines.append("score: mean 5-way naming accuracy (held-out colours and words) over shots >= 1; "
                 "vs base in points; loss: weighted stage-3 loss, first > last 20 steps")
    return "\n".join(lines)


def save_json(rows: Sequence[AblationRow], path: Union[str, Path], **meta) -> Path:
    """Write the rows (and ``meta``: settings) as JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "rows": [dict(asdict(r), seconds_per_step=r.seconds_per_step) for r in rows]}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path
