"""The universality and transformer recipes: the two-point ODE machinery against closed forms and
long numerical integration, the rate fit against synthetic trajectories with known rates, and each
recipe's ``--quick`` mode end to end (outputs exist, values are finite and in range)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")
pytest.importorskip("matplotlib")

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES))

import transformer
import universality as uv


def _integrate_reference(state0: tuple[float, float, float], k_h: float, eta_y: float, dy2: float, t_end: float, n: int) -> np.ndarray:
    """Classical RK4 with a fixed step, written out by hand (independent of scipy and of the recipe)."""

    def f(s: np.ndarray) -> np.ndarray:
        h, y, w = s
        return np.array(
            [
                -k_h * w,
                -w * (eta_y * h + k_h * y / h),
                -0.5 * eta_y * (3 * w - y + dy2) * h - 0.5 * k_h * (y + w) * w / h,
            ]
        )

    dt = t_end / n
    s = np.array(state0, dtype=np.float64)
    out = [s]
    for _ in range(n):
        a = f(s)
        b = f(s + dt / 2 * a)
        c = f(s + dt / 2 * b)
        d = f(s + dt * c)
        s = s + dt / 6 * (a + 2 * b + 2 * c + d)
        out.append(s)
    return np.array(out).T


# Rich (small h0, y0), lazy (large h0) and an overshooting start (y0 > Δy*², w0 > 0).
CASES = [
    ((0.05, 0.001, -0.001), 2.0, 0.5, 9.0),
    ((50.0, 2.0, -1.0), 1.0, 3.0, 4.0),
    ((3.0, 20.0, 12.0), 0.7, 1.3, 6.0),
]


@pytest.mark.parametrize("state0, k_h, eta_y, dy2", CASES)
def test_rhs_matches_the_spec_equations_and_the_integrator_matches_rk4(state0: tuple[float, float, float], k_h: float, eta_y: float, dy2: float) -> None:
    t = np.linspace(0.0, 2.0, 41)
    ours = uv.integrate_two_point(t, state0, k_h, eta_y, dy2, rtol=1e-10)
    ref = _integrate_reference(state0, k_h, eta_y, dy2, 2.0, 8000)[:, ::200]
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("state0, k_h, eta_y, dy2", CASES)
def test_the_conserved_quantity_is_conserved(state0: tuple[float, float, float], k_h: float, eta_y: float, dy2: float) -> None:
    t = np.linspace(0.0, 5.0, 200)
    h, y, _ = uv.integrate_two_point(t, state0, k_h, eta_y, dy2, rtol=1e-11)
    c = uv.conserved_quantity(h, y, k_h, eta_y)
    # the two terms move while their difference stays put
    moved = np.ptp(y / h) + eta_y / k_h * np.ptp(h)
    assert moved > 0.01
    assert np.ptp(c) < 1e-6 * moved
    assert uv.conservation_drift(h, y, k_h, eta_y) < 1e-6


def test_conservation_drift_detects_a_broken_law() -> None:
    h = np.linspace(1.0, 2.0, 50)
    y = np.linspace(0.0, 3.0, 50)  # y/h not affine in h
    assert uv.conservation_drift(h, y, 1.0, 1.0) > 0.1


@pytest.mark.parametrize("state0, k_h, eta_y, dy2", CASES)
def test_h_infinity_matches_long_integration(state0: tuple[float, float, float], k_h: float, eta_y: float, dy2: float) -> None:
    t = np.array([0.0, 400.0])
    h_end, y_end, w_end = uv.integrate_two_point(t, state0, k_h, eta_y, dy2, rtol=1e-11)[:, -1]
    assert abs(w_end) < 1e-6 and y_end == pytest.approx(dy2, rel=1e-6)  # converged: the fixed point w = 0, y = Δy*²
    assert uv.h_infinity(state0[0], state0[1], k_h, eta_y, dy2) == pytest.approx(h_end, rel=1e-6)


def test_h_infinity_limits() -> None:
    # rich: h0, y0 → 0 gives √ρ ‖Δy*‖; lazy: h0 → ∞ gives h0
    k_h, eta_y, dy2 = 2.0, 0.5, 9.0
    assert uv.h_infinity(1e-9, 1e-20, k_h, eta_y, dy2) == pytest.approx(math.sqrt(k_h / eta_y * dy2), rel=1e-6)
    assert uv.h_infinity(1e6, 1.0, k_h, eta_y, dy2) == pytest.approx(1e6, rel=1e-6)


@pytest.mark.parametrize("state0, k_h, eta_y, dy2", CASES)
def test_fit_recovers_known_rates(state0: tuple[float, float, float], k_h: float, eta_y: float, dy2: float) -> None:
    t = np.linspace(0.0, 3.0, 80)
    traj = uv.integrate_two_point(t, state0, k_h, eta_y, dy2, rtol=1e-10)
    fit = uv.fit_rates(t, traj, dy2)
    assert fit.k_h == pytest.approx(k_h, rel=1e-3)
    assert fit.eta_y == pytest.approx(eta_y, rel=1e-3)
    assert min(fit.r2) > 0.9999
    assert fit.k_h_fd >= 0 and fit.eta_y_fd >= 0  # only the start of the fit


def test_finite_difference_rates_on_a_finely_sampled_trajectory() -> None:
    state0, k_h, eta_y, dy2 = CASES[0]
    t = np.linspace(0.0, 3.0, 3000)
    traj = uv.integrate_two_point(t, state0, k_h, eta_y, dy2, rtol=1e-10)
    k_fd, e_fd = uv.fit_rates_fd(t, traj, dy2)
    # central differences are O(dt²) accurate: close, not exact
    assert k_fd == pytest.approx(k_h, rel=0.02) and e_fd == pytest.approx(eta_y, rel=0.02)


def test_fit_is_robust_to_measurement_noise() -> None:
    state0, k_h, eta_y, dy2 = CASES[0]
    t = np.linspace(0.0, 4.0, 120)
    traj = uv.integrate_two_point(t, state0, k_h, eta_y, dy2, rtol=1e-10)
    rng = np.random.default_rng(0)
    noisy = traj + 0.01 * np.abs(traj).max(1, keepdims=True) * rng.standard_normal(traj.shape)
    noisy[:, 0] = traj[:, 0]
    fit = uv.fit_rates(t, noisy, dy2)
    assert fit.k_h == pytest.approx(k_h, rel=0.05) and fit.eta_y == pytest.approx(eta_y, rel=0.05)


def test_r_squared() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert uv.r_squared(x, x) == 1.0
    assert uv.r_squared(x, np.full(4, x.mean())) == 0.0
    assert math.isnan(uv.r_squared(np.ones(3), np.ones(3)))


def test_two_points_geometry() -> None:
    cfg = uv.UniversalityConfig()
    x, y = uv.two_points(cfg, 3)
    assert float((x[1] - x[0]).norm()) == pytest.approx(cfg.input_distance)
    assert float((y[1] - y[0]).norm()) == pytest.approx(cfg.target_distance)
    torch.testing.assert_close(y[0], -y[1])


def test_ntk_lambda_max_matches_a_per_output_autograd_loop() -> None:
    cfg = uv.UniversalityConfig(width=16, depth=3, d_in=5, d_out=3)
    model, _ = uv.build_network(cfg, "mlp", 1.0, 0)
    x, _ = uv.two_points(cfg, 0)
    params = list(model.parameters())
    rows = []
    out = model(x).reshape(-1)
    for i in range(out.numel()):
        g = torch.autograd.grad(out[i], params, retain_graph=True)
        rows.append(torch.cat([v.reshape(-1) for v in g]))
    j = torch.stack(rows)
    ref = float(torch.linalg.eigvalsh(j @ j.T)[-1])
    assert uv.ntk_lambda_max(model, x) == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize("bad", [{"archs": ("vit",)}, {"rich_scale": 2.0}, {"lr_factor": 2.5}, {"depth": 2}, {"arms": ("baseline", "baseline")}])
def test_universality_config_rejects_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        uv.UniversalityConfig(**bad)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_universality_quick(tmp_path: Path) -> None:
    out = tmp_path / "universality"
    uv.main(["--quick", "--out", str(out)])
    for name in ("results.md", "results.json", "trajectories.png", "h_inf.png", "conserved.png"):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    cfg = res["config"]
    assert cfg["quick"] is True
    runs = res["runs"]
    assert {(r["arch"], r["regime"]) for r in runs} == {(a, g) for a in cfg["archs"] for g in cfg["regimes"]}
    assert len(runs) == len(cfg["archs"]) * len(cfg["regimes"]) * len(cfg["seeds"])
    for r in runs:
        assert r["eta_h"] > 0 and r["eta_y"] > 0
        for k in ("r2_y", "r2_w"):
            assert _finite(r[k]) and r[k] <= 1.0
        assert _finite(r["h_inf_pred"]) and r["h_inf_pred"] > 0
        assert 0 <= r["conserved_drift"] <= 1
        assert r["final_loss"] < r["trajectory"]["loss"][0]  # it trained
    # every arm of the comparison cell, on the same seeds
    arms = {r["arm"] for r in res["arm_runs"]}
    assert arms == set(cfg["arms"])
    for r in res["arm_runs"]:
        assert _finite(r["h_final"]) and _finite(r["r2_y"])
    md = (out / "results.md").read_text()
    assert "h_∞ predicted" in md and "## The four arms" in md


def test_transformer_quick(tmp_path: Path) -> None:
    out = tmp_path / "transformer"
    transformer.main(["--quick", "--out", str(out)])
    for name in ("results.md", "results.json", "alignment_over_training.png"):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    cfg = res["config"]
    assert {r["arm"] for r in res["runs"]} == set(cfg["arms"])
    assert len(res["runs"]) == len(cfg["arms"]) * len(cfg["seeds"])
    for r in res["runs"]:
        assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["train_acc"] <= 1.0
        assert len(r["history"]) >= 2
        for point in r["history"]:
            for kind, a in point["alpha_by_type"].items():
                assert -1.0 <= a <= 1.0, (kind, a)
        for kind, rel in r["final_alignment_by_type"].items():
            assert set(rel) == set(transformer.RELATIONS)
            assert all(-1.0 <= v <= 1.0 for v in rel.values()), kind
    assert set(res["runs"][0]["final_alignment_by_type"]) == set(transformer.LAYER_TYPES)
    md = (out / "results.md").read_text()
    assert "test acc" in md and "PAH" in md


@pytest.mark.parametrize("bad", [{"arms": ("sgd",)}, {"train_fraction": 1.0}, {"steps": 150, "eval_every": 100}, {"window": 200}, {"threads": 0}])
def test_transformer_config_rejects_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        transformer.TransformerConfig(**bad)


def test_layer_types_cover_every_linear_of_the_tiny_transformer() -> None:
    from canonreg.layers import select_layers
    from canonreg.models import TinyTransformer

    names = list(select_layers(TinyTransformer(12, d_model=16, heads=2, layers=2, d_out=11), None)[0])
    assert {transformer.layer_type(n) for n in names} == set(transformer.LAYER_TYPES)
    assert transformer.by_type({"blocks.0.q": 0.2, "blocks.1.q": 0.4, "head": float("nan")})["q"] == pytest.approx(0.3)
