"""The training loop: a configured mixture, frozen backbones, weighted accumulation,
checkpoints with exact resume, logs, DDP / FSDP2.

    from flamingo_rt.runtime.train import Trainer, load_train_config
    Trainer(load_train_config("run.toml")).fit()

or ``flamingo-rt train run.toml`` (``torchrun --nproc_per_node N -m flamingo_rt.cli train
run.toml`` for several processes). A run whose ``out_dir`` holds a checkpoint resumes from
it: the steps that follow are exactly those of an uninterrupted run.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from ...io.tokenizer import FlamingoTokenizer
from ...ops import cpu_gemm, half_widening
from ...models.flamingo import Flamingo
from .collate import Collator
from .config import TrainConfig
from .dataset_stream import DatasetStream
from .distributed import DistInfo, close_distributed, init_distributed, row_range, wrap_model
from .freeze import FROZEN_LINEAR_DTYPES, RowGradMask, apply_freeze, store_frozen_linears
from .metrics_log import MetricsLog
from .optim import build_optimizer, build_scheduler
from .prefetch import Prefetcher
from .step import NonFiniteLossError, train_step
from .train_state import latest_checkpoint, load_train_state, save_train_state

__all__ = ["Trainer", "train"]

# parameter name prefix -> part, for Trainer.trainable_summary
_PARTS = (("resampler.", "resampler"), ("lm.xattn.", "xattn"), ("lm.token_rows.", "token_rows"))


def _load_model(cfg: TrainConfig):
    if cfg.model is not None:
        from ...io.pretrained import load_pretrained

        model, tok = load_pretrained(cfg.model)
        if tok is None:
            if cfg.tokenizer is None:
                raise FileNotFoundError(f"model folder {cfg.model} has no tokenizer.json; set tokenizer = <path>")
            tok = FlamingoTokenizer.from_file(cfg.tokenizer)
        return model, tok
    from ...models.config import get_preset

    model = Flamingo(get_preset(cfg.preset))
    return model, FlamingoTokenizer.from_file(cfg.tokenizer)


class Trainer:
    """Owns the model, optimizer, scheduler, data streams and logs of one run.

    Args:
        cfg: the :class:`TrainConfig`.
        model, tokenizer: an in-memory model and tokenizer instead of ``cfg.model`` /
            ``cfg.preset`` (the tokenizer's ``<image>`` / ``<|endofchunk|>`` ids must match
            the model config's).
    """

    def __init__(self, cfg: TrainConfig, model: Optional[Flamingo] = None,
                 tokenizer: Optional[FlamingoTokenizer] = None):
        self.cfg = cfg
        self.dist: DistInfo = init_distributed(cfg.device)
        dev = cfg.device
        if dev.startswith("cuda") and self.dist.world_size > 1:
            dev = f"cuda:{self.dist.local_rank}"
        self.device = torch.device(dev)
        torch.manual_seed(cfg.seed)
        self._source_folder = cfg.model if model is None else None  # where the weights came from
        if model is None:
            model, tokenizer = _load_model(cfg)
        if tokenizer is None:
            raise ValueError("expected a tokenizer with the model")
        c = model.config
        if (tokenizer.image_token_id, tokenizer.eoc_token_id) != (c.image_token_id, c.eoc_token_id):
            raise ValueError(
                f"tokenizer ids (<image>={tokenizer.image_token_id}, <|endofchunk|>={tokenizer.eoc_token_id}) "
                f"differ from the model config's ({c.image_token_id}, {c.eoc_token_id})"
            )
        self.tokenizer = tokenizer
        self.model = model.to(self.device)
        # the vocabulary rows train as their own (k, D) parameters (model.lm.token_rows); under
        # FSDP2 the sharded tables are not written (TokenRows.in_tables False: every use of the
        # tables corrects for the rows). self.rows ({table: rows} of whole tables trained under
        # a gradient mask) stays {}: apply_freeze(separate_rows=False) is OpenFlamingo's way.
        self.rows: Dict[str, List[int]] = apply_freeze(
            self.model, cfg.freeze, [tokenizer.image_token_id, tokenizer.eoc_token_id],
            rows_in_tables=cfg.strategy != "fsdp")
        # the frozen LM's linears in bf16 (after apply_freeze: the row-trained projections stay float32)
        self.lowp_frozen: List[str] = []
        # "bf16" or None; "auto" only where the final folder can get the float32 originals back
        # (the run loads a model folder), so that by default nothing saved is rounded
        self.frozen_linear_dtype = cfg.resolved_frozen_linear_dtype(has_source_folder=self._source_folder is not None)
        if self.frozen_linear_dtype is not None:
            self.lowp_frozen = store_frozen_linears(self.model, FROZEN_LINEAR_DTYPES[self.frozen_linear_dtype])
        self.model.train()
        self.model.lm.activation_checkpointing = cfg.activation_checkpointing
        # wrap first: FSDP2 replaces the parameters the optimizer and the row mask must hold
        self.wrapped, self._no_sync = wrap_model(self.model, self.dist, cfg.strategy, str(self.device))
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.steps)
        self.grad_mask = RowGradMask(self.model, self.rows)
        self.streams = {d.name: DatasetStream(d, cfg.seed) for d in cfg.datasets}
        self.collators = {d.name: Collator(tokenizer, self.model.config.vision, d) for d in cfg.datasets}
        for d in cfg.datasets:
            row_range(d.batch_size, self.dist, d.name)  # divisibility, checked before any work
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.step = 0
        # the streams' positions after the last step taken (the prefetch thread reads ahead)
        self._positions: Optional[Dict[str, Dict[str, Any]]] = None
        self.resumed_from: Optional[Path] = None
        latest = latest_checkpoint(self.ckpt_dir)
        if latest is not None:
            self.step, data, _ = load_train_state(latest, self.model, self.optimizer, self.scheduler)
            for name, st in data.items():
                if name not in self.streams:
                    raise ValueError(f"the checkpoint {latest} has data positions of dataset {name!r}, "
                                     f"which is not in the configured mixture {list(self.streams)}")
                self.streams[name].load_state_dict(st)
            self.resumed_from = latest
        self.history: List[Dict[str, Any]] = []

    # ------------------------------------------------------------------ pieces
    def _make_step(self):
        """One step's batch of every dataset (this process's rows, on the CPU), their target
        counts and tokens, and the streams' positions after them. Runs in the prefetch
        thread during :meth:`fit`."""
        batches, targets, tokens = {}, {}, 0
        for d in self.cfg.datasets:
            gb = self.collators[d.name](self.streams[d.name].take(d.batch_size))
            targets[d.name] = gb.num_targets
            tokens += gb.num_tokens
            r = row_range(d.batch_size, self.dist, d.name)
            batches[d.name] = gb.rows(r.start, r.stop)
        return batches, targets, tokens, {n: s.state_dict() for n, s in self.streams.items()}

    def _take(self, made):
        """A step's data from :meth:`_make_step` taken: the batches on the device, targets,
        tokens; its stream positions become those a checkpoint records."""
        batches, targets, tokens, positions = made
        self._positions = positions
        return {n: b.to(self.device) for n, b in batches.items()}, targets, tokens

    def _batches(self):
        """The next step's batches, read in this thread."""
        return self._take(self._make_step())

    def stream_positions(self) -> Dict[str, Dict[str, Any]]:
        """Each dataset stream's position (``state_dict``) after the last step taken."""
        if self._positions is not None:
            return self._positions
        return {n: s.state_dict() for n, s in self.streams.items()}

    def _rewind_streams(self) -> None:
        """Put the streams back where the last step taken left them (the prefetch thread may
        have read further)."""
        if self._positions is not None:
            for name, st in self._positions.items():
                self.streams[name].load_state_dict(st)

    def save_checkpoint(self) -> Optional[Path]:
        """Checkpoint the current step (the main process writes; all wait)."""
        path = save_train_state(
            self.ckpt_dir, self.step, self.model, self.optimizer, self.scheduler,
            self.stream_positions(), self.rows,
            extra={"config": self.cfg.to_dict()}, keep=self.cfg.keep_checkpoints, is_main=self.dist.is_main,
        )
        if self.dist.world_size > 1:
            dist.barrier()
        return path

    def gate_values(self) -> Dict[str, List[float]]:
        """{layer: [tanh(attn gate), tanh(ff gate)]}, rounded for the log (a collective under FSDP)."""
        return {str(k): [round(a, 6), round(f, 6)] for k, (a, f) in self.model.gate_values().items()}

    def save_final(self, folder: Path) -> None:
        """The whole model as a model folder (``save_pretrained`` layout) with the tokenizer
        (gathered under FSDP: every process calls it, the main one writes)."""
        rows = self.model.lm.token_rows
        if self.cfg.strategy == "fsdp" and self.dist.world_size > 1:
            self._save_final(folder, rows)  # the rows are written into the gathered state
            return
        with self.model.lm.token_rows_merged():  # the trained rows in the tables, a plain LM's state
            self._save_final(folder, rows)

    def _save_final(self, folder: Path, token_rows) -> None:
        from ...io.checkpoint import save_checkpoint
        from ...io.pretrained import save_pretrained

        if self.cfg.strategy == "fsdp" and self.dist.world_size > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.dist.is_main:
                if self.model.config.lm.tie_embeddings:
                    sd["lm.lm_head.weight"] = sd["lm.embed_tokens.weight"]
                _rows_into_tables(sd)
                save_checkpoint(sd, folder, config=self.model.config.to_dict())
                self.tokenizer.save(Path(folder) / "tokenizer.json")
        elif self.dist.is_main and self.lowp_frozen:
            save_checkpoint(self._state_with_frozen_originals(token_rows), folder, config=self.model.config.to_dict())
            self.tokenizer.save(Path(folder) / "tokenizer.json")
        elif self.dist.is_main:
            save_pretrained(self.model, folder, tokenizer=self.tokenizer)
        if self.dist.world_size > 1:
            dist.barrier()

    def _state_with_frozen_originals(self, token_rows=None) -> Dict[str, torch.Tensor]:
        """The model's state dict with the linears :func:`store_frozen_linears` rounded
        replaced by their original values, read from the model folder the run started from
        (a preset or in-memory model has none: then they stay rounded, widened to float32,
        and a line on stdout says so); the trained vocabulary rows (``token_rows``, a
        :class:`~flamingo_rt.models.token_rows.TokenRows`) written over them unrounded."""
        sd = self._frozen_originals(self.model.state_dict())
        if token_rows is not None:
            tied = self.model.lm.lm_head.weight is self.model.lm.embed_tokens.weight
            token_rows.write_into(sd, "lm.embed_tokens.weight", None if tied else "lm.lm_head.weight")
        return sd

    def _frozen_originals(self, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        src = self._source_folder
        if src is None:
            print(f"[train] the final model's {len(self.lowp_frozen)} frozen LM linear tensors hold their "
                  f"{self.frozen_linear_dtype}-rounded values (freeze.frozen_linear_dtype; no source folder "
                  "to restore them from)", flush=True)
            for n in self.lowp_frozen:
                sd[n] = sd[n].float()
            return sd
        from safetensors import safe_open

        want = set(self.lowp_frozen)
        for shard in sorted(Path(src).glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                for name in want.intersection(f.keys()):
                    sd[name] = f.get_tensor(name)
                    want.discard(name)
        if want:
            raise RuntimeError(f"the source model folder {src} lacks {sorted(want)[:3]} "
                               f"({len(want)} frozen tensors) to write back into the final model")
        return sd

    def trainable_summary(self) -> Dict[str, int]:
        """Trainable parameter counts by part (``resampler``, ``xattn``, ``token_rows``,
        ``other``), ``vocab_rows`` (rows of whole tables that train under a gradient mask:
        ``self.rows``, empty unless a subclass or caller sets it),
        ``frozen`` and ``total`` (each parameter once, tied ones included)."""
        parts = {"resampler": 0, "xattn": 0, "token_rows": 0, "other": 0, "vocab_rows": 0, "frozen": 0}
        seen = set()
        for name, p in self.model.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel()
            if not p.requires_grad:
                parts["frozen"] += n
            elif name in self.rows:  # a whole table, trained in some rows (FSDP)
                k = len(self.rows[name]) * math.prod(p.shape[1:])
                parts["vocab_rows"] += k
                parts["frozen"] += n - k
            else:
                parts[next((k for pre, k in _PARTS if name.startswith(pre)), "other")] += n
        parts["total"] = sum(parts.values())
        return parts

    def bad_records(self) -> Dict[str, Dict[str, int]]:
        """Bad records skipped so far, per dataset and reason (up to the last step taken)."""
        return {n: dict(p["bad"]) for n, p in self.stream_positions().items()}

    # ------------------------------------------------------------------ loop
    def close(self) -> None:
        """Destroy the torch.distributed process group if this trainer created it (see
        :func:`~flamingo_rt.runtime.train.distributed.close_distributed`); the trainer
        does no collective afterwards. A no-op in a single process."""
        close_distributed(self.dist)

    def fit(self) -> List[Dict[str, Any]]:
        """Train until ``cfg.steps``; returns the logged records of this call. Writes
        ``out_dir/log.jsonl``, checkpoints every ``checkpoint_every`` steps and at the end,
        and the final model folder ``out_dir/final`` (``save_pretrained``, loadable by
        ``Generator.from_pretrained``)."""
        cfg = self.cfg
        main = self.dist.is_main
        log = MetricsLog(self.out_dir / "log.jsonl", cfg.steps, self.step, cfg.progress and main, enabled=main)
        if self.resumed_from is not None:
            log.message(f"resumed from {self.resumed_from} at step {self.step}")
        t = self.trainable_summary()
        rows = self.model.lm.token_rows
        ids = rows.ids.tolist() if rows is not None else sorted({i for r in self.rows.values() for i in r})
        trained = t["total"] - t["frozen"]
        log.message(f"[train] {trained:,} of {t['total']:,} parameters train: resampler {t['resampler']:,}, "
                    f"cross-attention {t['xattn']:,}, vocabulary rows {t['token_rows'] + t['vocab_rows']:,} "
                    f"(token ids {ids})" + (f", other {t['other']:,}" if t["other"] else ""))
        if self.lowp_frozen:
            log.message(f"[train] {len(self.lowp_frozen)} frozen LM linear tensors stored in {self.frozen_linear_dtype} "
                        f"(freeze.frozen_linear_dtype = {cfg.freeze.frozen_linear_dtype!r}; \"none\" keeps them "
                        "float32)")
        autocast = torch.bfloat16 if cfg.precision == "bf16" else None
        if autocast is not None and cpu_gemm.half_products_slow(self.device, autocast):
            if half_widening.active(self.device, autocast):
                log.message("[train] precision bf16 on a CPU without bf16 product kernels (oneDNN has none for "
                            "it): the products run on bf16-rounded operands widened to float32 "
                            "(ops.half_widening): 12-17% slower than precision fp32 in the connector step measured "
                            "(the products are float32 ones, plus the roundings), so fp32 is the faster choice here")
            else:
                log.message("[train] warning: precision bf16, but bf16 matrix products on this CPU run in torch's "
                            "reference loops (oneDNN has no bf16 kernels for it), ~270x slower than float32, and "
                            "FLAMINGO_RT_WIDEN_HALF=0 keeps them there: precision fp32 is the fast choice here")
        weights = {d.name: d.weight for d in cfg.datasets}
        # the next steps' batches read, decoded and collated in a background thread (on a GPU)
        prefetch = Prefetcher(self._make_step, max(0, cfg.steps - self.step),
                              cfg.resolved_prefetch_steps(self.device.type))
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                batches, targets, tokens = self._take(prefetch.get())
                lr = self.optimizer.param_groups[0]["lr"]
                try:
                    res = train_step(self.wrapped, batches, weights, targets, self.optimizer, self.scheduler,
                                     step=self.step + 1, grad_clip=cfg.optim.grad_clip, autocast_dtype=autocast,
                                     backend=cfg.backend, no_sync=self._no_sync, grad_mask=self.grad_mask,
                                     factored=cfg.optim.factored_grads, cpu_block_cache=cfg.cpu_block_cache)
                except NonFiniteLossError as e:
                    log.message(f"stopped: {e}")
                    raise
                self.step += 1
                dt = time.perf_counter() - t0
                gates = self.gate_values()
                rec = {
                    "step": self.step, "lr": lr, "loss": res.losses,
                    "loss_weighted": sum(weights[n] * v for n, v in res.losses.items()),
                    "grad_norm": res.grad_norm, "tokens": tokens, "tokens_per_s": tokens / dt,
                    "step_time_s": dt, "gates": gates, "bad_records": self.bad_records(),
                }
                self.history.append(rec)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    post = {n[:8]: f"{v:.3f}" for n, v in res.losses.items()}
                    post["tok/s"] = f"{tokens / dt:.0f}"
                    log.log(rec, post)
                log.advance()
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
            self.save_final(self.out_dir / "final")
        finally:
            prefetch.close()
            self._rewind_streams()
            log.close()
        return self.history


def train(cfg: TrainConfig, model: Optional[Flamingo] = None, tokenizer: Optional[FlamingoTokenizer] = None
          ) -> List[Dict[str, Any]]:
    """``Trainer(cfg, model, tokenizer).fit()``, then :meth:`Trainer.close`."""
    trainer = Trainer(cfg, model, tokenizer)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def _rows_into_tables(sd: Dict[str, torch.Tensor]) -> None:
    """A gathered full state dict with ``lm.token_rows.*`` entries (FSDP2, where the rows never
    enter the sharded tables): their values written into ``lm.embed_tokens.weight`` and
    ``lm.lm_head.weight`` (the same tensor when tied), and the entries removed: a plain LM's
    state, as ``token_rows_merged`` gives without FSDP."""
    ids = sd.pop("lm.token_rows.ids", None)
    if ids is None:
        return
    idx = ids.long()
    embed = sd.pop("lm.token_rows.embed")
    head = sd.pop("lm.token_rows.head", None)
    table = sd["lm.embed_tokens.weight"] = sd["lm.embed_tokens.weight"].clone()
    table[idx] = embed.to(table.dtype)
    if head is not None:
        out = sd["lm.lm_head.weight"] = sd["lm.lm_head.weight"].clone()
        out[idx] = head.to(out.dtype)
    elif "lm.lm_head.weight" in sd:
        sd["lm.lm_head.weight"] = table
