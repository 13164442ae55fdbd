"""The ``flamingo-rt`` command.

    flamingo-rt demo [--model DIR]   few-shot demo on the shipped model (prompts, then an evaluation)
    flamingo-rt eval MODEL_DIR       few-shot evaluation on a task suite (table, JSON)
    flamingo-rt info [PRESET ...]    parameters and forward FLOPs of presets (meta device)
    flamingo-rt check                build status: C++ extension, backends per op
    flamingo-rt generate MODEL_DIR PROMPT [--image PATH ...]   stream a continuation

    flamingo-rt train CONFIG.{toml,json} [--steps N] [--out-dir D]   train the connectors
                                     (torchrun --nproc_per_node N -m flamingo_rt.cli train ... for DDP)
    flamingo-rt train --preset tiny-world [--out-dir D]   the miniature Flamingo recipe

    flamingo-rt export MODEL_DIR OUT_DIR [--device cpu|cuda] [--max-seq-len N] [--max-media M]
                                     AOTInductor packages + tokenizer + manifest for C++ hosts
    flamingo-rt ablate [--model DIR] [--only NAME ...] [--steps N] [--json F]
                                     the paper's ablations in miniature (short stage-3 runs, table)
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

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
    """What this machine and build give flamingo_rt: torch and its devices, the C++ extension
    (or why it did not load), Triton, the CPU's vector units, and per op the backends
    implemented and the one ``auto`` picks on each device type."""
    import importlib.util
    import os

    import torch

    from . import _ext
    from .ops import backend

    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(n_gpu)) or "none visible"
    print(f"torch {torch.__version__} ({build}); CUDA devices: {gpus}")
    if _ext.load():
        kernels = "C++ CPU kernels" + (" and CUDA kernels" if _ext.with_cuda() else " (CUDA kernels not compiled in)")
        print(f"flamingo_rt._C: loaded: {kernels}")
    else:
        print(f"flamingo_rt._C: not loaded ({_ext.error()}): ops run their reference (plain torch) backend; "
              "build it with `pip install --no-build-isolation -e .`")
    if importlib.util.find_spec("triton") is None:
        print("triton: not installed (no triton backend)")
    else:
        import triton

        where = "runs on CUDA GPUs" + ("; TRITON_INTERPRET=1: on the CPU too (slow)"
                                       if os.environ.get("TRITON_INTERPRET") == "1" else "")
        print(f"triton {triton.__version__}: {where}")
    print(f"CPU: {_cpu_features()}; torch threads {torch.get_num_threads()}")
    forced = backend.requested(None)
    print(f"backend: {forced}" + (" (FLAMINGO_RT_BACKEND)" if os.environ.get("FLAMINGO_RT_BACKEND") else ""))
    ops = sorted({k.split('.')[0] for k in backend._IMPLS})
    devices = ("cpu", "cuda")
    rows = [("op", "backends", *(f"on {d}" for d in devices))]
    for op in ops:
        picks = []
        for d in devices:
            try:
                picks.append(backend.resolve(op, None, torch.device(d)))
            except (RuntimeError, ValueError, NotImplementedError):  # a forced backend that cannot run there
                picks.append(f"none ({forced} cannot run)")
        rows.append((op, ", ".join(backend.implemented(op)), *picks))
    widths = [max(len(r[i]) for r in rows) + 2 for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  " + "".join(c.ljust(w) for c, w in zip(r, widths)) + r[-1])
    if n_gpu == 0:
        print("  (no CUDA device here: the cuda column is what a GPU machine with this build would use)")
    return 0


def _cpu_features() -> str:
    """The x86 vector units torch sees (AVX-512 and its bf16 products, AMX tiles), e.g.
    "AVX512, avx512_bf16, no AMX"; torch's capability string elsewhere."""
    import platform

    import torch

    cap = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return cap
    try:
        bf16 = bool(torch.cpu._is_avx512_bf16_supported())
        amx = bool(torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes
        return cap
    return f"{cap}, {'avx512_bf16' if bf16 else 'no avx512_bf16'}, {'AMX tiles' if amx else 'no AMX'}"


def _fail(cmd: str, message: object, code: int = 2) -> int:
    """Print ``flamingo-rt CMD: MESSAGE`` to stderr and return the exit code (2: the
    arguments, inputs or outputs cannot be used; 1: the run itself failed)."""
    print(f"flamingo-rt {cmd}: {message}", file=sys.stderr)
    return code


def _load_media(path: str):
    """An image or clip from a file: ``.npy`` (H, W, C) / (F, H, W, C) / (C, H, W) arrays,
    or any format PIL reads (PIL is optional). Raises ValueError naming the file and the
    reason when it cannot be read (missing, not an image, a pickled .npy)."""
    import os

    import numpy as np
    import torch

    from .io.npy import load_npy

    if not os.path.isfile(path):
        raise ValueError(f"cannot read --image {path!r}: no such file")
    if path.endswith(".npy"):
        try:
            arr = load_npy(path)
        except (OSError, ValueError) as e:  # truncated, not an .npy, or pickled objects
            raise ValueError(f"cannot read --image {path!r} as a numpy array: {e}") from None
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            return torch.from_numpy(arr)
        return arr
    try:
        from PIL import Image
    except ImportError:
        raise ValueError(f"cannot read --image {path!r}: only .npy files can be read without PIL installed") from None
    try:
        img = Image.open(path)
        img.load()  # decode now, so a broken file fails here with its name
    except OSError as e:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read --image {path!r} as an image: {e}") from None
    return img


def _device_problem(device: str) -> Optional[str]:
    """Why ``device`` cannot be used here (None when it can): not a device string, or a
    CUDA device on a machine or build without CUDA, or past the last GPU."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        return f"expected --device like cpu, cuda or cuda:1, got {device!r}"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            return f"--device {device}: {why} (torch {torch.__version__}); use --device cpu"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible"
    return None


def _generate(args) -> int:
    import torch

    from .runtime import GenerationConfig, Generator

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    problem = _device_problem(args.device)
    if problem is None and args.temperature < 0:
        problem = f"expected --temperature >= 0 (0: greedy), got {args.temperature}"
    if problem is not None:
        return _fail("generate", problem)
    try:
        media = [_load_media(p) for p in args.image]
    except ValueError as e:
        return _fail("generate", e)
    _tune_malloc(args)
    prompt = args.prompt
    if "<image>" not in prompt and media:
        prompt = "<image>" * len(media) + prompt
    try:
        gen = Generator.from_pretrained(args.model_dir, device=args.device, dtype=dtype, max_media=max(len(media), 1))
    except (FileNotFoundError, ValueError) as e:  # no folder, no tokenizer, a broken checkpoint
        return _fail("generate", e)
    cfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
        repetition_penalty=args.repetition_penalty, do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else 1.0, top_k=args.top_k, top_p=args.top_p,
        num_beams=args.num_beams, seed=args.seed, stop_strings=tuple(args.stop),
        length_penalty=args.length_penalty,
        early_stopping={"false": False, "true": True, "never": "never"}[args.early_stopping],
    )
    try:
        if args.score:
            for lp, text in zip(gen.score([prompt, *media], args.score), args.score):
                print(f"{lp:.6f}\t{text}")
        elif cfg.num_beams > 1:
            print(gen.generate([prompt, *media], cfg))
        else:
            for piece in gen.stream([prompt, *media], cfg):
                print(piece, end="", flush=True)
            print()
    except ValueError as e:
        return _fail("generate", e)
    return 0


def _output_problem(path: Optional[str], folder: bool) -> Optional[str]:
    """Why ``path`` cannot be written (None when it can, or when no path is given), checked
    before the work so that a bad path fails before minutes of it instead of after: its
    folder (``path`` itself when ``folder``, else its parent) must be a folder already, or
    be makeable inside the nearest existing folder, which must take a new file (a temporary
    one is made there and removed at once). Nothing else is made."""
    import tempfile
    from pathlib import Path

    if path is None:
        return None
    p = Path(path).absolute()
    target = p if folder else p.parent
    if not folder and p.is_dir():
        return f"cannot write {path}: it is a folder"
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot write {path}: {existing} is a file, not a folder"
    try:  # a real probe (os.access says yes to root even where nothing can be made)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        return f"cannot write {path}: {existing} is not writable ({e.strerror or e})"
    return None


def _int_at_least(lo: int):
    """An argparse type: an integer >= ``lo`` (argparse then says which option and exits 2)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {v}")
        return v

    parse.__name__ = f"integer >= {lo}"
    return parse


_POSITIVE, _NON_NEGATIVE = _int_at_least(1), _int_at_least(0)


def _int_list(text: str) -> List[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2,4,8, got {text!r}")


def _eval(args) -> int:
    from .eval import TaskSuite, evaluate
    from .eval.plot import plot_curve

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    tasks = [t for arg in args.tasks for t in arg.split(",") if t]
    for out in (args.json, args.plot):
        problem = _output_problem(out, folder=False)
        if problem is not None:
            return _fail("eval", problem)
    _tune_malloc(args)
    try:
        suite = TaskSuite(tasks=tuple(tasks), shots=tuple(args.shots), episodes=args.episodes, seed=args.seed,
                          split=args.split, format_split=args.format_split, n_way=args.n_way, by=args.by,
                          selection=args.selection, pool=args.pool, num_beams=args.num_beams,
                          length_penalty=args.length_penalty, batch_size=args.batch_size)
        res = evaluate(args.model_dir, suite, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as e:
        return _fail("eval", e)
    print(res.table())
    if args.json:
        print(f"wrote {res.save_json(args.json)}")
    if args.plot:
        print(f"wrote {plot_curve(res, args.plot, title=f'few-shot curve of {args.model_dir}')}")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    color = {"auto": None, "always": True, "never": False}[args.color]
    problem = _output_problem(args.out, folder=True)
    if problem is not None:
        return _fail("demo", problem)
    return run_demo(args.model, out_dir=args.out, episodes=args.episodes, seed=args.seed, color=color,
                    formats=args.formats, threads=args.threads)


def _tune_malloc(args) -> None:
    """Reuse large CPU blocks instead of page-faulting fresh mmaps (process-wide; see
    flamingo_rt.runtime.cpu_malloc) unless --default-malloc."""
    if not args.default_malloc:
        from .runtime import cpu_malloc

        cpu_malloc.keep_freed_memory()


def _add_malloc_flag(p: argparse.ArgumentParser, measured: str) -> None:
    measured = measured.replace("%", "%%")  # argparse formats help strings with %
    p.add_argument("--default-malloc", action="store_true",
                   help="keep glibc's default malloc (by default large CPU blocks are reused instead of mmapped "
                        f"and page-faulted anew each time; {measured}; see flamingo_rt.runtime.cpu_malloc)")


def _train(args) -> int:
    from pathlib import Path

    if args.preset is not None:
        if args.config is not None:
            return _fail("train", "give a CONFIG file or --preset, not both")
        if args.steps is not None:
            return _fail("train", "--steps applies to a CONFIG run; a recipe preset sets the steps of each of its "
                                  "stages (flamingo_rt.recipe.presets)")
        try:
            from .recipe import run_recipe
        except ImportError as e:
            return _fail(f"train --preset {args.preset}", f"the recipe is not available ({e})")
        out = args.out_dir or f"runs/{args.preset}"
        problem = _output_problem(out, folder=True)
        if problem is not None:
            return _fail("train", problem)
        _tune_malloc(args)
        try:
            run_recipe(args.preset, out, seed=args.seed if args.seed is not None else 0, progress=not args.no_progress)
        except ValueError as e:  # e.g. an unknown preset
            return _fail("train", e)
        print(f"recipe {args.preset!r} done; model folder: {out}")
        return 0
    if args.config is None:
        return _fail("train", "expected a CONFIG file (.toml or .json) or --preset NAME")
    from .runtime.train import NonFiniteLossError, NoUsableRecordError, Trainer, load_train_config

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
        return _fail("train", e)
    _tune_malloc(args)
    try:
        trainer = Trainer(cfg)  # opens the model folder and the datasets, makes out_dir
    except (ValueError, OSError) as e:
        return _fail("train", e)
    try:
        trainer.fit()
    except (NonFiniteLossError, NoUsableRecordError) as e:
        return _fail("train", e, code=1)
    finally:
        trainer.close()
    if trainer.dist.is_main:
        bad = {k: v for k, v in trainer.bad_records().items() if v}
        print(f"trained {cfg.steps} steps; model: {Path(cfg.out_dir) / 'final'}; log: {Path(cfg.out_dir) / 'log.jsonl'}"
              + (f"; skipped bad records: {bad}" if bad else ""))
    if trainer.dist.world_size > 1:  # a finished rank must not abort in torch's teardown at exit
        from .runtime.train.distributed import exit_distributed_process

        exit_distributed_process(0)
    return 0


def _export(args) -> int:
    from pathlib import Path

    from .export import export_model

    if not (Path(args.model_dir) / "config.json").is_file():
        return _fail("export", f"{args.model_dir} is not a model folder (no config.json)")
    problem = _device_problem(args.device)
    if problem is not None:
        return _fail("export", problem)
    try:
        man = export_model(args.model_dir, args.out_dir, device=args.device, max_seq_len=args.max_seq_len,
                           max_media=args.max_media, max_frames=args.max_frames, max_beams=args.max_beams,
                           progress=True)
    except (ValueError, OSError) as e:  # OSError: an output folder that cannot be made
        return _fail("export", e)
    print(f"exported to {args.out_dir}: {', '.join(man['packages'].values())}, tokenizer.json, manifest.json "
          f"(compile {sum(man['compile_seconds'].values()):.0f} s)")
    return 0


def _ablate(args) -> int:
    from .demo import DEFAULT_MODEL
    from .recipe.ablate import ABLATIONS, format_table, run_ablations, save_json

    model = args.model or str(DEFAULT_MODEL)
    names = [n for arg in args.only for n in arg.split(",") if n] if args.only else None
    problem = _output_problem(args.json, folder=False)
    if problem is not None:
        return _fail("ablate", problem)
    steps = args.steps or f"the {args.preset} preset's"
    print(f"ablations of stage 3 on the backbones of {model}: {', '.join(names or ABLATIONS)}; "
          f"{steps} steps each, scored on {args.episodes} held-out queries per cell", flush=True)

    def on_row(row):
        print(f"  {row.name}: score {100 * row.score:.1f}% in {row.train_seconds:.0f} s", flush=True)

    try:
        rows = run_ablations(model, preset=args.preset, names=names, steps=args.steps or None, seed=args.seed,
                             episodes=args.episodes, shots=tuple(args.shots), by=args.by, eval_seed=args.eval_seed,
                             progress=not args.no_progress, num_threads=args.threads or None, on_row=on_row)
    except (FileNotFoundError, ValueError) as e:
        return _fail("ablate", e)
    print(format_table(rows))
    if args.json:
        path = save_json(rows, args.json, model=model, preset=args.preset, seed=args.seed, eval_seed=args.eval_seed,
                         steps=args.steps, shots=list(args.shots), episodes=args.episodes, by=args.by)
        print(f"wrote {path}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="flamingo-rt", description="Flamingo-style VLM kernels and runtime")
    sub = parser.add_subparsers(dest="cmd", required=True)
    from .eval.suite import DEFAULT_SHOTS, DEFAULT_TASKS
    from .world.episodes import CLASSIFY_BY

    p_demo = sub.add_parser("demo", help="few-shot demo on the shipped model (prompts, then an evaluation)")
    p_demo.add_argument("--model", default=None, help="model folder (default: the shipped flamingo_rt/assets/tiny-world)")
    p_demo.add_argument("--out", default="demo_out", help="folder for the PNGs and eval.json (default demo_out/)")
    p_demo.add_argument("--episodes", type=_POSITIVE, default=12, help="queries per task and shot count in the evaluation")
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--formats", default="train", choices=["train", "heldout"],
                        help="phrasings of the held-out episodes (default: the training ones)")
    p_demo.add_argument("--color", default="auto", choices=["auto", "always", "never"],
                        help="24-bit colour pictures in the terminal (auto: when stdout is a terminal)")
    p_demo.add_argument("--threads", type=_POSITIVE, default=1, help="torch CPU threads (the tiny model gains nothing from more)")
    p_eval = sub.add_parser("eval", help="few-shot evaluation of a model folder on a task suite")
    p_eval.add_argument("model_dir")
    p_eval.add_argument("--tasks", nargs="+", default=[",".join(DEFAULT_TASKS)],
                        help=f"world tasks, space- or comma-separated (default {','.join(DEFAULT_TASKS)})")
    p_eval.add_argument("--shots", type=_int_list, default=list(DEFAULT_SHOTS),
                        help="shot counts, e.g. 0,1,2,4,8 (for classify: examples of each class)")
    p_eval.add_argument("--episodes", type=_POSITIVE, default=20, help="queries per task (the same for every shot count)")
    p_eval.add_argument("--selection", default="random", choices=["random", "rices"],
                        help="support examples: random, or RICES (nearest images by vision features)")
    p_eval.add_argument("--pool", type=_POSITIVE, default=None,
                        help="support pool per query (per class for classify); default max shots (x4 for rices)")
    p_eval.add_argument("--seed", type=int, default=0)
    p_eval.add_argument("--split", default="heldout", choices=["heldout", "train"])
    p_eval.add_argument("--format-split", default=None, choices=["heldout", "train"],
                        help="phrasings (default: those of --split)")
    p_eval.add_argument("--n-way", type=_int_at_least(2), default=5, help="classes of a classify episode")
    p_eval.add_argument("--by", default="shape", choices=list(CLASSIFY_BY), help="what a classify class is")
    p_eval.add_argument("--num-beams", type=_POSITIVE, default=1, help="1: greedy decoding; > 1: beam search")
    p_eval.add_argument("--length-penalty", type=float, default=0.0,
                        help="beam search: finished beams rank by log-likelihood / length ** this (default 0, "
                             "as open_flamingo's evaluation)")
    p_eval.add_argument("--batch-size", type=_POSITIVE, default=8,
                        help="queries run together: generated as one batch, or their candidates scored as one; "
                             "their media encoded once across the shot counts")
    p_eval.add_argument("--json", default=None, help="write the results (cells and per-query records) here")
    p_eval.add_argument("--plot", default=None, help="write the few-shot curve (PNG) here")
    p_eval.add_argument("--threads", type=_NON_NEGATIVE, default=0, help="torch CPU threads (0: torch's default)")
    p_eval.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_malloc_flag(p_eval, "dm_nfnet_f0's frozen forward 7% faster")
    p_info = sub.add_parser("info", help="parameters and FLOPs of presets")
    p_info.add_argument("presets", nargs="*")
    p_info.add_argument("--seq-len", type=_POSITIVE, default=256)
    p_info.add_argument("--num-media", type=_POSITIVE, default=1)
    sub.add_parser("check", help="extension and backend status")
    p_train = sub.add_parser("train", help="train the connectors on a configured mixture, or run a recipe preset")
    p_train.add_argument("config", nargs="?", help="training config (.toml or .json)")
    p_train.add_argument("--preset", default=None, help="a recipe preset instead of a config (tiny-world)")
    p_train.add_argument("--steps", type=_POSITIVE, default=None,
                         help="optimizer steps (overrides the config's; not with --preset)")
    p_train.add_argument("--out-dir", default=None)
    p_train.add_argument("--seed", type=int, default=None)
    p_train.add_argument("--no-progress", action="store_true")
    _add_malloc_flag(p_train, "a bf16 connector step 4.5 -> 3.65 s")
    p_exp = sub.add_parser("export", help="AOTInductor packages of a model folder for C++ hosts")
    p_exp.add_argument("model_dir")
    p_exp.add_argument("out_dir")
    p_exp.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p_exp.add_argument("--max-seq-len", type=_POSITIVE, default=512, help="KV cache slots of a session")
    p_exp.add_argument("--max-media", type=_POSITIVE, default=16, help="media slots of a session")
    p_exp.add_argument("--max-frames", type=_POSITIVE, default=None, help="most frames per clip (default: trained count or 8)")
    p_exp.add_argument("--max-beams", type=_POSITIVE, default=8, help="most beams a host's beam search may use (default 8)")
    p_gen = sub.add_parser("generate", help="stream a continuation of a prompt with images")
    p_gen.add_argument("model_dir")
    p_gen.add_argument("prompt", help="text; <image> markers place the --image files (default: all first)")
    p_gen.add_argument("--image", action="append", default=[], help="image/clip file (.npy, or PNG/JPEG with PIL)")
    p_gen.add_argument("--max-new-tokens", type=_POSITIVE, default=32)
    p_gen.add_argument("--min-new-tokens", type=_NON_NEGATIVE, default=0,
                       help="no stop token before this many tokens")
    p_gen.add_argument("--repetition-penalty", type=float, default=1.0, help=">= 1 (1: off)")
    p_gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p_gen.add_argument("--top-k", type=_NON_NEGATIVE, default=0)
    p_gen.add_argument("--top-p", type=float, default=1.0)
    p_gen.add_argument("--num-beams", type=_POSITIVE, default=1)
    p_gen.add_argument("--length-penalty", type=float, default=1.0,
                       help="beam search: finished beams rank by log-likelihood / length ** this")
    p_gen.add_argument("--early-stopping", default="false", choices=["false", "true", "never"],
                       help="beam search: when a prompt's search ends once num-beams beams have finished, as "
                            "Hugging Face's generate (false: when no live beam is likely to do better; true: at "
                            "once; never: when none can)")
    p_gen.add_argument("--seed", type=int, default=None)
    p_gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p_gen.add_argument("--score", action="append", default=[], metavar="TEXT",
                       help="instead of generating, print the log-likelihood of each candidate continuation "
                            "(repeatable), one 'LOGPROB<TAB>TEXT' line each, as cpp_host --score")
    p_gen.add_argument("--device", default="cpu")
    p_gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    _add_malloc_flag(p_gen, "dm_nfnet_f0's frozen forward 7% faster")
    p_abl = sub.add_parser("ablate", help="the paper's ablations in miniature: short stage-3 runs, one change each")
    p_abl.add_argument("--model", default=None,
                       help="model folder whose NFNet, LM and tokenizer are the frozen backbones (default: the shipped one)")
    p_abl.add_argument("--only", nargs="+", default=None,
                       help="ablations to run, space- or comma-separated (default: all; baseline, no_tanh_gating, "
                            "all_previous_images, mlp_resampler, xattn_every_2nd_layer, unfrozen_lm)")
    p_abl.add_argument("--preset", default="tiny-world", help="recipe preset whose stage-3 settings every run uses")
    p_abl.add_argument("--steps", type=_NON_NEGATIVE, default=400,
                       help="stage-3 steps per run (default 400: a quarter of the tiny-world recipe's stage 3; 0: the preset's)")
    p_abl.add_argument("--episodes", type=_POSITIVE, default=40, help="held-out queries per task and shot count")
    p_abl.add_argument("--shots", type=_int_list, default=[0, 1, 2, 4], help="shot counts of the evaluation")
    p_abl.add_argument("--by", default="colour", choices=list(CLASSIFY_BY), help="what a naming class is")
    p_abl.add_argument("--seed", type=int, default=0, help="seed of the data pools, batches and connector init")
    p_abl.add_argument("--eval-seed", type=int, default=100, help="seed of the held-out evaluation episodes")
    p_abl.add_argument("--threads", type=_NON_NEGATIVE, default=1, help="torch CPU threads (0: keep torch's)")
    p_abl.add_argument("--json", default=None, help="write the rows here")
    p_abl.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.cmd == "ablate":
        return _ablate(args)
    if args.cmd == "generate":
        return _generate(args)
    if args.cmd == "eval":
        return _eval(args)
    if args.cmd == "demo":
        return _demo(args)
    if args.cmd == "info":
        return _info(args.presets, args.seq_len, args.num_media)
    if args.cmd == "check":
        return _check()
    if args.cmd == "train":
        return _train(args)
    return _export(args)


if __name__ == "__main__":
    sys.exit(main())
