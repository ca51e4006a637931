"""Power-law fits of loss: L(C) = E + A·C^(−α) and L(N, D) = E + A/N^α + B/D^β.

Both are fitted as Hoffmann et al. (2022) fit theirs: in log space, log L̂ = LSE(e, a − α·log x,
…) with E = exp(e), A = exp(a), minimising the Huber loss (δ = 1e-3) of log L̂ − log L with
scipy's L-BFGS-B from a grid of initialisations, keeping the best. Inputs are divided by their
geometric mean first (x0, N0, D0) so that one grid of initialisations suits every scale;
`A` is reported for the normalised input (L = E + A·(x/x0)^(−α)).

Bootstrap intervals resample the points with replacement and refit (from the full fit and a
few of the best grid starts), giving percentile intervals on every parameter.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

DELTA = 1e-3


@dataclass
class Law:
    """Fitted parameters; `kind` is "compute" (E, A, alpha) or "joint" (+ B, beta)."""

    kind: str
    params: dict[str, float]
    scale: dict[str, float]
    """x0 (compute law) or N0, D0 (joint law): the normalisation of the inputs."""
    objective: float = 0.0
    boot: dict[str, np.ndarray] = field(default_factory=dict)
    """Bootstrap samples of every parameter (empty without a bootstrap)."""

    def predict(self, *xs: np.ndarray) -> np.ndarray:
        p = self.params
        if self.kind == "compute":
            (x,) = xs
            return p["E"] + p["A"] * (np.asarray(x, float) / self.scale["x0"]) ** -p["alpha"]
        n, d = (np.asarray(v, float) for v in xs)
        return (
            p["E"]
            + p["A"] * (n / self.scale["N0"]) ** -p["alpha"]
            + p["B"] * (d / self.scale["D0"]) ** -p["beta"]
        )

    def ci(self, name: str, level: float = 0.95) -> tuple[float, float] | None:
        if name not in self.boot or len(self.boot[name]) == 0:
            return None
        lo, hi = np.percentile(self.boot[name], [50 * (1 - level), 50 * (1 + level)])
        return float(lo), float(hi)

    def resampled(self) -> list[Law]:
        """One Law per bootstrap sample (for intervals on derived quantities)."""
        n = len(next(iter(self.boot.values()))) if self.boot else 0
        return [
            Law(self.kind, {k: float(v[i]) for k, v in self.boot.items()}, self.scale)
            for i in range(n)
        ]

    def to_json(self) -> dict:
        out = {"params": self.params, "scale": self.scale, "objective": self.objective}
        cis = {k: self.ci(k) for k in self.params}
        if any(v is not None for v in cis.values()):
            out["ci95"] = cis
            out["bootstrap_samples"] = len(next(iter(self.boot.values())))
        return out


def _objective(theta, logx_FP, log_y, n_terms, delta):
    """Huber loss of LSE(e, a_j − α_j·log x_j) − log y, and its gradient in theta.

    theta = [e, a_1, α_1, …, a_T, α_T]; logx_FP[j] are the log-inputs of term j.
    """
    e = theta[0]
    parts = [np.full_like(log_y, e)]
    for j in range(n_terms):
        a, alpha = theta[1 + 2 * j], theta[2 + 2 * j]
        parts.append(a - alpha * logx_FP[j])
    stack = np.stack(parts)
    # logsumexp / softmax / huber in plain numpy: scipy.special's array-API dispatch costs
    # milliseconds per call on these tiny arrays, and a bootstrap makes ~10^5 calls.
    top = stack.max(axis=0)
    expd = np.exp(stack - top)
    total = expd.sum(axis=0)
    r = top + np.log(total) - log_y
    w = expd / total
    # Scaled by 1/δ² (residuals of order δ contribute O(1)), so that L-BFGS-B's tolerances mean
    # the same at any δ; the minimiser is unchanged.
    psi = np.clip(r, -delta, delta) / delta**2  # d huber / d r
    grad = np.empty_like(theta)
    grad[0] = np.sum(psi * w[0])
    for j in range(n_terms):
        grad[1 + 2 * j] = np.sum(psi * w[1 + j])
        grad[2 + 2 * j] = np.sum(psi * w[1 + j] * -logx_FP[j])
    absr = np.abs(r)
    loss = np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta))
    return float(np.sum(loss)) / delta**2, grad


def _fit(logx_FP, log_y, inits, delta) -> tuple[np.ndarray, float]:
    # L-BFGS-B's vector updates go through OpenBLAS, whose threads busy-wait on vectors of five
    # numbers: with other work on the cores that made a fit 30x slower. One thread.
    with threadpool_limits(limits=1, user_api="blas"):
        return _fit_inits(logx_FP, log_y, inits, delta)


def _fit_inits(logx_FP, log_y, inits, delta) -> tuple[np.ndarray, float]:
    n_terms = len(logx_FP)
    bounds = [(None, None)] + [(None, None), (0.0, 10.0)] * n_terms
    best = None
    for theta0 in inits:
        res = minimize(
            _objective,
            np.asarray(theta0, float),
            args=(logx_FP, log_y, n_terms, delta),
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": 400},
        )
        if best is None or res.fun < best[1]:
            best = (res.x, float(res.fun))
    return best


def _grid(n_terms: int, log_y: np.ndarray) -> list[list[float]]:
    """Initialisations: E near and below the smallest loss, coefficients and exponents spread."""
    es = [float(np.min(log_y)) + d for d in (-1.0, -0.3, -0.05)]
    a_s, alphas = (-3.0, 0.0), (0.2, 0.6, 1.2)
    out = []
    for e in es:
        for combo in itertools.product(itertools.product(a_s, alphas), repeat=n_terms):
            out.append([e, *itertools.chain.from_iterable(combo)])
    return out


def _law(kind, theta, scale, objective) -> Law:
    params = {"E": float(np.exp(theta[0])), "A": float(np.exp(theta[1])), "alpha": float(theta[2])}
    if kind == "joint":
        params.update(B=float(np.exp(theta[3])), beta=float(theta[4]))
    return Law(kind, params, scale, objective)


def _bootstrap(kind, logx_FP, log_y, theta, inits, scale, n_boot, seed, delta) -> dict:
    rng = np.random.default_rng(seed)
    n = len(log_y)
    starts = [theta, *inits]
    samples: dict[str, list[float]] = {}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        th, obj = _fit([lx[idx] for lx in logx_FP], log_y[idx], starts, delta)
        for k, v in _law(kind, th, scale, obj).params.items():
            samples.setdefault(k, []).append(v)
    return {k: np.asarray(v) for k, v in samples.items()}


def _best_starts(logx_FP, log_y, grid, count, delta) -> list:
    n_terms = len(logx_FP)
    scored = sorted(
        grid, key=lambda t: _objective(np.asarray(t), logx_FP, log_y, n_terms, delta)[0]
    )
    return scored[:count]


def fit_compute_law(compute, loss, n_boot: int = 0, seed: int = 0, delta: float = DELTA) -> Law:
    """L(C) = E + A·(C/x0)^(−α) through (compute, loss) points."""
    x, y = np.asarray(compute, float), np.asarray(loss, float)
    if len(x) < 3:
        raise ValueError(f"a compute law needs at least 3 points, got {len(x)}")
    x0 = float(np.exp(np.mean(np.log(x))))
    logx, log_y = [np.log(x / x0)], np.log(y)
    grid = _grid(1, log_y)
    theta, obj = _fit(logx, log_y, grid, delta)
    law = _law("compute", theta, {"x0": x0}, obj)
    if n_boot:
        starts = _best_starts(logx, log_y, grid, 2, delta)
        law.boot = _bootstrap("compute", logx, log_y, theta, starts, law.scale, n_boot, seed, delta)
    return law


def fit_joint_law(
    params, tokens, loss, n_boot: int = 0, seed: int = 0, delta: float = DELTA
) -> Law:
    """L(N, D) = E + A·(N/N0)^(−α) + B·(D/D0)^(−β) (Hoffmann et al. 2022, approach 3)."""
    n, d, y = (np.asarray(v, float) for v in (params, tokens, loss))
    if len(y) < 5:
        raise ValueError(f"the joint law needs at least 5 points, got {len(y)}")
    n0, d0 = float(np.exp(np.mean(np.log(n)))), float(np.exp(np.mean(np.log(d))))
    logx, log_y = [np.log(n / n0), np.log(d / d0)], np.log(y)
    grid = _grid(2, log_y)
    theta, obj = _fit(logx, log_y, grid, delta)
    law = _law("joint", theta, {"N0": n0, "D0": d0}, obj)
    if n_boot:
        starts = _best_starts(logx, log_y, grid, 2, delta)
        law.boot = _bootstrap("joint", logx, log_y, theta, starts, law.scale, n_boot, seed, delta)
    return law


def compute_for_loss(law: Law, loss) -> np.ndarray:
    """The compute at which a compute law reaches `loss` (inf where loss <= E)."""
    p, loss = law.params, np.asarray(loss, float)
    gap = loss - p["E"]
    if p["alpha"] <= 0:  # a flat law (a bootstrap resample may fit one) reaches nothing new
        return np.full(gap.shape, np.inf)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        x = law.scale["x0"] * (p["A"] / gap) ** (1.0 / np.float64(p["alpha"]))
    return np.where(gap > 0, x, np.inf)


def compute_optimal(law: Law, compute, flops_per_param_token: float) -> dict[str, np.ndarray]:
    """N and D that minimise L(N, D) at C = κ·N·D, and the loss there (joint law)."""
    p, s = law.params, law.scale
    c = np.asarray(compute, float) / (flops_per_param_token * s["N0"] * s["D0"])
    a, b, al, be = p["A"], p["B"], p["alpha"], p["beta"]
    n = (al * a / (be * b)) ** (1.0 / (al + be)) * c ** (be / (al + be))
    d = c / n
    return {"N": n * s["N0"], "D": d * s["D0"], "loss": law.predict(n * s["N0"], d * s["D0"])}
