#!/usr/bin/python3
"""Derives the polynomial coefficients of the vectorised f32 Gaussian CDF (tensor/cpu/vec_math.h, gelu_f32).

    z < 0.5:  erf(z)  = z * P(z^2)                       P of degree 4
    z >= 0.5: erfc(z) = exp(-z^2) * t * H(t), t = 1/(1 + z/2)   H of degree 9

(the t substitution is the one of Numerical Recipes' erfcc; the coefficients are fitted here). Each polynomial
is a minimax fit of the relative error by Lawson's iteratively reweighted least squares against mpmath at 30
digits, then rounded to f32; the error printed is that of the rounded coefficients evaluated by f32 Horner
with FMA. Needs numpy and mpmath (dev only: /usr/bin/python3 on Debian). Prints the C++ initialisers.
"""
import mpmath as mp
import numpy as np

mp.mp.dps = 30
SPLIT = 0.5


def lawson(xs, f, deg, iters=200):
    a = np.vstack([xs**k for k in range(deg + 1)]).T
    w = np.ones_like(xs)
    for _ in range(iters):
        sw = np.sqrt(w)
        c, *_ = np.linalg.lstsq(a * (sw / f)[:, None], sw, rcond=None)
        w = w * np.abs(a @ c - f) / np.abs(f)
        w /= w.sum()
    return c


def horner_f32(c, x):
    x = np.float32(x)
    p = np.float32(c[-1])
    for k in c[-2::-1]:
        p = np.float32(np.float64(p) * np.float64(x) + np.float64(k))  # an FMA: one rounding
    return p


def chebyshev_nodes(lo, hi, n=4000):
    return lo + (hi - lo) * (np.cos(np.linspace(0, np.pi, n)) * 0.5 + 0.5)


def fit(name, xs, exact, deg):
    c = np.float32(lawson(xs, exact, deg)).astype(np.float64)
    err = max(abs(float(horner_f32(c, x)) - e) / abs(e) for x, e in zip(xs, exact))
    print(f"// {name}: degree {deg}, max relative error {err:.2e} (f32 coefficients, f32 Horner)")
    print("{" + ", ".join(f"{float(np.float32(v)):.9e}f" for v in c) + "}")


s = chebyshev_nodes(0, SPLIT * SPLIT)
fit("P(s) = erf(sqrt s)/sqrt s", s,
    np.array([float(mp.erf(mp.sqrt(v)) / mp.sqrt(v)) if v > 0 else float(2 / mp.sqrt(mp.pi)) for v in s]), 4)


def h_exact(t):
    if t == 0:
        return float(1 / (2 * mp.sqrt(mp.pi)))  # erfcx(z) ~ 1/(z·sqrt(pi)), z ~ 2/t
    z = 2 * (1 / mp.mpf(t) - 1)
    return float(mp.erfc(z) * mp.exp(z * z) / t)


t = chebyshev_nodes(0, 1 / (1 + SPLIT / 2))
fit("H(t) = erfc(z)·exp(z²)/t, z = 2(1/t - 1)", t, np.array([h_exact(v) for v in t]), 9)
