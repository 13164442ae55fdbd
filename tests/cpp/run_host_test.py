"""ctest `cpp_host`: export a small model, run the C++ host (examples/cpp_host) on few-shot
prompts and compare its answers with the Python runtime's, token for token; check that no
libpython is in the host process; check the error paths; run tests/cpp/test_capi on the
export when given.

    python tests/cpp/run_host_test.py PATH/TO/cpp_host WORK_DIR [--export-dir DIR] [--capi-test PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(ROOT))  # after site-packages: the source folder kernels/ must not shadow PyPI's `kernels`
sys.path.insert(0, str(ROOT / "tests" / "train"))

from world_fixture import FRAMES, make_world  # noqa: E402

from flamingo_rt.io.pretrained import load_pretrained  # noqa: E402
from flamingo_rt.runtime import GenerationConfig, Generator  # noqa: E402

FAILURES = []


def check(cond: bool, what: str) -> None:
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        FAILURES.append(what)


def write_ppm(path: Path, img: np.ndarray) -> Path:
    h, w, _ = img.shape
    path.write_bytes(f"P6\n{w} {h}\n255\n".encode() + img.astype(np.uint8).tobytes())
    return path


def run_host(host: str, export: Path, args, env=None):
    """Run the host; it must leave nothing in its TMPDIR (the packages' extraction folders
    are removed when the model is freed, on every exit path)."""
    tmp = Path(export).parent / "host_tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    e = dict(os.environ, TMPDIR=str(tmp), **(env or {}))
    r = subprocess.run([host, str(export), *map(str, args)], capture_output=True, env=e, timeout=300)
    left = sorted(x.name for x in tmp.iterdir())
    check(not left, f"host {' '.join(map(str, args))[:80]!r} (exit {r.returncode}) left {left} in its TMPDIR")
    # bytes, decoded without newline translation (answers of a random model contain \r)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode("utf-8"), r.stderr.decode("utf-8"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("work")
    ap.add_argument("--export-dir", default=None, help="reuse an export of the world model (skip exporting)")
    ap.add_argument("--capi-test", default=None, help="tests/cpp/test_capi's executable, run on the export")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    p = make_world(work / "world")
    model, tok = load_pretrained(p["model"])
    with torch.no_grad():  # the same gates as tests/test_export.py: the media matter
        for i, b in enumerate(model.xattn_blocks()):
            b.attn_gate.fill_(0.8 - 0.3 * i)
            b.ff_gate.fill_(0.5)
    export = Path(a.export_dir) if a.export_dir else work / "export"
    if not a.export_dir:
        from flamingo_rt.export import export_model

        shutil.rmtree(export, ignore_errors=True)
        export_model(model, export, tokenizer=tok, max_seq_len=96, max_media=4)
    gen = Generator(model.eval(), tok, max_seq_len=96, max_media=4)
    rng = np.random.default_rng(0)

    # few-shot prompts: images of other sizes than the model's (resized on both sides)
    case_images = []
    for case in range(3):
        imgs = [rng.integers(0, 256, (24 + 8 * k, 40 - 4 * k, 3), dtype=np.uint8) for k in range(3)]
        files = [write_ppm(work / f"c{case}_{k}.ppm", im) for k, im in enumerate(imgs)]
        case_images.append((imgs, files))
        prompt = [imgs[0], "a red circle.<|endofchunk|>", imgs[1], "a blue star.<|endofchunk|>", imgs[2], "a"]
        want = gen.generate(prompt, GenerationConfig(max_new_tokens=10))
        r = run_host(a.host, export, ["--image", files[0], "--text", "a red circle.<|endofchunk|>", "--image", files[1],
                                      "--text", "a blue star.<|endofchunk|>", "--image", files[2], "--text", "a",
                                      "--max-new-tokens", 10], env={"FLAMINGO_RT_CHECK_NO_PYTHON": "1"})
        check(r.returncode == 0, f"case {case}: host exits 0 ({r.stderr.strip()[-300:]})")
        check(r.stdout == want + "\n", f"case {case}: host answer {r.stdout!r} == Python runtime {want + chr(10)!r}")
    # beam search: the runtime's generate(num_beams=K), Hugging Face's rules, over length
    # penalties, early-stopping rules and stops
    es_value = {"false": False, "true": True, "never": "never"}
    for case, (k, lp, es, stop) in enumerate([(3, 1.0, "false", True), (2, 0.0, "true", True), (3, 1.0, "never", True),
                                              (4, 1.0, "false", False)]):
        imgs, files = case_images[case % 3]
        prompt = [imgs[0], "a red circle.<|endofchunk|>", imgs[1], "a blue star.<|endofchunk|>", imgs[2], "a"]
        want = gen.generate(prompt, GenerationConfig(max_new_tokens=10, num_beams=k, length_penalty=lp,
                                                     early_stopping=es_value[es], stop_on_eoc=stop, stop_on_eos=stop))
        r = run_host(a.host, export, ["--image", files[0], "--text", "a red circle.<|endofchunk|>", "--image", files[1],
                                      "--text", "a blue star.<|endofchunk|>", "--image", files[2], "--text", "a",
                                      "--max-new-tokens", 10, "--num-beams", k, "--length-penalty", lp,
                                      "--early-stopping", es, *([] if stop else ["--no-stop"])])
        check(r.returncode == 0 and r.stdout == want + "\n",
              f"beams {k}, length_penalty {lp}, early_stopping {es}, stops {stop}: host {r.stdout!r} == Python "
              f"{want + chr(10)!r} ({r.stderr.strip()[-200:]})")
    # a conversation: three turns, the answers stay in the context (the runtime's Session)
    for max_new in (3, 10):
        imgs, files = case_images[0]
        sess = gen.session()
        want = [sess.append(imgs[0], "a red circle.<|endofchunk|>", imgs[1], "a").generate(max_new_tokens=max_new),
                sess.append(" and", imgs[2], "a").generate(max_new_tokens=max_new),
                sess.append(" then").generate(max_new_tokens=max_new)]
        r = run_host(a.host, export, ["--max-new-tokens", max_new, "--image", files[0], "--text",
                                      "a red circle.<|endofchunk|>", "--image", files[1], "--text", "a", "--generate",
                                      "--text", " and", "--image", files[2], "--text", "a", "--generate", "--text", " then"])
        check(r.returncode == 0 and r.stdout == "\n".join(want) + "\n" and r.stderr.count("stats tokens=") == 3,
              f"conversation, {max_new} tokens a turn: host {r.stdout!r} == Python Session {want!r}")
    # scoring candidates (few-shot classification): the runtime's Generator.score
    imgs, files = case_images[1]
    cands = ["a red circle.", "a blue star.", "a", " green"]
    want = gen.score([imgs[0], "a red circle.<|endofchunk|>", imgs[1], "a"], cands)
    r = run_host(a.host, export, ["--image", files[0], "--text", "a red circle.<|endofchunk|>", "--image", files[1],
                                  "--text", "a", *[x for c in cands for x in ("--score", c)]])
    got = [float(line.split("\t")[0]) for line in r.stdout.splitlines()]
    check(r.returncode == 0 and len(got) == len(cands) and all(abs(g - w) < 2e-3 for g, w in zip(got, want))
          and [line.split("\t", 1)[1] for line in r.stdout.splitlines()] == cands,
          f"scores: host {got} == Python {[round(w, 6) for w in want]}")
    # an export made before the score step (none in its manifest): the candidates run a token
    # at a time through the decode step, with the same scores
    before = work / "export-without-score-step"
    shutil.rmtree(before, ignore_errors=True)
    before.mkdir()
    man = json.loads((export / "manifest.json").read_text())
    for f in export.iterdir():
        if f.name not in ("manifest.json", man["packages"].get("score_step")):
            (before / f.name).symlink_to(f.resolve())
    man["packages"].pop("score_step", None)
    (before / "manifest.json").write_text(json.dumps(man))
    r = run_host(a.host, before, ["--image", files[0], "--text", "a red circle.<|endofchunk|>", "--image", files[1],
                                  "--text", "a", *[x for c in cands for x in ("--score", c)]])
    got_old = [float(line.split("\t")[0]) for line in r.stdout.splitlines()]
    check(r.returncode == 0 and len(got_old) == len(cands) and all(abs(g - w) < 2e-3 for g, w in zip(got_old, want)),
          f"scores of an export without a score step: host {got_old} == Python {[round(w, 6) for w in want]}")
    # a clip
    clip = rng.integers(0, 256, (FRAMES, 32, 32, 3), dtype=np.uint8)
    frames = [write_ppm(work / f"f{k}.ppm", fr) for k, fr in enumerate(clip)]
    want = gen.generate([clip, "a square"], GenerationConfig(max_new_tokens=8))
    r = run_host(a.host, export, ["--clip", FRAMES, *frames, "--text", "a square", "--max-new-tokens", 8])
    check(r.returncode == 0 and r.stdout == want + "\n", f"clip: host {r.stdout!r} == Python {want + chr(10)!r}")
    # media queued together and encoded at the run in runs of one frame count: an image, the
    # clip, two images (three encoder calls: 1 image, the clip, 2 images)
    imgs, files = case_images[2]
    want = gen.generate([imgs[0], "a", clip, "a square.<|endofchunk|>", imgs[1], imgs[2], "a"],
                        GenerationConfig(max_new_tokens=8))
    r = run_host(a.host, export, ["--image", files[0], "--text", "a", "--clip", FRAMES, *frames, "--text",
                                  "a square.<|endofchunk|>", "--image", files[1], "--image", files[2], "--text", "a",
                                  "--max-new-tokens", 8])
    check(r.returncode == 0 and r.stdout == want + "\n",
          f"images and a clip in one prompt: host {r.stdout!r} == Python {want + chr(10)!r}")
    # an export of the version before the batched encoder is refused with a clear message
    old = work / "export-version-1"
    shutil.rmtree(old, ignore_errors=True)
    old.mkdir()
    for f in export.iterdir():
        if f.name != "manifest.json":
            (old / f.name).symlink_to(f.resolve())
    (old / "manifest.json").write_text(json.dumps(dict(json.loads((export / "manifest.json").read_text()),
                                                       manifest_version=1)))
    r = run_host(a.host, old, ["--text", "a"])
    check(r.returncode == 3 and "manifest_version 2, got 1" in r.stderr and "re-export" in r.stderr,
          f"a version 1 export -> FLAMINGO_ERR_FORMAT (3): {r.stderr.strip()[:200]}")
    # stop strings: the answer ends before the first occurrence, on both sides
    full = gen.generate([clip, "a square"], GenerationConfig(max_new_tokens=8))
    if len(full) >= 3:
        stop = full[1:3]
        r = run_host(a.host, export, ["--clip", FRAMES, *frames, "--text", "a square", "--max-new-tokens", 8,
                                      "--stop", stop])
        check(r.returncode == 0 and r.stdout == full[: full.index(stop)] + "\n", f"stop string {stop!r}: {r.stdout!r}")
    # the callback stops the generation: the first pieces only, exit 0, no crash; the
    # session then continues (the same host process generates nothing more here)
    r_all = run_host(a.host, export, ["--clip", FRAMES, *frames, "--text", "a square", "--max-new-tokens", 8, "--no-stop"])
    r = run_host(a.host, export, ["--clip", FRAMES, *frames, "--text", "a square", "--max-new-tokens", 8, "--no-stop",
                                  "--stop-after-pieces", 2])
    check(r.returncode == 0 and "stopped by the callback" in r.stderr and r.stdout[:-1] != ""
          and r_all.stdout.startswith(r.stdout[:-1]) and len(r.stdout) < len(r_all.stdout),
          f"callback stop after 2 pieces: {r.stdout!r} is a proper prefix of {r_all.stdout!r}")
    # no Python in the host
    ldd = subprocess.run(["ldd", a.host], capture_output=True, text=True).stdout
    check("libpython" not in ldd, "ldd cpp_host lists no libpython")

    # error paths: status codes and messages
    r = run_host(a.host, work / "nope", ["--text", "a"])
    check(r.returncode == 2 and "manifest.json" in r.stderr, f"missing folder -> FLAMINGO_ERR_IO (2): {r.stderr.strip()}")
    bad = work / "corrupt"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(export, bad)
    data = (bad / "token_step.pt2").read_bytes()
    (bad / "token_step.pt2").write_bytes(data[: len(data) // 3])
    r = run_host(a.host, bad, ["--text", "a"])
    check(r.returncode == 3 and "token_step.pt2" in r.stderr, f"corrupted package -> FLAMINGO_ERR_FORMAT (3): {r.stderr.strip()[:200]}")
    man = json.loads((export / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps(dict(man, torch_version="1.13.1")))
    r = run_host(a.host, bad, ["--text", "a"])
    check(r.returncode == 3 and "exported with torch 1.13.1" in r.stderr and "re-export" in r.stderr,
          f"an export of another torch release -> 3: {r.stderr.strip()[:200]}")
    (bad / "manifest.json").write_text("{not json")
    r = run_host(a.host, bad, ["--text", "a"])
    check(r.returncode == 3 and "manifest.json" in r.stderr, f"corrupted manifest -> 3: {r.stderr.strip()[:200]}")
    five = ["--image", work / "c0_0.ppm"] * 5
    r = run_host(a.host, export, five + ["--text", "a"])
    check(r.returncode == 4 and "max_media = 4" in r.stderr, f"5 images for 4 slots -> FLAMINGO_ERR_CAPACITY (4): {r.stderr.strip()}")
    r = run_host(a.host, export, ["--text", "a " * 200])
    check(r.returncode == 4 and "max_seq_len = 96" in r.stderr, f"prompt too long -> 4: {r.stderr.strip()}")
    r = run_host(a.host, export, ["--clip", FRAMES + 1, *(frames + frames[:1]), "--text", "a"])
    check(r.returncode == 1 and "at most" in r.stderr, f"clip too long -> FLAMINGO_ERR_INVALID_ARGUMENT (1): {r.stderr.strip()}")
    r = run_host(a.host, export, [])
    check(r.returncode == 1 and "nothing to generate" in r.stderr, f"empty prompt -> 1: {r.stderr.strip()}")
    if a.capi_test:
        r = subprocess.run([a.capi_test, str(export)], capture_output=True, text=True, timeout=600)
        print(r.stdout, end="")
        check(r.returncode == 0, f"test_capi exits 0 (exit {r.returncode}; {r.stderr.strip()[-500:]})")
    print(f"{len(FAILURES)} failure(s)")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
