"""Fits recover known laws from noisy synthetic losses; `switchall scaling fit` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from switchall.analysis.fits import (
    compute_for_loss,
    compute_optimal,
    fit_compute_law,
    fit_joint_law,
)
from switchall.cli import main as cli_main

NOISE = 0.003  # multiplicative, about what seeds give at a fixed size


def test_compute_law_recovers_its_exponent():
    rng = np.random.default_rng(1)
    c = np.geomspace(1e15, 1e19, 12)
    loss = (1.8 + 2.0 * (c / 1e17) ** -0.12) * np.exp(rng.normal(0, NOISE, c.size))
    law = fit_compute_law(c, loss, n_boot=30, seed=0)
    assert law.params["alpha"] == pytest.approx(0.12, abs=0.015)
    assert law.params["E"] == pytest.approx(1.8, abs=0.1)
    lo, hi = law.ci("alpha")
    assert lo < 0.12 < hi and hi - lo < 0.05
    # Inverting the law gives back the compute of a loss it predicts.
    assert compute_for_loss(law, law.predict(3e17)) == pytest.approx(3e17, rel=1e-6)
    assert np.isinf(compute_for_loss(law, law.params["E"] - 0.01))


def test_joint_law_recovers_both_exponents_and_the_optimum():
    rng = np.random.default_rng(2)
    n, d = np.meshgrid(np.geomspace(1e6, 1e9, 4), np.geomspace(1e8, 1e11, 4))
    n, d = n.ravel(), d.ravel()
    e, a, alpha, b, beta = 1.69, 406.4, 0.34, 410.7, 0.28  # Hoffmann et al.'s fit
    loss = (e + a / n**alpha + b / d**beta) * np.exp(rng.normal(0, NOISE, n.size))
    law = fit_joint_law(n, d, loss, n_boot=20, seed=0)
    assert law.params["alpha"] == pytest.approx(alpha, abs=0.03)
    assert law.params["beta"] == pytest.approx(beta, abs=0.03)
    assert law.ci("alpha")[0] < alpha < law.ci("alpha")[1]
    # The compute-optimal split is the minimum of the law along N·D = C / 6.
    opt = compute_optimal(law, [1e20], 6.0)
    ns = np.geomspace(opt["N"][0] / 10, opt["N"][0] * 10, 2001)
    best = ns[np.argmin(law.predict(ns, 1e20 / (6.0 * ns)))]
    assert best == pytest.approx(opt["N"][0], rel=0.01)


def _synthetic_rows(multiplier: float) -> list[dict]:
    """A dense variant on a known law and a variant that needs `multiplier` x its compute."""
    rng = np.random.default_rng(3)
    rows = []
    for variant, factor in (("transformer", 1.0), ("switchall", multiplier)):
        for i, n in enumerate((1e5, 3e5, 1e6)):
            for tokens in (2.5e5, 5e5, 1e6):
                flops_per_token = 6 * n + 3e6
                c = flops_per_token * tokens
                loss = (2.5 + 3.0 * (c / factor / 1e12) ** -0.2) * np.exp(rng.normal(0, 0.002))
                rows.append(
                    {
                        "name": f"{i}-{variant}-{tokens:g}",
                        "variant": variant,
                        "model_variant": variant,
                        "size": str(i),
                        "status": "done",
                        "final_val_loss": float(loss),
                        "train_flops": c,
                        "tokens": tokens,
                        "non_embedding_params": n,
                        "train_flops_per_token": flops_per_token,
                        "attn_macs_per_token": 0.1 * flops_per_token,
                        "attn_mem_model": n / 10,
                        "val_curve": [
                            [0, 0, 9.0],
                            [10, tokens / 2, loss + 0.3],
                            [20, tokens, loss],
                        ],
                    }
                )
    return rows


def test_scaling_fit_writes_fits_and_readable_plots(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps({"points": _synthetic_rows(1.5)}))
    assert cli_main(["scaling", "fit", str(tmp_path), "--bootstrap", "10"]) == 0
    out = capsys.readouterr().out
    fits = json.loads((tmp_path / "fits.json").read_text())
    flops = fits["multipliers"]["switchall"]["flops"]["at_dense_points"]
    for point in flops:  # built to need 1.5x the dense compute at every loss
        assert point["multiplier"] == pytest.approx(1.5, rel=0.1)
        assert point["ci95"][0] < 1.5 < point["ci95"][1]
    head = fits["headline"]["switchall"]
    assert head["flops_multiplier_at_largest"] == pytest.approx(1.5, rel=0.1)
    assert fits["variants"]["switchall"]["joint_law"]["params"]["alpha"] > 0
    for name in ("loss_curves", "loss_vs_compute", "isoflop", "compute_multiplier"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert str(png) in out
