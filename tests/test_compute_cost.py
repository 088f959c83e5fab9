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
