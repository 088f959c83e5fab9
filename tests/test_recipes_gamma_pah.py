"""Tests of the ``gamma_scaling`` and ``pah`` recipes: their helpers against independent references
(closed-form OLS, theory §4's phase table, matrices built to obey a phase exactly), and each recipe's
``--quick`` mode end to end."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from canonreg import RELATIONS
from canonreg.experiment import TrialConfig, config_id, load_data, train_trial
from canonreg.functional import alignment, power_law_fit, random_orthogonal

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES))

import gamma_scaling  # noqa: E402
import pah  # noqa: E402

stats = pytest.importorskip("scipy.stats")
pytestmark = pytest.mark.usefixtures("single_thread")  # tiny trials: one thread, as in the recipes and the runner


# ============================================================================ gamma_scaling helpers
def test_ols_slope_matches_closed_form() -> None:
    rng = np.random.default_rng(0)
    x = np.repeat(np.log10([1e-4, 1e-3, 1e-2, 1e-1]), 3)
    y = 0.3 * x + 1.0 + rng.normal(0, 0.05, x.size)
    s = gamma_scaling.ols_slope(x, y)
    ref = stats.linregress(x, y)  # independent closed form
    half = stats.t.ppf(0.975, x.size - 2) * ref.stderr
    assert s.n == x.size
    assert s.slope == pytest.approx(ref.slope, rel=1e-12)
    assert s.ci_low == pytest.approx(ref.slope - half, rel=1e-10)
    assert s.ci_high == pytest.approx(ref.slope + half, rel=1e-10)
    assert np.polyfit(x, y, 1)[0] == pytest.approx(s.slope, rel=1e-10)
    assert s.verdict == "+"


def test_ols_slope_interval_covers_the_true_slope_about_95_percent() -> None:
    rng = np.random.default_rng(1)
    x = np.repeat(np.arange(6, dtype=float), 3)
    hits = 0
    trials = 400
    for _ in range(trials):
        y = -0.2 * x + rng.normal(0, 0.3, x.size)
        s = gamma_scaling.ols_slope(x, y)
        hits += s.ci_low <= -0.2 <= s.ci_high
    # Binomial(400, 0.95): sd ≈ 1.1 percentage points; the band is about ±3 sd.
    assert 0.91 <= hits / trials <= 0.985


def test_ols_slope_edge_cases() -> None:
    s = gamma_scaling.ols_slope([0.0, 1.0, 2.0, 3.0], [0.0, float("nan"), 2.0, 3.0])
    assert s.n == 3 and s.slope == pytest.approx(1.0)
    assert gamma_scaling.ols_slope([1.0, 1.0, 1.0], [0.0, 1.0, 2.0]).verdict == "?"  # constant x
    two = gamma_scaling.ols_slope([0.0, 1.0], [0.0, 2.0])
    assert two.slope == pytest.approx(2.0) and math.isnan(two.ci_low) and two.verdict == "?"
    flat = gamma_scaling.ols_slope([0, 1, 2, 0, 1, 2], [0.0, 0.1, -0.1, 0.1, -0.1, 0.0])
    assert flat.verdict == "0"
    with pytest.raises(ValueError, match="equally long"):
        gamma_scaling.ols_slope([0.0, 1.0], [0.0])


def test_seed_slope_is_the_t_interval_over_per_seed_slopes() -> None:
    x = np.tile([0.0, 1.0, 2.0, 3.0], 3)
    seeds = np.repeat([0, 1, 2], 4)
    true = {0: 0.10, 1: 0.20, 2: 0.45}
    y = np.array([true[s] * xi + s for xi, s in zip(x, seeds)])  # exact lines per seed
    s = gamma_scaling.seed_slope(x, y, seeds)
    ks = np.array(list(true.values()))
    half = stats.t.ppf(0.975, 2) * ks.std(ddof=1) / math.sqrt(3)
    assert s.n == 3
    assert s.slope == pytest.approx(ks.mean())
    assert (s.ci_low, s.ci_high) == pytest.approx((ks.mean() - half, ks.mean() + half))


def test_layer_mean_marks_dead_layers_nan() -> None:
    alpha = {"0": {"f-RGA": 0.5}, "2": {"f-RGA": 0.7}}
    assert gamma_scaling.layer_mean(alpha, "f-RGA") == pytest.approx(0.6)
    assert math.isnan(gamma_scaling.layer_mean({"0": {"f-RGA": 0.5}, "2": {"f-RGA": None}}, "f-RGA"))


def test_gamma_config_rejects_bad_grids() -> None:
    with pytest.raises(ValueError, match="subgrid"):
        gamma_scaling.Config(subgrid=(1e-4, 5e-4))
    with pytest.raises(ValueError, match="weight_decays"):
        gamma_scaling.Config(weight_decays=(1e-3, -1e-2), subgrid=(1e-3,))
    with pytest.raises(ValueError, match="arms"):
        gamma_scaling.Config(arms=("baseline", "sam"))


# ============================================================================ pah helpers
#: Spec §4's table, written as its own statements: (forward, backward) → {relation: κ of A ∝ B^κ}.
SPEC_TABLE: dict[tuple[str, str], dict[str, float]] = {
    # H_b ∝ Z², G_a ∝ Z²; H_a ∝ G_a^{1/2}, H_b ∝ G_b²
    ("f-RWA", "b-GWA"): {"b-RWA": 2, "f-GWA": 2, "f-RGA": 0.5, "b-RGA": 2},
    # H_b, G_b ∝ Z², G_a ∝ Z³; H_a ∝ G_a^{1/3}
    ("f-RWA", "b-RGA"): {"b-RWA": 2, "b-GWA": 2, "f-GWA": 3, "f-RGA": 1 / 3},
    # H_a, G_a ∝ Z², H_b ∝ Z³; G_b ∝ H_b^{1/3}
    ("f-RGA", "b-GWA"): {"f-RWA": 2, "f-GWA": 2, "b-RWA": 3, "b-RGA": 3},
    # H_a, G_b ∝ I
    ("f-GWA", "b-RWA"): {"f-RWA": 0, "b-GWA": 0},
    # H_a ∝ Z_a^{-1}
    ("f-GWA", "b-RGA"): {"f-RWA": -1},
    # G_b ∝ Z_b^{-1}
    ("f-RGA", "b-RWA"): {"b-GWA": -1},
}
SAME_KIND = [("f-RWA", "b-RWA"), ("f-GWA", "b-GWA"), ("f-RGA", "b-RGA")]


@pytest.mark.parametrize("pair", list(SPEC_TABLE))
def test_predictions_reproduce_the_spec_table(pair: tuple[str, str]) -> None:
    pred = pah.predict_exponents(pair)
    assert pred.kind == "power law"
    for rel, k in SPEC_TABLE[pair].items():
        assert pred.kappa[rel] == pytest.approx(k), rel
    assert set(pred.kappa) == set(RELATIONS)  # (p, q) fixed: every exponent determined (or undefined)


@pytest.mark.parametrize("pair", SAME_KIND)
def test_same_kind_on_both_sides_is_compact(pair: tuple[str, str]) -> None:
    pred = pah.predict_exponents(pair)
    assert pred.kind == "compact" and pred.kappa == {}


def test_prediction_properties_over_all_64_phases() -> None:
    for k in range(7):
        for holding in itertools.combinations(RELATIONS, k):
            pred = pah.predict_exponents(holding)
            if not holding:
                assert pred.kind == "none"
            for rel, kappa in pred.kappa.items():
                if math.isnan(kappa):
                    continue
                # theory §4: exponents lie in [−1, 3], positive ones in [1/3, 3]
                assert -1 - 1e-12 <= kappa <= 3 + 1e-12, (holding, rel, kappa)
                assert kappa <= 0 or kappa >= 1 / 3 - 1e-12, (holding, rel, kappa)
                if rel in holding:
                    assert kappa == pytest.approx(1.0)  # a relation that holds has κ = 1
    single = pah.predict_exponents(["f-RWA"])  # H_b = W H_a Wᵀ ∝ (WWᵀ)²
    assert single.kind == "partial" and single.kappa == {"f-RWA": 1.0, "b-RWA": 2.0}
    with pytest.raises(ValueError, match="holding"):
        pah.predict_exponents(["f-XYZ"])


def _phase_matrices(p: float, q: float, d: int = 8, flat: bool = False) -> dict[str, torch.Tensor]:
    """Matrices that obey a phase exactly: W = U S Vᵀ, H_a = V z^p Vᵀ, G_b = U z^q Uᵀ, and the identities."""
    g = torch.Generator().manual_seed(3)
    u = random_orthogonal(d, generator=g)
    v = random_orthogonal(d, generator=g)
    s = torch.ones(d, dtype=torch.float64) * 1.7 if flat else torch.logspace(-0.5, 0.5, d, dtype=torch.float64)
    w = u @ torch.diag(s) @ v.T
    z = s**2
    h_a = v @ torch.diag(z**p) @ v.T
    g_b = u @ torch.diag(z**q) @ u.T
    return {"H_a": h_a, "G_b": g_b, "H_b": w @ h_a @ w.T, "G_a": w.T @ g_b @ w, "Z_a": w.T @ w, "Z_b": w @ w.T}


@pytest.mark.parametrize("pair", list(SPEC_TABLE))
def test_predictions_match_fits_on_matrices_built_to_obey_the_phase(pair: tuple[str, str]) -> None:
    """Independent check of the algebra: build the phase, detect which relations hold (α = 1),
    predict from those, and compare with the fitted exponents of the built matrices."""
    truth = pah.predict_exponents(pair)
    mats = _phase_matrices(truth.p, truth.q)
    pairs = {"f-RGA": ("H_a", "G_a"), "f-GWA": ("G_a", "Z_a"), "f-RWA": ("H_a", "Z_a"),
             "b-RGA": ("H_b", "G_b"), "b-GWA": ("G_b", "Z_b"), "b-RWA": ("H_b", "Z_b")}  # fmt: skip
    holding = [r for r, (a, b) in pairs.items() if float(alignment(mats[a], mats[b], "cosine")) > 1 - 1e-10]
    assert set(pair) <= set(holding)
    pred = pah.predict_exponents(holding)
    for rel, kappa in pred.kappa.items():
        a, b = pairs[rel]
        fit = power_law_fit(mats[a], mats[b], n_bootstrap=0)
        if math.isnan(kappa):  # B ∝ I: the fit is undefined too
            assert math.isnan(fit.exponent)
        else:
            assert fit.exponent == pytest.approx(kappa, abs=1e-8), rel


def test_flat_spectrum_makes_every_relation_hold_and_is_compact() -> None:
    mats = _phase_matrices(1.0, 1.0, flat=True)
    pred = pah.predict_exponents(RELATIONS)
    assert pred.kind == "compact"
    assert float(alignment(mats["H_b"], mats["Z_b"], "cosine")) == pytest.approx(1.0)


def test_summarize_kappa_and_verdicts() -> None:
    fits = [{"exponent": k, "ci_low": k - 0.1, "ci_high": k + 0.1, "r2": 0.9, "off_diagonal": 0.1} for k in (1.0, 1.2, 1.4)]
    m = pah.summarize_kappa(fits)
    half = stats.t.ppf(0.975, 2) * 0.2 / math.sqrt(3)
    assert m.n == 3 and m.kappa == pytest.approx(1.2)
    assert (m.ci_low, m.ci_high) == pytest.approx((1.2 - half, 1.2 + half))
    one = pah.summarize_kappa([fits[0], {"exponent": None, "ci_low": None, "ci_high": None, "r2": None, "off_diagonal": 0.5}])
    assert (one.n, one.ci_low, one.ci_high) == (1, 0.9, 1.1)  # one finite seed: its bootstrap interval

    pred = pah.predict_exponents(["f-RWA", "b-GWA"])
    ok = {r: pah.Measured(k, k - 0.1, k + 0.1, 1.0, 0.0, 3) for r, k in pred.kappa.items()}
    assert pah.layer_verdict(pred, ok, 0.0) == ("consistent", [])
    bad = dict(ok, **{"b-RWA": pah.Measured(1.0, 0.9, 1.1, 1.0, 0.0, 3)})
    assert pah.layer_verdict(pred, bad, 0.0) == ("not consistent", ["b-RWA"])
    assert pah.layer_verdict(pah.predict_exponents([]), ok, 0.0) == ("no prediction", [])
    compact = pah.predict_exponents(["f-RWA", "b-RWA"])
    assert pah.layer_verdict(compact, ok, 0.9)[0] == "consistent"
    assert pah.layer_verdict(compact, ok, 0.1)[0] == "not consistent"


def test_setting_parse_and_config_validation() -> None:
    assert pah.Setting.parse("weak:6:1e-4") == pah.Setting("weak", 6, 1e-4)
    for bad in ("weak:6", "weak:x:1e-4", "weak:1:1e-4"):
        with pytest.raises(ValueError, match="setting"):
            pah.Setting.parse(bad)
    with pytest.raises(ValueError, match="distinct setting names"):
        pah.Config(settings=("a:4:1e-2", "a:6:1e-4"))
    with pytest.raises(ValueError, match="eig_floors"):
        pah.Config(eig_floors=(1.5,))


# ============================================================================ the loop the recipes use
def _tiny(**kw: object) -> TrialConfig:
    base = dict(dataset="mnist1d", num_samples=600, width=16, depth=3, steps=30, eval_every=10, batch_size=32, n_bootstrap=20, seed=3)
    return TrialConfig(**(base | kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("arm", ["baseline", "noise"])
def test_monitoring_only_the_last_window_changes_nothing_but_the_cost(arm: str) -> None:
    """``monitor_windows="last"`` (gamma_scaling, pah): same trained weights and the same last-window
    report as the monitor attached throughout (reset after every window)."""
    every = train_trial(_tiny(arm=arm), threads=1)
    last = train_trial(_tiny(arm=arm, monitor_windows="last"), threads=1)
    for (name, a), b in zip(every.model.state_dict().items(), last.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert last.report.alignment == every.report.alignment
    balance = [json.dumps({k: v.to_dict() for k, v in t.report.balance.items()}, sort_keys=True) for t in (every, last)]
    assert balance[0] == balance[1]  # as JSON text: NaN entries (no signal term) compare equal
    assert [h["step"] for h in every.history] == [10, 20, 30] and [h["step"] for h in last.history] == [30]
    assert last.history[-1] == every.history[-1] and last.train_loss == every.train_loss
    with pytest.raises(ValueError, match="monitor_windows"):
        _tiny(monitor_windows="first")


def test_pah_refits_equal_the_monitors_own_fits() -> None:
    """pah.measure refits the window report's exponents at each floor; at the monitor's floor (1e-6)
    and seed they must be the monitor's own fits, bootstrap intervals included."""
    cfg = _tiny(preprocess="centered", monitor_windows="last")
    split = load_data(cfg)
    trained = train_trial(cfg, data=split, threads=1)
    got = pah.measure(trained, split.x_test, split.y_test, (1e-3, 1e-6))
    want = {layer: {r: f.to_dict() for r, f in fits.items()} for layer, fits in trained.report.exponents.items()}
    assert json.dumps(got["exponents"]["1e-06"], sort_keys=True) == json.dumps(want, sort_keys=True)
    assert set(got["exponents"]) == {"0.001", "1e-06"}
    assert got["exponents"]["0.001"] != got["exponents"]["1e-06"]
    with torch.no_grad():
        acc = (trained.model(split.x_test).argmax(1) == split.y_test).double().mean().item()
    assert got["test_acc"] == acc
    for layer, flat in got["z_flatness"].items():
        assert 0 < flat <= 1 + 1e-12, layer


def test_pah_runs_in_the_ablation_runner_as_its_own_loop_would(tmp_path: Path) -> None:
    """One runner grid per setting holds exactly cfg.trial(setting, arm, seed) for every arm × seed, and
    pah.measure_run in the runner gives pah.measure of the same trained model; the first seed's report
    (the scatter layer only) is saved for the figure."""
    from canonreg.ablate import AblationSpec, run_ablation
    from canonreg.stats import jsonable

    cfg = pah.Config(settings=("s:3:1e-2",), arms=("baseline", "noise"), seeds=(3, 4), num_samples=600, width=16, steps=30, window=10, n_bootstrap=20)
    (setting,) = [pah.Setting.parse(x) for x in cfg.settings]
    spec = cfg.spec(setting)
    assert AblationSpec.from_dict(spec).configs() == [cfg.trial(setting, a, s) for a in cfg.arms for s in cfg.seeds]
    args = {"eig_floors": [1e-3, 1e-6], "scatter_layer": "2", "report_seed": 3, "report_dir": str(tmp_path / "reports")}
    done = run_ablation(spec | {"grid": {"arm": ["noise"], "seed": [3, 4]}}, out=tmp_path, workers=0, progress=False, plots=False,
                        measure="pah:measure_run", measure_args=args)  # fmt: skip
    for trial in done.configs:
        got = done.records[config_id(trial)]["measure"]
        split = load_data(trial)
        trained = train_trial(trial, data=split, threads=1)
        want = pah.measure(trained, split.x_test, split.y_test, (1e-3, 1e-6))
        report = want.pop("report")
        assert json.loads(json.dumps(jsonable(want))) == {k: v for k, v in got.items() if k != "report_file"}
        if trial.seed == 3:
            saved = torch.load(got["report_file"], weights_only=False)
            assert json.dumps(jsonable(saved.alignment)) == json.dumps(jsonable(report.alignment))
            assert json.dumps(jsonable(saved.exponents)) == json.dumps(jsonable(report.exponents))
            assert all(torch.equal(a, report.matrices("2")[k]) for k, a in saved.matrices("2").items())
            with pytest.raises(KeyError):
                saved.matrices("0")  # only the plotted layer is kept
        else:
            assert got["report_file"] is None


# ============================================================================ end to end (--quick)
def _run(script: str, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(RECIPES.parent), os.environ.get("PYTHONPATH", "")])}  # this checkout's canonreg
    proc = subprocess.run(
        [sys.executable, str(RECIPES / script), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_gamma_scaling_quick(tmp_path: Path) -> None:
    _run("gamma_scaling.py", tmp_path)
    for name in ("results.md", "results.json", "alpha_vs_gamma.png", "balance_vs_gamma.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    res = json.loads((tmp_path / "results.json").read_text())
    cfg = res["config"]
    assert cfg["quick"] is True
    expected = sum(len(cfg["subgrid"] if a in cfg["subgrid_arms"] else cfg["weight_decays"]) for a in cfg["arms"]) * len(cfg["seeds"])
    assert len(res["runs"]) == expected
    ok = [r for r in res["runs"] if "failed" not in r]  # a failed run (dead layer in the loss arm) is reported, not fatal
    assert {r["arm"] for r in ok} == set(cfg["arms"])
    for run in ok:
        assert run["config"]["weight_decay"] == run["weight_decay"] and run["config"]["arm"] == run["arm"]
        assert 0.0 <= run["test_acc"] <= 1.0
        assert run["rho"] == pytest.approx(cfg["lr"] / (run["weight_decay"] * cfg["batch_size"]))
        for layer in run["alpha"].values():
            assert all(v is None or -1.0 <= v <= 1.0 for v in layer.values())
        for b in run["balance"].values():
            assert b["decay"] > 0 and b["noise"] >= 0 and b["noise_share"] == pytest.approx(b["noise"] / b["decay"])
    for arm in cfg["arms"]:
        assert set(res["slopes"][arm]) == {*RELATIONS, "mean"}
        for fit in res["slopes"][arm].values():
            ols = fit["ols"]
            assert ols["ci_low"] <= ols["slope"] <= ols["ci_high"]
            assert ols["verdict"] in {"+", "−", "0"}
    md = (tmp_path / "results.md").read_text()
    assert "OLS slope" in md and "(drift+noise)/decay" in md


@pytest.mark.slow
def test_pah_quick(tmp_path: Path) -> None:
    _run("pah.py", tmp_path)
    for name in ("results.md", "results.json", "eigen_scatter.png", "kappa_measured_vs_predicted.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    res = json.loads((tmp_path / "results.json").read_text())
    cfg = res["config"]
    assert len(res["runs"]) == len(cfg["settings"]) * len(cfg["arms"]) * len(cfg["seeds"])
    depths = {pah.Setting.parse(s).name: pah.Setting.parse(s).depth for s in cfg["settings"]}
    ok = [r for r in res["runs"] if "failed" not in r]
    assert {r["arm"] for r in ok} == set(cfg["arms"])
    for run in ok:
        assert len(run["alpha"]) == depths[run["setting"]]
        assert set(run["exponents"]) == {f"{f:g}" for f in cfg["eig_floors"]}
        for fits in run["exponents"].values():
            for layer in fits.values():
                for f in layer.values():
                    if f["exponent"] is not None and f["ci_low"] is not None:
                        assert f["ci_low"] <= f["ci_high"]
    cells = {(r["setting"], r["arm"]) for r in ok}
    assert len(res["layers"]) == len(cfg["eig_floors"]) * sum(depths[s] for s, _ in cells)
    for row in res["layers"]:
        assert row["verdict"] in {"consistent", "not consistent", "no prediction"}
        holding = [r for r in RELATIONS if row["alpha"][r] is not None and row["alpha"][r] >= cfg["threshold"]]
        assert row["prediction"]["holding"] == holding  # the phase is read off α with the threshold
        assert row["prediction"]["kind"] == pah.predict_exponents(holding).kind
    assert "Summary" in (tmp_path / "results.md").read_text()
