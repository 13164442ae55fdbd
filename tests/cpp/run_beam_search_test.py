"""ctest `beam_search`: the C API's beam search (tests/cpp/test_beam_search, over
csrc/capi/beam_search.cpp) against the Python runtime's (``Generator._beam_search``, pinned to
Hugging Face's by tests/peers/of_generate_parity.py) on 2000 scripted next-token distributions
where stop tokens (the end of chunk, and in half of them the end of text too) finish
hypotheses: beam counts, length penalties (negative too), every early-stopping rule, lengths.
The answers must be equal token for token. Mutations of beam_search.cpp each change answers
here: the finished beams of an unfinished search not kept (838 of 2000), early_stopping=True
not ending at K finished (36), a stop ranked below the K best kept (HF drops it: 8), the
"never" rule's bound taken at the current length (2).

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

V, EOC, PAD, IMG, EOS = 64, 1, 2, 0, 3
MASK = (1 << 64) - 1


def scripted_logits(seed: int, bias: float, late: float, stops, h) -> torch.Tensor:
    """(V,) logits of a beam whose tokens so far are ``h``: tokens 10..15 and the stop tokens
    (plus ``bias`` at the first step, ``late`` after it) in [-3, 3) from a hash of (seed, h, token)
    (FNV-1a, then MurmurHash3's finalizer), the rest -12; the same function as test_beam_search.cpp's ``scripted``."""
    out = [-12.0] * V

    def value(v):
        x = 1469598103934665603
        for y in (seed, *h, v):
            x = ((x ^ y) * 1099511628211) & MASK
        x = ((x ^ (x >> 33)) * 0xFF51AFD7ED558CCD) & MASK
        x = ((x ^ (x >> 33)) * 0xC4CEB9FE1A85EC53) & MASK
        x ^= x >> 33
        return (x >> 40) / 16777216.0 * 6.0 - 3.0

    for v in range(10, 16):
        out[v] = value(v)
    for s in stops:
        out[s] = value(s) + (late if h else bias)
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
        self.tok = types.SimpleNamespace(vocab_size=V, eoc_token_id=EOC, eos_token_id=EOS, pad_token_id=PAD,
                                         image_token_id=IMG)
        self._banned = [IMG, PAD]
        self.device = torch.device("cpu")

    def _start(self, prompts, cfg, prefix):
        return _Rows(1), [None], scripted_logits(self.seed, self.bias, self.late, self.stops, [])[None]

    def _cache(self, batch):
        return _Rows(batch)

    def _decode(self, cache, tokens):
        for r, t in zip(cache.rows, tokens.tolist()):
            r.append(t)
        return torch.stack([scripted_logits(self.seed, self.bias, self.late, self.stops, r) for r in cache.rows])

    def _finish_text(self, ids, cfg):
        return list(ids)


def main() -> int:
    binary = sys.argv[1]
    gen = Scripted()
    rng = random.Random(7)
    trials, lines = [], []
    for trial in range(int(sys.argv[2]) if len(sys.argv) > 2 else 2000):
        K, es = rng.choice([2, 3, 4]), rng.choice([(0, False), (1, True), (2, "never")])
        lp, max_new, bias = rng.choice([-1.0, 0.0, 0.5, 1.0, 2.0]), rng.randint(1, 8), round(rng.uniform(-1.0, 2.5), 3)
        # half: the end of chunk alone as stop token, equally likely at every step; half: the
        # end of text too, likely at the first step and rarer after it, so that beams go on
        # and grow long (which a positive length penalty favours): with two stop tokens a beam's
        # second stop often ranks below the K best candidates of its step, where HF's rule drops
        # it, and a hypothesis kept against the rule, or an early-stopping rule that ends too
        # soon, ends a search before the longer beams win
        late, eos = (bias, -1) if trial % 2 == 0 else (rng.choice([-6.0, -2.0]), EOS)
        trials.append((trial, K, lp, es[1], max_new, bias, late, eos))
        lines.append(f"{trial} {K} {lp!r} {es[0]} {max_new} {bias!r} {late!r} {V} {EOC} {eos}")
    r = subprocess.run([binary], input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=240)
    if r.returncode != 0:
        print(f"FAIL test_beam_search exited {r.returncode}: {r.stderr[-1000:]}")
        return 1
    got = [[int(t) for t in line.split()] for line in r.stdout.splitlines()]
    bad, stopped = [], 0
    for (trial, K, lp, es, max_new, bias, late, eos), theirs in zip(trials, got):
        gen.seed, gen.bias, gen.late = trial, bias, late
        gen.stops = [EOC] if eos < 0 else [EOC, EOS]
        cfg = GenerationConfig(max_new_tokens=max_new, num_beams=K, length_penalty=lp, early_stopping=es,
                               stop_on_eoc=True, stop_on_eos=eos >= 0).validate()
        want = gen._beam_search([None], cfg, None)[0]
        stopped += int(bool(want) and want[-1] in gen.stops)
        if theirs != want:
            bad.append((trial, K, lp, es, max_new, bias, late, eos, want, theirs))
    ok = len(got) == len(trials) and not bad and stopped >= 50
    print(f"{'ok  ' if ok else 'FAIL'} {len(trials)} scripted searches, {len(bad)} differ "
          f"({stopped} answers end with a stop token)")
    for b in bad[:10]:
        print("  differs:", b)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
