"""ctest `beam_search`: the C API's beam search (tests/cpp/test_beam_search, over
csrc/capi/beam_search.cpp) against the Python runtime's (``Generator._beam_search``, pinned to
Hugging Face's by tests/peers/of_generate_parity.py) on 300 scripted next-token distributions
where the end of chunk finishes hypotheses: beam counts, length penalties (negative too),
every early-stopping rule, lengths. The answers must be equal token for token.

    python tests/cpp/run_beam_search_test.py PATH/TO/test_beam_search
"""
from __future__ import annotations

import random
import subprocess
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(ROOT))

from flamingo_rt.runtime import GenerationConfig, Generator  # noqa: E402

V, EOC, PAD, IMG = 64, 1, 2, 0
MASK = (1 << 64) - 1


def scripted_logits(seed: int, bias: float, h) -> torch.Tensor:
    """(V,) logits of a beam whose tokens so far are ``h``: tokens 10..15 and the end of chunk
    (plus ``bias``) in [-3, 3) from an FNV-1a hash of (seed, h, token), the rest -12; the
    same function as test_beam_search.cpp's ``scripted``."""
    out = [-12.0] * V

    def value(v):
        x = 1469598103934665603
        for y in (seed, *h, v):
            x = ((x ^ y) * 1099511628211) & MASK
        return (x >> 40) / 16777216.0 * 6.0 - 3.0

    for v in range(10, 16):
        out[v] = value(v)
    out[EOC] = value(EOC) + bias
    return torch.tensor(out, dtype=torch.float32)


class _Rows:
    def __init__(self, n):
        self.rows = [[] for _ in range(n)]

    def broadcast_from(self, src, repeats=1):
        self.rows = [list(r) for r in src.rows for _ in range(repeats)]

    def select_rows(self, idx, media=True):
        self.rows = [list(self.rows[i]) for i in idx.tolist()]


class Scripted(Generator):
    """The runtime's beam search over scripted logits instead of a model."""

    def __init__(self):  # no model: only what _beam_search reads
        self.tok = types.SimpleNamespace(vocab_size=V, eoc_token_id=EOC, eos_token_id=3, pad_token_id=PAD,
                                         image_token_id=IMG)
        self._banned = [IMG, PAD]
        self.device = torch.device("cpu")

    def _start(self, prompts, cfg, prefix):
        return _Rows(1), [None], scripted_logits(self.seed, self.bias, [])[None]

    def _cache(self, batch):
        return _Rows(batch)

    def _decode(self, cache, tokens):
        for r, t in zip(cache.rows, tokens.tolist()):
            r.append(t)
        return torch.stack([scripted_logits(self.seed, self.bias, r) for r in cache.rows])

    def _finish_text(self, ids, cfg):
        return list(ids)


def main() -> int:
    binary = sys.argv[1]
    gen = Scripted()
    rng = random.Random(7)
    trials, lines = [], []
    for trial in range(int(sys.argv[2]) if len(sys.argv) > 2 else 300):
        K, es = rng.choice([2, 3, 4]), rng.choice([(0, False), (1, True), (2, "never")])
        lp, max_new, bias = rng.choice([-1.0, 0.0, 0.5, 1.0, 2.0]), rng.randint(1, 8), round(rng.uniform(-1.0, 2.5), 3)
        trials.append((trial, K, lp, es[1], max_new, bias))
        lines.append(f"{trial} {K} {lp!r} {es[0]} {max_new} {bias!r} {V} {EOC}")
    r = subprocess.run([binary], input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=240)
    if r.returncode != 0:
        print(f"FAIL test_beam_search exited {r.returncode}: {r.stderr[-1000:]}")
        return 1
    got = [[int(t) for t in line.split()] for line in r.stdout.splitlines()]
    bad, stopped = [], 0
    for (trial, K, lp, es, max_new, bias), theirs in zip(trials, got):
        gen.seed, gen.bias = trial, bias
        cfg = GenerationConfig(max_new_tokens=max_new, num_beams=K, length_penalty=lp, early_stopping=es,
                               stop_on_eoc=True, stop_on_eos=False).validate()
        want = gen._beam_search([None], cfg, None)[0]
        stopped += int(bool(want) and want[-1] == EOC)
        if theirs != want:
            bad.append((trial, K, lp, es, max_new, bias, want, theirs))
    ok = len(got) == len(trials) and not bad and stopped >= 50
    print(f"{'ok  ' if ok else 'FAIL'} {len(trials)} scripted searches, {len(bad)} differ "
          f"({stopped} answers end with the end of chunk)")
    for b in bad[:10]:
        print("  differs:", b)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
