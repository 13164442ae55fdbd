"""The ``flamingo-rt`` command.

    flamingo-rt demo                 few-shot demo on the shipped model (not yet: see below)
    flamingo-rt info [PRESET ...]    parameters and forward FLOPs of presets (meta device)
    flamingo-rt check                build status: C++ extension, backends per op
    flamingo-rt generate MODEL_DIR PROMPT [--image PATH ...]   stream a continuation

    flamingo-rt train CONFIG.{toml,json} [--steps N] [--out-dir D]   train the connectors
                                     (torchrun --nproc_per_node N -m flamingo_rt.cli train ... for DDP)
    flamingo-rt train --preset tiny-world [--out-dir D]   the miniature Flamingo recipe

``eval``, ``ablate`` and ``export`` arrive with the training, demo and C-API
work; until then they say so and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

NOT_YET = {
    "demo": "the few-shot demo needs the shipped model (procedural world + training recipe), which is not built yet",
    "eval": "the evaluation harness is not built yet",
    "ablate": "the ablation runner is not built yet",
    "export": "AOTInductor export and the C API are not built yet",
}


def _info(presets: List[str], seq_len: int, num_media: int) -> int:
    from .models import PRESETS
    from .models.stats import build_meta, count_forward_flops, count_parameters

    names = presets or list(PRESETS)
    print(f"{'preset':<18}{'total':>10}{'vision':>10}{'resampler':>11}{'xattn':>10}{'lm':>10}"
          f"   fwd GFLOP (T={seq_len}, {num_media} image)")
    for name in names:
        if name not in PRESETS:
            print(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}", file=sys.stderr)
            return 2
        model = build_meta(name)
        c = count_parameters(model)
        f = count_forward_flops(model, seq_len=seq_len, num_media=num_media)

        def m(n):
            return f"{n / 1e6:9.1f}M" if n < 1e9 else f"{n / 1e9:9.2f}B"

        print(f"{name:<18}{m(c['total'])}{m(c['vision'])}{m(c['resampler']):>11}{m(c['xattn'])}{m(c['lm'])}"
              f"   {f['total'] / 1e9:,.1f}")
    return 0


def _check() -> int:
    import torch

    from . import _ext
    from .ops import backend

    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    print(f"flamingo_rt._C loaded: {_ext.load()}")
    ops = sorted({k.split('.')[0] for k in backend._IMPLS})
    for op in ops:
        print(f"  {op:<28} backends: {', '.join(backend.implemented(op))}")
    return 0


def _load_media(path: str):
    """An image or clip from a file: ``.npy`` (H, W, C) / (F, H, W, C) / (C, H, W) arrays,
    or any format PIL reads (PIL is optional)."""
    import numpy as np
    import torch

    if path.endswith(".npy"):
        arr = np.load(path, allow_pickle=False)
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            return torch.from_numpy(arr)
        return arr
    try:
        from PIL import Image
    except ImportError:
        raise SystemExit(f"cannot read {path}: only .npy files can be read without PIL installed")
    return Image.open(path)


def _generate(args) -> int:
    import torch

    from .runtime import GenerationConfig, Generator

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    media = [_load_media(p) for p in args.image]
    prompt = args.prompt
    if "<image>" not in prompt and media:
        prompt = "<image>" * len(media) + prompt
    try:
        gen = Generator.from_pretrained(args.model_dir, device=args.device, dtype=dtype, max_media=max(len(media), 1))
    except FileNotFoundError as e:
        print(f"flamingo-rt generate: {e}", file=sys.stderr)
        return 2
    cfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else 1.0, top_k=args.top_k, top_p=args.top_p,
        num_beams=args.num_beams, seed=args.seed, stop_strings=tuple(args.stop),
    )
    try:
        if cfg.num_beams > 1:
            print(gen.generate([prompt, *media], cfg))
        else:
            for piece in gen.stream([prompt, *media], cfg):
                print(piece, end="", flush=True)
            print()
    except ValueError as e:
        print(f"flamingo-rt generate: {e}", file=sys.stderr)
        return 2
    return 0


def _train(args) -> int:
    from pathlib import Path

    if args.preset is not None:
        if args.config is not None:
            print("flamingo-rt train: give a CONFIG file or --preset, not both", file=sys.stderr)
            return 2
        try:
            from .recipe import run_recipe
        except ImportError as e:
            print(f"flamingo-rt train --preset {args.preset}: the recipe is not available ({e})", file=sys.stderr)
            return 2
        out = args.out_dir or f"runs/{args.preset}"
        run_recipe(args.preset, out, seed=args.seed if args.seed is not None else 0, progress=not args.no_progress)
        return 0
    if args.config is None:
        print("flamingo-rt train: expected a CONFIG file (.toml or .json) or --preset NAME", file=sys.stderr)
        return 2
    from .runtime.train import NonFiniteLossError, Trainer, load_train_config

    over = {}
    if args.steps is not None:
        over["steps"] = args.steps
    if args.out_dir is not None:
        over["out_dir"] = str(Path(args.out_dir).resolve())
    if args.seed is not None:
        over["seed"] = args.seed
    if args.no_progress:
        over["progress"] = False
    try:
        cfg = load_train_config(args.config, over)
    except (FileNotFoundError, ValueError) as e:
        print(f"flamingo-rt train: {e}", file=sys.stderr)
        return 2
    try:
        trainer = Trainer(cfg)
        trainer.fit()
    except NonFiniteLossError as e:
        print(f"flamingo-rt train: {e}", file=sys.stderr)
        return 1
    if trainer.dist.is_main:
        bad = {k: v for k, v in trainer.bad_records().items() if v}
        print(f"trained {cfg.steps} steps; model: {Path(cfg.out_dir) / 'final'}; log: {Path(cfg.out_dir) / 'log.jsonl'}"
              + (f"; skipped bad records: {bad}" if bad else ""))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="flamingo-rt", description="Flamingo-style VLM kernels and runtime")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in NOT_YET:
        sub.add_parser(name, help=NOT_YET[name].split(",")[0])
    p_info = sub.add_parser("info", help="parameters and FLOPs of presets")
    p_info.add_argument("presets", nargs="*")
    p_info.add_argument("--seq-len", type=int, default=256)
    p_info.add_argument("--num-media", type=int, default=1)
    sub.add_parser("check", help="extension and backend status")
    p_train = sub.add_parser("train", help="train the connectors on a configured mixture, or run a recipe preset")
    p_train.add_argument("config", nargs="?", help="training config (.toml or .json)")
    p_train.add_argument("--preset", default=None, help="a recipe preset instead of a config (tiny-world)")
    p_train.add_argument("--steps", type=int, default=None)
    p_train.add_argument("--out-dir", default=None)
    p_train.add_argument("--seed", type=int, default=None)
    p_train.add_argument("--no-progress", action="store_true")
    p_gen = sub.add_parser("generate", help="stream a continuation of a prompt with images")
    p_gen.add_argument("model_dir")
    p_gen.add_argument("prompt", help="text; <image> markers place the --image files (default: all first)")
    p_gen.add_argument("--image", action="append", default=[], help="image/clip file (.npy, or PNG/JPEG with PIL)")
    p_gen.add_argument("--max-new-tokens", type=int, default=32)
    p_gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p_gen.add_argument("--top-k", type=int, default=0)
    p_gen.add_argument("--top-p", type=float, default=1.0)
    p_gen.add_argument("--num-beams", type=int, default=1)
    p_gen.add_argument("--seed", type=int, default=None)
    p_gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p_gen.add_argument("--device", default="cpu")
    p_gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    if args.cmd == "generate":
        return _generate(args)
    if args.cmd == "info":
        return _info(args.presets, args.seq_len, args.num_media)
    if args.cmd == "check":
        return _check()
    if args.cmd == "train":
        return _train(args)
    print(f"flamingo-rt {args.cmd}: not yet — {NOT_YET[args.cmd]}.")
    print("What works today: `flamingo-rt info` (presets, parameters, FLOPs), `flamingo-rt check`,")
    print("and the Python API (see README.md: flamingo_rt.models, flamingo_rt.ops, flamingo_rt.io).")
    return 0 if args.cmd == "demo" else 2


if __name__ == "__main__":
    sys.exit(main())
