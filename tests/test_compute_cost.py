"""compute() cost control (issue 12, item 5): ranks=False skips the rank eigendecompositions, timings per part."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import canonreg.functional as cf
from canonreg import CRHMonitor

_PARTS = {"reduce", "matrices", "alignment", "exponents", "ranks", "total"}


def _monitored(preprocess: str = "normalized") -> CRHMonitor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 6, 3), nn.Flatten(), nn.Linear(6 * 4 * 4, 4)).double()
    monitor = CRHMonitor(model, preprocess=preprocess)
    g = torch.Generator().manual_seed(1)
    with monitor:
        for _ in range(2):
            x = torch.randn(8, 3, 6, 6, generator=g, dtype=torch.float64)
            y = torch.randint(0, 4, (8,), generator=g)
            F.cross_entropy(model(x), y).backward()
    return monitor


@pytest.mark.parametrize("preprocess", ["raw", "normalized"])
def test_ranks_false_gives_the_same_report_without_ranks(preprocess: str) -> None:
    monitor = _monitored(preprocess)
    full = monitor.compute(n_bootstrap=20)
    cheap = monitor.compute(n_bootstrap=20, ranks=False)
    cheapest = monitor.compute(exponents=False, ranks=False)
    assert cheap.alignment == full.alignment and cheapest.alignment == full.alignment
    assert cheap.samples == full.samples and cheap.steps == full.steps
    assert cheap.exponents == full.exponents
    assert full.effective_rank and set(full.effective_rank) == set(full.alignment)
    assert cheap.effective_rank == {} and cheapest.effective_rank == {} and cheapest.exponents == {}
    for layer in full.layers:
        for k, v in full.matrices(layer).items():
            assert torch.equal(cheapest.matrices(layer)[k], v)
            assert v.device.type == "cpu"
    assert "crh/rank/" not in " ".join(cheap.to_flat_dict())
    assert any(k.startswith("crh/rank/") for k in full.to_flat_dict())


@pytest.mark.parametrize("exponents", [True, False])
def test_effective_ranks_equal_the_functional_definitions(exponents: bool) -> None:
    # with exponents the ranks of G_a and G_b reuse the fits' eigh; without, every matrix has its own eigvalsh
    report = _monitored().compute(exponents=exponents, n_bootstrap=0)
    for layer in report.layers:
        mats = report.matrices(layer)
        assert set(report.effective_rank[layer]) == {"H_a", "H_b", "G_a", "G_b"}
        for m, got in report.effective_rank[layer].items():
            assert got["participation"] == pytest.approx(float(cf.participation_ratio(mats[m])), rel=1e-10)
            assert got["entropy"] == pytest.approx(float(cf.entropy_rank(mats[m])), rel=1e-10)


def test_timings_cover_every_part() -> None:
    monitor = _monitored()
    for kwargs in ({}, {"ranks": False, "exponents": False}):
        t = monitor.compute(n_bootstrap=10, **kwargs).timings
        assert set(t) == _PARTS
        assert all(v >= 0 and math.isfinite(v) for v in t.values())
        assert t["total"] == pytest.approx(sum(v for k, v in t.items() if k != "total"))


def test_ranks_argument_is_checked() -> None:
    monitor = _monitored()
    with pytest.raises((TypeError, ValueError), match="ranks"):
        monitor.compute(ranks="no")  # type: ignore[arg-type]


def _square_monitored() -> CRHMonitor:
    # d_a = d_b = 6: G_a, Z_a, G_b, Z_b share one shape, so one batched eigh serves all four
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    monitor = CRHMonitor(model, preprocess="centered")
    g = torch.Generator().manual_seed(4)
    with monitor:
        for _ in range(3):
            x = torch.randn(16, 6, generator=g, dtype=torch.float64)
            F.cross_entropy(model(x), torch.randint(0, 3, (16,), generator=g)).backward()
    return monitor


@pytest.mark.parametrize("make", [_square_monitored, _monitored])
def test_batched_eigendecompositions_give_the_independent_fits(make) -> None:
    # reference: power_law_fit on the report's matrices, each with its own eigh, same bootstrap order
    report = make().compute(n_bootstrap=30, bootstrap_seed=7, floor=1e-8)
    gen = torch.Generator().manual_seed(7)
    for layer in report.layers:
        mats = report.matrices(layer)
        for rel, (pa, pb) in cf.RELATION_PAIRS.items():
            want = cf.power_law_fit(mats[pa], mats[pb], floor=1e-8, n_bootstrap=30, generator=gen)
            got = report.exponents[layer][rel]
            assert got.n_points == want.n_points, (layer, rel)
            for field in ("exponent", "intercept", "r2", "off_diagonal", "ci_low", "ci_high"):
                a, b = getattr(got, field), getattr(want, field)
                assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-7, abs=1e-9), (layer, rel, field)


def test_renamed_compute_arguments_warn_and_give_the_same_report() -> None:
    monitor = _monitored()
    new = monitor.compute(n_bootstrap=20, floor=1e-3, bootstrap_seed=5, ranks=False)
    with pytest.warns(FutureWarning, match="`eig_floor` is renamed `floor`"):
        old_floor = monitor.compute(n_bootstrap=20, eig_floor=1e-3, bootstrap_seed=5, ranks=False)
    with pytest.warns(FutureWarning, match="`seed` is renamed `bootstrap_seed`"):
        old_seed = monitor.compute(n_bootstrap=20, floor=1e-3, seed=5, ranks=False)
    for old in (old_floor, old_seed):
        assert old.alignment == new.alignment
        assert old.to_dict()["exponents"] == new.to_dict()["exponents"]  # same floor, same bootstrap draws
    assert monitor.compute(n_bootstrap=20, bootstrap_seed=6, ranks=False).to_dict()["exponents"] != new.to_dict()["exponents"]
    with pytest.raises(TypeError, match="both `seed` and its new name `bootstrap_seed`"):
        monitor.compute(seed=1, bootstrap_seed=1)
    with pytest.raises(ValueError, match=r"`floor` \(formerly `eig_floor`\).*1\.5"):
        monitor.compute(floor=1.5)
    with pytest.raises(ValueError, match=r"`bootstrap_seed` \(formerly `seed`\).*-1"):
        monitor.compute(bootstrap_seed=-1)
