"""CRHMonitor(sketch=k): the six α̂ from d × (k + 1) sketches of the streamed moments (canonreg.sketch).

References: the per-sample autograd loop of conftest (dense moments, float64), the closed-form sketch
of those dense moments with the monitor's own probes, and Monte-Carlo means of the estimator.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import make_case, ref_cosine, ref_matrices, ref_pearson, reference_rows, run_monitor, two_simulated_ranks
from torch import Tensor, nn

import canonreg
from canonreg import CanonRegError, CRHMonitor
from canonreg import sketch as sk

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: OpenMP barriers cost more than the math

SIDES = {"H_a": "a", "G_a": "a", "Z_a": "a", "H_b": "b", "G_b": "b", "Z_b": "b"}


def _dense_sketch_alpha(mats: dict[str, Tensor], probes: dict[str, Tensor], metric: str) -> dict[str, float]:
    """α̂ by the definition, from dense matrices: cosine of ``(M − M̄ 11ᵀ)Ω`` (Pearson) or ``MΩ`` (cosine)."""
    out = {}
    for rel, (pa, pb) in canonreg.RELATION_PAIRS.items():
        omega = probes[SIDES[pa]][:, :-1].double()
        xs = []
        for m in (pa, pb):
            a = mats[m].double()
            if metric == "pearson":
                a = a - a.mean()
            xs.append(a @ omega)
        out[rel] = float((xs[0] * xs[1]).sum() / math.sqrt(float((xs[0] ** 2).sum() * (xs[1] ** 2).sum())))
    return out


@pytest.mark.parametrize("metric", ["pearson", "cosine"])
@pytest.mark.parametrize("preprocess", ["raw", "centered", "normalized"])
@pytest.mark.parametrize("name", ["mlp", "conv1d", "transformer"])
def test_sketch_at_full_width_is_exact_against_the_per_sample_reference(name: str, preprocess: str, metric: str) -> None:
    """k ≥ d: Ω = I, so α̂ is the exact α of the dense per-sample moments."""
    case = make_case(name)
    refs = reference_rows(case)
    report = run_monitor(case, preprocess=preprocess, metric=metric, sketch=64).compute(exponents=False, ranks=False)
    score = ref_pearson if metric == "pearson" else ref_cosine
    for layer in case.layers:
        mats = ref_matrices(refs[layer], preprocess)
        for rel, (pa, pb) in canonreg.RELATION_PAIRS.items():
            want = score(mats[pa], mats[pb])
            assert report.alignment[layer][rel] == pytest.approx(want, abs=1e-9), (layer, rel)


@pytest.mark.parametrize("preprocess", ["raw", "centered", "normalized"])
def test_streamed_sketch_equals_the_sketch_of_the_exact_moments(preprocess: str) -> None:
    """k < d, 40 calls (two folds), a large input offset: α̂ equals the closed-form sketch of the dense
    per-sample moments with the monitor's own probes (no cancellation in the shifted windows either)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(9, 14), nn.Tanh(), nn.Linear(14, 11), nn.Tanh(), nn.Linear(11, 4)).double()
    with torch.no_grad():
        model[0].weight.mul_(1e-3)  # inputs sit at 1000: keep the first Tanh out of saturation
    batches = [(1000 + torch.randn(6, 9, dtype=torch.float64), torch.randint(0, 4, (6,))) for _ in range(40)]
    case = make_case("mlp")
    case.model, case.batches, case.layers = model, batches, ["0", "2", "4"]
    refs = reference_rows(case)
    for metric in ("pearson", "cosine"):
        monitor = run_monitor(case, preprocess=preprocess, metric=metric, sketch=3)
        report = monitor.compute(exponents=False, ranks=False)
        for layer in case.layers:
            got = report.alignment[layer]
            want = _dense_sketch_alpha(ref_matrices(refs[layer], preprocess), monitor._probes[layer], metric)
            for rel in canonreg.RELATIONS:
                assert got[rel] == pytest.approx(want[rel], abs=1e-6), (metric, layer, rel, got[rel], want[rel])


def test_sketched_inner_products_are_unbiased() -> None:
    """⟨(A − ĀJ)Ω, (B − B̄J)Ω⟩ over 1,000 probe draws averages to Σ(A − Ā)(B − B̄) within 4 standard errors."""
    gen = torch.Generator().manual_seed(0)
    d, k = 24, 4
    x, y = torch.randn(50, d, generator=gen, dtype=torch.float64), torch.randn(50, d, generator=gen, dtype=torch.float64)
    a, b = x.T @ x / 50, (x + y).T @ (x + y) / 50
    ac, bc = a - a.mean(), b - b.mean()
    exact = float((ac * bc).sum())
    draws = []
    for _ in range(1000):
        omega = sk.probe(d, k, gen)[:, :-1]
        draws.append(float(((ac @ omega) * (bc @ omega)).sum()))
    t = torch.tensor(draws)
    assert abs(float(t.mean()) - exact) < 4 * float(t.std()) / math.sqrt(len(draws))
    assert float(t.std()) > 0.01 * abs(exact)  # a real estimator, not the exact value each time


def _trained_mlp_reports(ks: list[int]) -> tuple[dict[str, dict[str, float]], dict[int, dict[str, dict[str, float]]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    teacher = torch.randn(20, 5)
    xs = [torch.randn(64, 20) for _ in range(30)]
    for x in xs:  # a short training run: structured (non-random) moments
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), (x @ teacher).argmax(1)).backward()
        opt.step()
    monitors: dict[int | None, CRHMonitor] = {None: CRHMonitor(model)} | {k: CRHMonitor(model, sketch=k) for k in ks}
    reports: dict[int | None, dict[str, dict[str, float]]] = {}
    for k, mon in monitors.items():
        with mon:
            for x in xs[:8]:
                model.zero_grad()
                nn.functional.cross_entropy(model(x), (x @ teacher).argmax(1)).backward()
        reports[k] = mon.compute(exponents=False, ranks=False).alignment
    exact = reports.pop(None)
    return exact, {k: v for k, v in reports.items() if k is not None}


def test_sketch_error_is_small_and_shrinks_with_k() -> None:
    """Normalized monitor of a trained 20→96→96→5 MLP: max |α̂ − α| over the six relations and three
    layers is below 0.15 at k = 48 (half the width) and the mean error falls from k = 12 to k = 48."""
    exact, sketched = _trained_mlp_reports([12, 48])
    err = {
        k: [abs(rep[layer][r] - exact[layer][r]) for layer in exact for r in canonreg.RELATIONS] for k, rep in sketched.items()
    }
    assert max(err[48]) < 0.15, err[48]
    assert sum(err[48]) / len(err[48]) < sum(err[12]) / len(err[12])


def test_sketched_state_is_d_by_k_plus_one_and_balance_is_exact() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(300, 260), nn.Tanh(), nn.Linear(260, 3))
    xs = [torch.randn(20, 300) for _ in range(3)]
    reports = {}
    for k in (None, 16):
        monitor = CRHMonitor(model, sketch=k)
        with monitor:
            for x in xs:
                model.zero_grad()
                model(x).square().mean().backward()
        if k is not None:
            sizes = {m: mom.s_xx.shape for m, mom in monitor._state["0"].moments.items() if mom.s_xx is not None}
            sizes |= {m: mom.w_xx.shape for m, mom in monitor._state["0"].moments.items() if mom.w_xx is not None}
            assert sizes and all(s in {(300, 17), (260, 17)} for s in sizes.values()), sizes
        reports[k] = monitor.compute(exponents=False, ranks=False, lr=0.1, weight_decay=1e-3, batch_size=20)
    assert reports[16].samples == reports[None].samples == {"0": 60, "2": 60}
    for layer in ("0", "2"):
        b16, b = reports[16].balance[layer], reports[None].balance[layer]
        for field in ("decay", "drift", "noise"):
            assert getattr(b16, field) == pytest.approx(getattr(b, field), rel=1e-12)


def test_sketched_monitor_refuses_what_needs_the_full_matrices() -> None:
    case = make_case("mlp")
    monitor = run_monitor(case, sketch=2)
    for kwargs in ({}, {"exponents": False}, {"ranks": False}):
        with pytest.raises(CanonRegError, match="exponents=False, ranks=False"):
            monitor.compute(**kwargs)
    report = monitor.compute(exponents=False, ranks=False)
    assert report.exponents == {} and report.effective_rank == {}
    with pytest.raises(KeyError, match="keeps none"):
        report.matrices(report.layers[0])
    with pytest.raises(KeyError, match="`layer`"):
        report.matrices("no-such-layer")


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "64"])
def test_bad_sketch_argument_names_it(bad: object) -> None:
    with pytest.raises((ValueError, TypeError), match="`sketch`"):
        CRHMonitor(nn.Linear(3, 2), sketch=bad)  # type: ignore[arg-type]


def test_two_simulated_ranks_reduce_the_sketches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The distributed path (two ranks as threads) gives both ranks the α̂ of one process that saw all rows."""
    torch.manual_seed(5)
    init = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3))
    with torch.no_grad():
        init[0].weight.mul_(1e-2)  # inputs sit at 100: keep the Tanh out of saturation
    data = [[100 + torch.randn(8, 12) for _ in range(3)], [100.5 + torch.randn(8, 12) for _ in range(3)]]

    def run(m: nn.Module, batches: list[Tensor]) -> canonreg.CRHReport:
        monitor = CRHMonitor(m, preprocess="centered", sketch=4)
        with monitor:
            for x in batches:
                m.zero_grad()
                m(x).square().mean().backward()
        return monitor.compute(exponents=False, ranks=False)

    single = run(copy.deepcopy(init), [*data[0], *data[1]])
    reports, calls = two_simulated_ranks(monkeypatch, lambda rank: run(copy.deepcopy(init), data[rank]))
    assert calls == 2  # the small mean reduction, then the main one
    for rank in (0, 1):
        report = reports[rank]
        assert isinstance(report, canonreg.CRHReport)
        assert report.samples == single.samples
        for layer in single.layers:
            for rel in canonreg.RELATIONS:
                assert report.alignment[layer][rel] == pytest.approx(single.alignment[layer][rel], abs=1e-5)


@pytest.mark.parametrize("k", [8, 16])
def test_sketched_pearson_of_a_constant_matrix_is_undefined(k: int) -> None:
    """Raw ``H_a`` of identical rows is ``0.09·11ᵀ``: no spread, Pearson α undefined, as the exact monitor says.
    Its entry-centred sketch is rounding (it scored f-RGA 0.026 / −0.023 at k = 8 / 16)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48, bias=False))
    monitor = CRHMonitor(model, preprocess="raw", sketch=k)
    with monitor:
        (model(torch.full((40, 64), 0.3)) * torch.randn(40, 48)).sum().backward()
    report = monitor.compute(exponents=False, ranks=False)
    for rel in ("f-RGA", "f-RWA"):
        assert math.isnan(report.alignment["0"][rel]) and "constant" in report.nan_reasons["0"][rel]
    assert not math.isnan(report.alignment["0"]["b-GWA"])
