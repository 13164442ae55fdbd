"""Training configuration: the mixture, the optimizer, freezing, checkpoints, logging.

A run is described by one :class:`TrainConfig`, built in code or read from a JSON or TOML
file (:func:`load_train_config`). Example TOML::

    model = "out/pretrained"          # a model folder (save_pretrained), or preset = "tiny"
    out_dir = "out/run1"              # checkpoints/, log.jsonl, final/
    steps = 1000
    seed = 0
    precision = "bf16"                # "fp32" | "bf16" (autocast)

    [[datasets]]
    name = "m3w"
    kind = "interleaved"              # "interleaved" | "pairs" | "video"
    path = "data/docs"                # a folder of *.jsonl shards (see dataset_format.py)
    weight = 1.0
    batch_size = 8                    # the global batch, split over processes
    max_images = 5
    max_tokens = 256

    [optim]
    lr = 1e-4
    warmup_steps = 100

Every field is checked on construction; errors name the field, what was expected and
what was received.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ..._values import check_field_types, check_known_keys

__all__ = [
    "DatasetConfig", "OptimConfig", "FreezeConfig", "TrainConfig", "load_train_config", "DATASET_KINDS",
    "resolve_frozen_linear_dtype",
]

DATASET_KINDS = ("interleaved", "pairs", "video")
PRECISIONS = ("fp32", "bf16")
STRATEGIES = ("auto", "none", "ddp", "fsdp")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


_PATH_FIELDS = ("path", "out_dir", "model", "tokenizer")


def _check_types(obj: Any, where: str) -> None:
    """:func:`flamingo_rt._values.check_field_types` with the config's path fields (which
    also take os.PathLike)."""
    check_field_types(obj, where, path_fields=_PATH_FIELDS)


@dataclass
class DatasetConfig:
    """One dataset of the mixture.

    Attributes:
        name: a unique name (used in logs: ``loss/<name>``).
        kind: "interleaved" (several images among text, M3W), "pairs" (one image and its
            text, ALIGN / LTIP) or "video" (F frames and a text, VTP).
        path: folder of ``*.jsonl`` shards (format in :mod:`.dataset_format`).
        weight: the loss weight (paper: M3W 1.0, ALIGN 0.2, LTIP 0.2, VTP 0.03).
        batch_size: sequences per step (global: split over processes).
        max_images: records with more media are skipped (counted as "too_many_images").
        max_tokens: sequences are cut to this many tokens (media whose ``<image>`` token is
            cut off are dropped).
        num_frames: "video": frames per clip (clips are resampled uniformly to it);
            None keeps each clip's own count (then all clips must agree).
        mask_before_first_image: "interleaved": no loss on the text before the first image
            and between an ``<|endofchunk|>`` and the next ``<image>`` (OpenFlamingo's rule).
    """

    name: str
    kind: str
    path: str
    weight: float = 1.0
    batch_size: int = 8
    max_images: int = 5
    max_tokens: int = 256
    num_frames: Optional[int] = None
    mask_before_first_image: bool = True

    def __post_init__(self) -> None:
        _check(isinstance(self.name, str) and self.name != "", f"expected a non-empty dataset name, got {self.name!r}")
        _check_types(self, f"dataset {self.name!r}: ")
        _check(self.kind in DATASET_KINDS, f"dataset {self.name!r}: expected kind in {DATASET_KINDS}, got {self.kind!r}")
        _check(self.weight >= 0, f"dataset {self.name!r}: expected weight >= 0, got {self.weight}")
        _check(self.batch_size >= 1, f"dataset {self.name!r}: expected batch_size >= 1, got {self.batch_size}")
        _check(self.max_images >= 1, f"dataset {self.name!r}: expected max_images >= 1, got {self.max_images}")
        _check(self.max_tokens >= 2, f"dataset {self.name!r}: expected max_tokens >= 2, got {self.max_tokens}")
        _check(self.num_frames is None or self.num_frames >= 1,
               f"dataset {self.name!r}: expected num_frames >= 1 or None, got {self.num_frames}")
        self.path = str(self.path)


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay to ``min_lr_ratio * lr``.

    Weight decay applies to weight matrices only (not biases, norms, gates, embeddings,
    latents or positional/temporal embeddings)."""

    lr: float = 1e-4
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: Optional[float] = 1.0
    #: keep a weight gradient as the two factors of its product during the step when those
    #: take less memory (one process, Adam / AdamW; ``train_step(factored=...)``,
    #: :mod:`flamingo_rt.ops.factored_grads`)
    factored_grads: bool = True

    def __post_init__(self) -> None:
        _check_types(self, "optim: ")
        _check(self.lr > 0, f"optim: expected lr > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"optim: expected weight_decay >= 0, got {self.weight_decay}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               f"optim: expected two betas in [0, 1), got {self.betas}")
        _check(self.warmup_steps >= 0, f"optim: expected warmup_steps >= 0, got {self.warmup_steps}")
        _check(0 <= self.min_lr_ratio <= 1, f"optim: expected min_lr_ratio in [0, 1], got {self.min_lr_ratio}")
        _check(self.grad_clip is None or self.grad_clip > 0, f"optim: expected grad_clip > 0 or None, got {self.grad_clip}")


@dataclass
class FreezeConfig:
    """What trains. Default (Flamingo): the resampler and the cross-attention blocks train,
    the vision encoder and the LM are frozen, and of the LM only the embedding rows of
    ``trainable_token_ids`` (default: ``<image>`` and ``<|endofchunk|>``) train.
    ``frozen_linear_dtype``: ``"bf16"`` (with ``precision = "bf16"``) stores the frozen LM's
    linear weights in bfloat16 (:func:`~flamingo_rt.runtime.train.freeze.store_frozen_linears`:
    the values autocast's per-use casts would give, half their memory, no per-step casts);
    ``"auto"`` (default) does so whenever ``precision = "bf16"``, the strategy is not
    ``"fsdp"`` and the run loads a model folder (whose float32 originals its final folder gets
    back; see :func:`resolve_frozen_linear_dtype`); ``"none"`` (or None) keeps
    them in their own dtype."""

    vision: bool = True
    lm: bool = True
    resampler: bool = False
    xattn: bool = False
    trainable_token_ids: Optional[List[int]] = None
    frozen_linear_dtype: Optional[str] = "auto"

    def __post_init__(self) -> None:
        _check_types(self, "freeze: ")
        _check(self.frozen_linear_dtype in (None, "none", "auto", "bf16"),
               f"freeze: expected frozen_linear_dtype 'auto', 'bf16', 'none' or None, got {self.frozen_linear_dtype!r}")


def _section(cls, value: Any, where: str):
    """A config section: an instance of ``cls`` as is, or a table (dict) of its fields;
    unknown keys and non-tables are ValueErrors naming the section."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a table of settings, got {type(value).__name__}")
    _check_keys(cls, value, f"{where}: unknown keys", f"{where}: missing")
    return cls(**value)


def _check_keys(cls, d: Dict[str, Any], what: str, missing_what: str) -> None:
    """ValueError ``what [keys]; expected some of [fields]`` when ``d`` has keys that are
    not fields of the dataclass ``cls``, and ``missing_what required keys [keys]`` when it
    lacks fields that have no default."""
    check_known_keys(cls, d, what)
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{missing_what} required keys {missing}")


@dataclass
class TrainConfig:
    """A training run. ``model`` is a model folder; ``preset`` builds a fresh model
    from a preset instead (with ``tokenizer``: a ``tokenizer.json`` path)."""

    datasets: List[DatasetConfig]
    out_dir: str
    steps: int
    model: Optional[str] = None
    preset: Optional[str] = None
    tokenizer: Optional[str] = None
    seed: int = 0
    precision: str = "fp32"
    activation_checkpointing: bool = False
    #: CPU: each step's large tensors from blocks kept mapped between steps, within the step's
    #: peak (train_step's cpu_block_cache: first-touch page faults avoided, memory unchanged)
    cpu_block_cache: bool = True
    #: steps whose batches are read, decoded and collated ahead in a background thread while
    #: the current step runs (0: in the loop; :mod:`~flamingo_rt.runtime.train.prefetch`);
    #: None: 1 on a CUDA device, 0 on the CPU (:meth:`resolved_prefetch_steps`)
    prefetch_steps: Optional[int] = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 1
    progress: bool = True
    strategy: str = "auto"
    backend: Optional[str] = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        _check(isinstance(self.datasets, (list, tuple)),
               f"expected datasets: a list of tables ([[datasets]] in TOML), got {type(self.datasets).__name__}")
        self.datasets = [_section(DatasetConfig, d, f"datasets[{i}]") for i, d in enumerate(self.datasets)]
        self.optim = _section(OptimConfig, self.optim, "optim")
        self.freeze = _section(FreezeConfig, self.freeze, "freeze")
        _check_types(self, "")
        _check(len(self.datasets) >= 1, "expected at least one dataset in the mixture, got none")
        names = [d.name for d in self.datasets]
        _check(len(set(names)) == len(names), f"expected unique dataset names, got {names}")
        _check(any(d.weight > 0 for d in self.datasets),
               f"expected at least one dataset with weight > 0 (the step's loss is the weighted sum), got "
               f"{ {d.name: d.weight for d in self.datasets} }")
        _check(self.steps >= 1, f"expected steps >= 1, got {self.steps}")
        _check((self.model is None) != (self.preset is None),
               f"expected exactly one of model (a folder) or preset, got model={self.model!r} preset={self.preset!r}")
        _check(self.preset is None or self.tokenizer is not None,
               "a preset model needs tokenizer = path to a tokenizer.json")
        _check(self.precision in PRECISIONS, f"expected precision in {PRECISIONS}, got {self.precision!r}")
        _check(self.strategy in STRATEGIES, f"expected strategy in {STRATEGIES}, got {self.strategy!r}")
        if self.freeze.frozen_linear_dtype == "bf16":
            _check(self.precision == self.freeze.frozen_linear_dtype,
                   f"freeze.frozen_linear_dtype = {self.freeze.frozen_linear_dtype!r} needs precision = "
                   f"{self.freeze.frozen_linear_dtype!r} (autocast casts the products' inputs to it), got {self.precision!r}")
            _check(self.strategy != "fsdp",
                   "freeze.frozen_linear_dtype is supported with strategy 'auto', 'none' or 'ddp' "
                   "(FSDP2's mixed-dtype layers are not), got 'fsdp'")
        _check(self.prefetch_steps is None or self.prefetch_steps >= 0,
               f"expected prefetch_steps: an integer >= 0 (or unset), got {self.prefetch_steps!r}")
        _check(self.checkpoint_every >= 1, f"expected checkpoint_every >= 1, got {self.checkpoint_every}")
        _check(self.keep_checkpoints >= 1, f"expected keep_checkpoints >= 1, got {self.keep_checkpoints}")
        _check(self.log_every >= 1, f"expected log_every >= 1, got {self.log_every}")
        self.out_dir = str(self.out_dir)

    def resolved_frozen_linear_dtype(self, has_source_folder: bool = True) -> Optional[str]:
        """:func:`resolve_frozen_linear_dtype` of this config's ``freeze.frozen_linear_dtype``,
        precision and strategy."""
        return resolve_frozen_linear_dtype(self.freeze.frozen_linear_dtype, self.precision, self.strategy,
                                           has_source_folder)

    def resolved_prefetch_steps(self, device_type: str) -> int:
        """``prefetch_steps``, or when unset 1 on a CUDA device and 0 on the CPU: there the
        training step's ops already use every core, and a thread making the next batches
        slowed it (2-core EPYC, tiny model on 224 px PNG documents: 149-162 -> 178-187 ms a
        step, the batches' 42-44 ms of host work made in 92-99 ms beside it)."""
        if self.prefetch_steps is not None:
            return int(self.prefetch_steps)
        return 1 if device_type == "cuda" else 0

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        _check_keys(cls, d, "unknown training config keys", "training config: missing")
        return cls(**d)


def resolve_frozen_linear_dtype(value: Optional[str], precision: str, strategy: str = "auto",
                                has_source_folder: bool = True) -> Optional[str]:
    """The dtype name (a key of ``FROZEN_LINEAR_DTYPES``: ``"bf16"``) the frozen LM's linear
    weights are stored in, or None (their own), for ``freeze.frozen_linear_dtype = value``:
    ``"auto"`` gives ``"bf16"`` under ``precision = "bf16"`` unless the strategy is ``"fsdp"``
    (FSDP2 shards layers of one dtype) or the run has no model folder to read the float32
    originals back from for its final folder (``has_source_folder`` False: a preset or an
    in-memory model; an explicit ``"bf16"`` still applies there, and the final folder then
    holds the rounded values); ``"none"`` and None give None."""
    if value == "auto":
        return "bf16" if precision == "bf16" and strategy != "fsdp" and has_source_folder else None
    return None if value in (None, "none") else value


def load_train_config(path: Union[str, Path], overrides: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """Read a :class:`TrainConfig` from ``.json`` or ``.toml``; relative dataset / model /
    tokenizer / out_dir paths are taken relative to the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training config {path} does not exist")
    if path.suffix not in (".toml", ".json"):
        raise ValueError(f"expected a .json or .toml training config, got {path.name}")
    try:
        if path.suffix == ".toml":
            import tomllib

            d = tomllib.loads(path.read_text())
        else:
            d = json.loads(path.read_text())
    except ValueError as e:  # tomllib.TOMLDecodeError, json.JSONDecodeError
        raise ValueError(f"cannot parse training config {path}: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"expected training config {path} to hold a table of settings, got {type(d).__name__}")
    d.update(overrides or {})
    base = path.parent

    def rel(p: Optional[str]) -> Optional[str]:
        return None if p is None else str((base / p) if not Path(p).is_absolute() else Path(p))

    for k in ("model", "tokenizer", "out_dir"):
        if k in d:
            d[k] = rel(d[k])
    if isinstance(d.get("datasets"), list):  # anything else is refused by TrainConfig, by name
        d["datasets"] = [dict(ds, path=rel(ds["path"])) if isinstance(ds, dict) and "path" in ds else ds
                         for ds in d["datasets"]]
    return TrainConfig.from_dict(d)
