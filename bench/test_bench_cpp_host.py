"""The C++ host (examples/cpp_host over the C API and AOTInductor packages) vs the Python
runtime on the same few-shot prompt (issue 9's benchmark): time to first token (media
encoding + prefill), decode tokens/s and a beam search, side by side, ratios printed.

Needs the CMake build (``./dev cpp`` builds build/cmake/cpp_host). The model: the tiny
NFNet + resampler with a 8-layer, 512-wide LLaMA LM (random weights, gates open), exported
once per run (a few minutes of AOTInductor compilation).
"""
from __future__ import annotations

import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import QUICK

ROOT = Path(__file__).resolve().parents[1]
HOST = ROOT / "build" / "cmake" / "cpp_host"
sys.path.insert(0, str(ROOT / "tests" / "train"))


def _model():
    from flamingo_rt.io.tokenizer import FlamingoTokenizer
    from flamingo_rt.models import Flamingo, get_preset
    from flamingo_rt.world import world_corpus

    tok = FlamingoTokenizer.train_bpe(world_corpus(2000), vocab_size=1024)
    cfg = get_preset("tiny")
    cfg.lm.vocab_size = tok.vocab_size
    cfg.lm.dim, cfg.lm.n_layers, cfg.lm.n_heads, cfg.lm.n_kv_heads = 512, 8, 8, 4
    cfg.lm.intermediate_size = 1376
    cfg.xattn.heads, cfg.xattn.dim_head = 8, 64
    torch.manual_seed(0)
    model = Flamingo(cfg).eval()
    with torch.no_grad():
        for b in model.xattn_blocks():
            b.attn_gate.fill_(0.5)
            b.ff_gate.fill_(0.5)
    return model, tok


def test_cpp_host_vs_python(benchmark, ceilings, report, tmp_path):
    if not HOST.exists():
        pytest.skip(f"{HOST} is missing: run ./dev cpp first")
    if QUICK:
        pytest.skip("a quick run: the export takes minutes (ctest cpp_host runs the host on an export)")
    from flamingo_rt.export import export_model
    from flamingo_rt.runtime import GenerationConfig, Generator

    model, tok = _model()
    export_model(model, tmp_path / "export", tokenizer=tok, max_seq_len=512, max_media=9)
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(9)]
    args, prompt = [], []
    for k, im in enumerate(imgs):
        f = tmp_path / f"{k}.ppm"
        f.write_bytes(b"P6\n64 64\n255\n" + im.tobytes())
        text = "Output: a small red circle left of a large blue square.<|endofchunk|>" if k < 8 else "Output:"
        args += ["--image", f, "--text", text]
        prompt += [im, text]
    n_new = 64
    gen = Generator(model, tok, max_seq_len=512, max_media=9)
    cfg = GenerationConfig(max_new_tokens=n_new, stop_on_eoc=False, stop_on_eos=False)
    cfg1 = GenerationConfig(max_new_tokens=1, stop_on_eoc=False, stop_on_eos=False)

    def python_run():
        t0 = time.perf_counter()
        gen.generate(prompt, cfg1)
        t1 = time.perf_counter()
        out = gen.generate(prompt, cfg)
        t2 = time.perf_counter()
        return out, t1 - t0, (t2 - t1 - (t1 - t0)) / (n_new - 1)

    def host_run():
        r = subprocess.run([str(HOST), str(tmp_path / "export"), *map(str, args), "--max-new-tokens", str(n_new),
                            "--no-stop"], capture_output=True, timeout=600)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        m = re.search(r"stats tokens=(\d+) ttft_s=([\d.]+) decode_s=([\d.]+)", r.stderr.decode())
        n, ttft, dec = int(m.group(1)), float(m.group(2)), float(m.group(3))
        return r.stdout.decode()[:-1], ttft, dec / (n - 1)

    py = [python_run() for _ in range(3)]
    host = [host_run() for _ in range(3)]
    assert host[0][0] == py[0][0], "the host's greedy answer differs from the Python runtime's"
    benchmark.pedantic(host_run, rounds=1, iterations=1)
    p_ttft, p_tok = statistics.median(x[1] for x in py), statistics.median(x[2] for x in py)
    h_ttft, h_tok = statistics.median(x[1] for x in host), statistics.median(x[2] for x in host)
    report.notes.append(f"C++ host vs Python runtime (9 images, {len(tok.encode(' '.join(t for t in prompt if isinstance(t, str))))}"
                        f" text tokens, {n_new} new tokens, {torch.get_num_threads()} threads):")
    report.notes.append(f"  time to first token: host {h_ttft * 1e3:8.1f} ms   python {p_ttft * 1e3:8.1f} ms   "
                        f"ratio python/host {p_ttft / h_ttft:5.2f}x")
    report.notes.append(f"  decode per token:    host {h_tok * 1e3:8.2f} ms   python {p_tok * 1e3:8.2f} ms   "
                        f"ratio python/host {p_tok / h_tok:5.2f}x  ({1 / h_tok:.0f} vs {1 / p_tok:.0f} tokens/s)")
    # beam search (3 beams, 16 tokens, no stop): the host and the Python runtime decode the K
    # beams' rows in one call a token; the decode time of the whole search
    K, n_beam = 3, 16
    cfg_b = GenerationConfig(max_new_tokens=n_beam, num_beams=K, stop_on_eoc=False, stop_on_eos=False)

    def python_beams():
        t0 = time.perf_counter()
        out = gen.generate(prompt, cfg_b)
        return out, time.perf_counter() - t0 - p_ttft

    def host_beams():
        r = subprocess.run([str(HOST), str(tmp_path / "export"), *map(str, args), "--max-new-tokens", str(n_beam),
                            "--no-stop", "--num-beams", str(K)], capture_output=True, timeout=600)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        m = re.search(r"stats tokens=(\d+) ttft_s=([\d.]+) decode_s=([\d.]+)", r.stderr.decode())
        return r.stdout.decode()[:-1], float(m.group(3))

    pb = [python_beams() for _ in range(3)]
    hb = [host_beams() for _ in range(3)]
    assert hb[0][0] == pb[0][0], "the host's beam answer differs from the Python runtime's"
    p_b, h_b = statistics.median(x[1] for x in pb), statistics.median(x[1] for x in hb)
    report.notes.append(f"  beam search ({K} beams, {n_beam} tokens) after the prompt: host {h_b * 1e3:8.1f} ms   "
                        f"python {p_b * 1e3:8.1f} ms   ratio python/host {p_b / h_b:5.2f}x")
    benchmark.extra_info.update(host_ttft_s=h_ttft, python_ttft_s=p_ttft, host_s_per_token=h_tok,
                                python_s_per_token=p_tok, host_beams_s=h_b, python_beams_s=p_b)
