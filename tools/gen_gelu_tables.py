"""Fits the piecewise polynomials of csrc/cpu/gelu_avx512.h and prints its two tables.

GELU(v) = v * Phi(v) and GELU'(v) = Phi(v) + v * phi(v) on [-4, 6) in 20 intervals of
width 0.5; on interval k the local coordinate is x = 2 (v + 4) - k in [0, 1) and each
function is a degree-6 polynomial in x. Phi is fitted for relative error (weights 1 / Phi,
so the negative tail keeps its relative accuracy), GELU' for absolute error; each fit is a
least-squares fit on 200 Chebyshev nodes reweighted toward minimax (Lawson iterations),
rounded to float32. Entry 20 (v >= 6, and the clamp of larger v) is the constant 1:
Phi(6) = 1 - 1e-9 and GELU'(6) = 1 + 3.6e-8, both 1 in float32 to within an ulp. Below -4
the kernel takes the erfc path of cpu_act.h for the whole vector.

Checked here, evaluated as the kernel evaluates it (float32 Horner with fused
multiply-adds): Phi's largest relative error on [-4, 6) and GELU''s largest absolute
error, printed after the tables (measured: 9.0e-7 at -4, 3.5e-7 above -3.5; 2.3e-7).

Run: python tools/gen_gelu_tables.py  (needs numpy and scipy)
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtr

LO, WIDTH, INTERVALS, DEGREE = -4.0, 0.5, 20, 6


def phi(v):
    return np.exp(-0.5 * v * v) / math.sqrt(2 * math.pi)


def gelu_cdf(v):
    return ndtr(v)


def gelu_grad(v):
    return ndtr(v) + v * phi(v)


def fit(f, relative: bool) -> np.ndarray:
    """(INTERVALS, DEGREE + 1) float32 coefficients, lowest power first."""
    m = 200
    x = 0.5 - 0.5 * np.cos(np.pi * (np.arange(m) + 0.5) / m)
    vander = np.vander(x, DEGREE + 1, increasing=True)
    out = []
    for k in range(INTERVALS):
        y = f(LO + (k + x) * WIDTH)
        w = 1 / np.abs(y) if relative else np.ones_like(y)
        c, *_ = np.linalg.lstsq(vander * w[:, None], y * w, rcond=None)
        for _ in range(30):
            e = np.abs(vander @ c - y) * w
            r = np.sqrt(e / e.max() + 1e-3)
            c, *_ = np.linalg.lstsq(vander * (w * r)[:, None], y * w * r, rcond=None)
        out.append(c.astype(np.float32))
    return np.array(out)


def evaluate(tab: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The kernel's evaluation in float32 (a fused multiply-add is exact in float64 here)."""
    v = v.astype(np.float32)
    u = np.float32(2) * v + np.float32(-2 * LO)
    u = np.clip(u, 0, np.float32(INTERVALS + 0.5)).astype(np.float32)
    i = np.floor(u).astype(np.int64)
    x = (u - i.astype(np.float32)).astype(np.float32)
    full = np.concatenate([tab, np.array([[1] + [0] * DEGREE], np.float32)])
    c = full[i]
    p = c[:, DEGREE]
    for d in range(DEGREE - 1, -1, -1):
        p = (p.astype(np.float64) * x + c[:, d]).astype(np.float32)
    return p


def table_text(name: str, tab: np.ndarray) -> str:
    full = np.zeros((DEGREE + 1, 32), np.float32)
    full[:, :INTERVALS] = tab.T
    full[0, INTERVALS] = 1.0
    lines = [f"alignas(64) inline const float {name}[{DEGREE + 1}][32] = {{"]
    for d in range(DEGREE + 1):
        vals = [f"{float(v):.9e}f" for v in full[d]]
        lines.append(f"  {{  // x^{d}")
        lines += ["    " + ", ".join(vals[i:i + 4]) + "," for i in range(0, 32, 4)]
        lines.append("  },")
    lines.append("};")
    return "\n".join(lines)


def main() -> None:
    cdf, grad = fit(gelu_cdf, True), fit(gelu_grad, False)
    print(table_text("kPhi", cdf))
    print(table_text("kGrad", grad))
    v = np.linspace(LO, LO + INTERVALS * WIDTH, 4_000_001)[:-1]
    rel = np.abs(evaluate(cdf, v) - gelu_cdf(v)) / gelu_cdf(v)
    ab = np.abs(evaluate(grad, v) - gelu_grad(v))
    print(f"// Phi: largest relative error {rel.max():.2e} (at {v[rel.argmax()]:.4f}); "
          f"GELU': largest absolute error {ab.max():.2e} (at {v[ab.argmax()]:.4f})")


if __name__ == "__main__":
    main()
