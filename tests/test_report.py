"""CRHReport and its pure builders (layer_matrices, build_report)."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
from conftest import make_case, ref_moment, run_monitor
from torch.testing import assert_close

import canonreg
from canonreg import functional as cf
from canonreg.report import CRHReport, ReportInputs, ReportOptions, build_report, layer_matrices

pytestmark = pytest.mark.usefixtures("single_thread")


def _sums(ha: torch.Tensor, gb: torch.Tensor, hb: torch.Tensor, ga: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
    def prep(x: torch.Tensor) -> torch.Tensor:
        return cf.preprocess_rows(x, mode)

    out = {"n": torch.tensor(float(ha.shape[0]), dtype=torch.float64), "steps": torch.tensor(1.0, dtype=torch.float64)}
    for key, rows in (("Ha", ha), ("Gb", gb), ("Hb", hb), ("Ga", ga)):
        y = prep(rows)
        out[f"{key}_xx"] = y.T @ y
        out[f"{key}_x"] = y.sum(0)
    out["gnhn"] = ((gb * gb).sum(1) * (ha * ha).sum(1)).sum()
    out["gh"] = (ga * ha).sum()
    return out


# normalisation breaks the identities, so normalized mode is only ever built from direct sums
@pytest.mark.parametrize(
    "mode,direct", [("raw", True), ("raw", False), ("centered", True), ("centered", False), ("normalized", True)]
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_matrices_match_dense_moments(mode: str, with_bias: bool, direct: bool) -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 5, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64) if with_bias else None
    ha = torch.randn(11, 5, dtype=torch.float64) + 0.5
    hb = ha @ w.T + (b if b is not None else 0)
    gb = torch.randn(11, 3, dtype=torch.float64)
    ga = gb @ w
    m = layer_matrices(_sums(ha, gb, hb, ga, mode), w, b, preprocess=mode, direct=direct)
    want = {
        "H_a": ref_moment(ha, mode), "H_b": ref_moment(hb, mode), "G_a": ref_moment(ga, mode),
        "G_b": ref_moment(gb, mode), "Z_a": w.T @ w, "Z_b": w @ w.T,
    }
    for k, v in want.items():
        assert_close(m[k], v)
        assert_close(m[k], m[k].T)


@pytest.mark.parametrize("mode,direct", [("raw", False), ("centered", False), ("normalized", True)])
@pytest.mark.parametrize("scale", [1.0, 1e25, 1e-25])
def test_float32_weight_products_match_float64_at_any_scale(mode: str, direct: bool, scale: float) -> None:
    # dense float64 references; float32 products of power-of-two-scaled operands: ~1e-7 relative error,
    # no overflow (w ~ 1e25: (w·w) ~ 1e50 > float32's 3e38) or underflow (w ~ 1e-25) at extreme scales
    torch.manual_seed(1)
    w = torch.randn(40, 64, dtype=torch.float64) * scale
    ha = torch.randn(90, 64, dtype=torch.float64) * 1e3 + 7.0
    gb = torch.randn(90, 40, dtype=torch.float64) * 1e-20
    hb, ga = ha @ w.T, gb @ w
    sums = _sums(ha, gb, hb, ga, mode)
    exact = layer_matrices(sums, w, None, preprocess=mode, direct=direct)
    fast = layer_matrices(sums, w, None, preprocess=mode, direct=direct, gram_dtype=torch.float32)
    want = {"Z_a": w.T @ w, "Z_b": w @ w.T, "H_b": ref_moment(hb, mode), "G_a": ref_moment(ga, mode)}
    for k, v in want.items():
        assert fast[k].dtype == torch.float64 and bool(torch.isfinite(fast[k]).all()), k
        assert_close(exact[k], v, rtol=1e-9, atol=0.0)
        assert float((fast[k] - v).abs().max() / v.abs().max()) < 1e-5, k
        assert_close(fast[k], fast[k].T, rtol=0.0, atol=0.0)
    for k in ("H_a", "G_b"):  # moments themselves never change dtype
        assert torch.equal(fast[k], exact[k])


def test_compute_with_float32_grams_agrees_and_checks_its_argument() -> None:
    case = make_case("transformer")
    monitor = run_monitor(case, preprocess="normalized")
    exact = monitor.compute(exponents=False, ranks=False)
    fast = monitor.compute(exponents=False, ranks=False, gram_dtype=torch.float32)
    for layer in exact.layers:
        for rel, v in exact.alignment[layer].items():
            assert fast.alignment[layer][rel] == pytest.approx(v, abs=1e-5), (layer, rel)
    with pytest.raises(ValueError, match="`gram_dtype` to be torch.float64 or torch.float32, but got torch.float16"):
        monitor.compute(gram_dtype=torch.float16)


def _report(**overrides: object) -> CRHReport:
    case = make_case("mlp")
    monitor = run_monitor(case, preprocess="centered")
    return monitor.compute(lr=0.05, weight_decay=1e-3, batch_size=12, n_bootstrap=20, **overrides)


def test_report_views_and_serialisation(tmp_path) -> None:
    report = _report()
    assert report.layers == ["0", "2", "4"]
    d = report.to_dict()
    assert d["preprocess"] == "centered" and d["metric"] == "pearson" and d["derived_by_identities"] is True
    assert set(d["alignment"]["2"]) == set(canonreg.RELATIONS)
    assert set(d["exponents"]["2"]["f-RWA"]) >= {"exponent", "ci_low", "ci_high", "r2", "off_diagonal"}
    assert d["samples"] == {"0": 21, "2": 21, "4": 21}
    assert set(d["balance"]["0"]) >= {"decay", "drift", "noise", "noise_share"}
    text = report.to_json(tmp_path / "r.json")
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded == json.loads(text)
    assert loaded["alignment"]["4"]["b-RWA"] == pytest.approx(report.alignment["4"]["b-RWA"])
    # the balance's untracked `signal` term is NaN in Python and null in JSON
    assert math.isnan(report.balance["0"].signal) and loaded["balance"]["0"]["signal"] is None


def test_report_text_tables() -> None:
    report = _report()
    s = str(report)
    assert "pearson" in s and "preprocess=centered" in s and "derived by exact identities" in s
    for r in canonreg.RELATIONS:
        assert r in s
    row = next(line for line in s.splitlines() if line.startswith("2 "))
    assert f"{report.alignment['2']['f-RWA']:.3f}" in row
    exp_table = report.table("exponents")
    assert "f-RGA" in exp_table and "[" in exp_table
    with pytest.raises(ValueError, match="`what`"):
        report.table("ranks")


def test_report_accessors_and_errors() -> None:
    report = _report()
    m = report.matrices("2")
    m["H_a"].zero_()
    assert float(report.matrices("2")["H_a"].abs().sum()) > 0  # copies, not views
    with pytest.raises(KeyError, match="`layer`"):
        report.matrices("nope")
    vals = [report.alignment[n][r] for n in report.layers for r in ("f-RWA", "b-RWA")]
    assert report.mean_alignment(relations=("f-RWA", "b-RWA")) == pytest.approx(sum(vals) / len(vals))
    assert report.mean_alignment(layers="2", relations="b-RWA") == pytest.approx(report.alignment["2"]["b-RWA"])
    with pytest.raises(ValueError, match="`relations`"):
        report.mean_alignment(relations=("f-XYZ",))
    with pytest.raises(ValueError, match="`layers`"):
        report.mean_alignment(layers=["9"])
    assert report.phase("2", threshold=-1.0) == canonreg.RELATIONS
    assert report.phase("2", threshold=1.0) == tuple(r for r in canonreg.RELATIONS if report.alignment["2"][r] >= 1.0)
    with pytest.raises(KeyError, match="`layer`"):
        report.phase("9")
    with pytest.raises(ValueError, match="`threshold`"):
        report.phase("2", threshold=2.0)


def test_report_is_frozen_and_picklable() -> None:
    report = _report()
    with pytest.raises(Exception):
        report.metric = "cosine"  # type: ignore[misc]
    again = pickle.loads(pickle.dumps(report))
    assert again.to_dict() == report.to_dict()


def test_build_report_all_zero_sums_gives_nan_with_reasons() -> None:
    d = 3
    z = torch.zeros(d, d, dtype=torch.float64)
    v = torch.zeros(d, dtype=torch.float64)
    sums = {"0": {"n": torch.tensor(4.0), "steps": torch.tensor(1.0), "Ha_xx": z, "Ha_x": v, "Gb_xx": z, "Gb_x": v}}
    inputs = ReportInputs(
        sums=sums, weights={"0": torch.zeros(d, d)}, biases={"0": None}, preprocess="raw", metric="cosine",
        direct=False, skipped={"0": 0},
    )
    report = build_report(inputs, ReportOptions(n_bootstrap=10))
    for r in canonreg.RELATIONS:
        assert math.isnan(report.alignment["0"][r])
        assert "zero matrix" in report.nan_reasons["0"][r]
        assert math.isnan(report.exponents["0"][r].exponent)
    assert math.isnan(report.effective_rank["0"]["H_a"]["participation"])
    assert report.to_dict()["alignment"]["0"]["f-RGA"] is None
    json.dumps(report.to_dict(), allow_nan=False)  # JSON-safe


def test_exponent_seed_is_reproducible() -> None:
    a, b = _report(bootstrap_seed=5), _report(bootstrap_seed=5)
    assert a.to_dict()["exponents"] == b.to_dict()["exponents"]  # NaN-safe comparison


@pytest.mark.parametrize("block", [2, 256])
@pytest.mark.parametrize("mode", ["raw", "centered"])
def test_layer_matrices_read_the_upper_triangle_of_the_sums(mode: str, block: int, monkeypatch) -> None:
    # The monitor computes only the upper triangle of a wide Gram: the report never reads below the
    # diagonal (NaN there changes nothing). block=2: the blocked pass over 2×2 tiles and ragged edges.
    import canonreg.moments as mo

    monkeypatch.setattr(mo, "_SYRK_BLOCK", block)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(3, 5, generator=g, dtype=torch.float64)
    ha = torch.randn(9, 5, generator=g, dtype=torch.float64) + 2.0
    gb = torch.randn(9, 3, generator=g, dtype=torch.float64)
    sums = _sums(ha, gb, ha @ w.T, gb @ w, mode)
    full = sums["Ha_xx"].clone()
    sums["Ha_xx"] = torch.triu(full) + torch.tril(torch.full_like(full, float("nan")), -1)
    keep = sums["Ha_xx"].clone()
    m = layer_matrices(sums, w, None, preprocess=mode, direct=False)
    mu = sums["Ha_x"] / 9 if mode == "centered" else torch.zeros(5, dtype=torch.float64)
    want = (torch.triu(full) + torch.triu(full, 1).T) / 9 - torch.outer(mu, mu)
    assert_close(m["H_a"], want, rtol=1e-13, atol=1e-13)
    assert torch.equal(torch.nan_to_num(sums["Ha_xx"]), torch.nan_to_num(keep))  # the sums are not modified
    for k, v in m.items():
        assert torch.equal(v, v.T), k  # exactly symmetric
    assert_close(m["H_b"], w @ want @ w.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("metric", ["pearson", "cosine"])
def test_build_report_alignment_equals_per_pair_scores(metric: str) -> None:
    g = torch.Generator().manual_seed(4)
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    ha = torch.randn(20, 6, generator=g, dtype=torch.float64) + 1.0
    gb = torch.randn(20, 4, generator=g, dtype=torch.float64)
    sums = {"0": _sums(ha, gb, ha @ w.T, gb @ w, "centered")}
    inputs = ReportInputs(sums=sums, weights={"0": w}, biases={"0": None}, preprocess="centered", metric=metric, direct=True)
    report = build_report(inputs, ReportOptions(exponents=False, ranks=False))
    mats = report.matrices("0")
    for rel, (pa, pb) in cf.RELATION_PAIRS.items():
        assert report.alignment["0"][rel] == pytest.approx(float(cf.alignment(mats[pa], mats[pb], metric)), abs=1e-13)
    assert report.exponents == {} and report.effective_rank == {}
    assert set(report.timings) == {"reduce", "matrices", "alignment", "exponents", "ranks", "total"}


def test_plot_pair_scatters_the_eigen_coordinates() -> None:
    pytest.importorskip("matplotlib")
    from canonreg.plotting import plot_pair

    report = _report()
    ax = plot_pair(report, "2", "f-RWA")
    mats = report.matrices("2")
    lam, v = torch.linalg.eigh(mats["Z_a"])
    a_i = torch.diagonal(v.T @ mats["H_a"] @ v)  # the obvious form
    keep = (lam > 1e-6 * lam.max()) & (a_i > 0)
    want = torch.stack([torch.log10(lam[keep]), torch.log10(a_i[keep])], 1)
    got = torch.as_tensor(ax.collections[0].get_offsets().data, dtype=torch.float64)
    assert_close(got, want, rtol=1e-9, atol=1e-9)
    import matplotlib.pyplot as plt

    plt.close(ax.figure)


def test_plot_draws_what_the_report_holds_and_the_points_the_fit_used(tmp_path) -> None:
    """``report.plot()`` on a sketched report (no matrices) raised KeyError; on non-finite weights, an eigh error;
    the scatter used a fixed floor of 1e-6 instead of the fit's (5 points fitted, 10 drawn)."""
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
    x = torch.randn(64, 12)

    def run(**kw: object) -> canonreg.CRHMonitor:
        monitor = canonreg.CRHMonitor(model, **kw)  # type: ignore[arg-type]
        with monitor:
            model(x).square().mean().backward()
        return monitor

    run(sketch=4).compute(exponents=False, ranks=False).plot(tmp_path / "sketch.png")
    report = run().compute(floor=0.3)
    ax = canonreg.plotting.plot_pair(report, "2", "f-RWA")
    assert len(ax.collections[0].get_offsets()) == report.exponents["2"]["f-RWA"].n_points
    monitor = run()
    with torch.no_grad():  # the weights went non-finite after the window was recorded: Z is not finite
        model[2].weight[0, 0] = float("nan")
    monitor.compute(exponents=False).plot(tmp_path / "nan.png")
    assert (tmp_path / "sketch.png").exists() and (tmp_path / "nan.png").exists()


def test_mean_alignment_of_nothing_is_refused() -> None:
    """``layers=[]`` or ``relations=[]`` returned NaN silently (a mean over no entry)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    report = canonreg.measure_crh(model, torch.randn(20, 4), torch.randint(0, 3, (20,)))
    with pytest.raises(ValueError, match="at least one layer and one relation"):
        report.mean_alignment(layers=[])
    with pytest.raises(ValueError, match="at least one layer and one relation"):
        report.mean_alignment(relations=[])
    assert math.isfinite(report.mean_alignment())
