"""canonreg.moments, the monitor's streaming moment math, against dense float64 references."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

import canonreg.moments as mo


def _dense(rows: list[Tensor], centered: bool, point: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(n, Σ(x − o), Σ(x − o)(x − o)ᵀ)`` in float64 with ``o`` = ``point``, else the mean (centred) or 0 (raw)."""
    x = torch.cat(rows).double()
    o = point if point is not None else (x.mean(0) if centered else torch.zeros(x.shape[1], dtype=torch.float64))
    d = x - o
    return torch.tensor(float(x.shape[0]), dtype=torch.float64), d.sum(0), d.T @ d


@pytest.mark.parametrize("d", [3, 4, 11])
def test_upper_gram_is_the_full_gram_once_symmetrised(monkeypatch: pytest.MonkeyPatch, d: int) -> None:
    """Blocks of 4 and panels of 3: widths below, at and above the block take both code paths."""
    monkeypatch.setattr(mo, "_SYRK_BLOCK", 4)
    monkeypatch.setattr(mo, "_SYRK_PANEL", 3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, d, generator=g, dtype=torch.float64)
    out = torch.zeros(d, d, dtype=torch.float64)
    mo._gram_upper_(out, x)
    mo._gram_upper_(out, x, alpha=0.5)
    assert_close(mo.symmetric_from_upper(out), 1.5 * x.T @ x, rtol=1e-14, atol=1e-14)
    assert_close(mo.symmetric_from_upper(mo._gram(x)), x.T @ x, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("d", [3, 4, 11])
def test_symmetric_from_upper_reads_only_the_upper_triangle(monkeypatch: pytest.MonkeyPatch, d: int) -> None:
    """``scale · S − μμᵀ`` from triu(M) alone (NaN below the diagonal is never read), exactly symmetric."""
    monkeypatch.setattr(mo, "_SYRK_BLOCK", 4)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, d, generator=g, dtype=torch.float64)
    full = x.T @ x
    upper = torch.triu(full) + torch.tril(torch.full_like(full, float("nan")), -1)
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    got = mo.symmetric_from_upper(upper, 0.25, mean)
    assert_close(got, 0.25 * torch.triu(full) + 0.25 * torch.triu(full, 1).T - torch.outer(mean, mean), rtol=1e-14, atol=1e-14)
    assert torch.equal(got, got.T)
    assert torch.equal(mo.symmetric_from_upper(upper), torch.triu(full) + torch.triu(full, 1).T)


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_streamed_moment_equals_the_float64_moment_of_all_rows(centered: bool, offset: float) -> None:
    """40 float32 calls (two folds and a partial window) of rows ``offset + N(0, 1)``: the centred moment does not
    cancel at the offset 1000 (float32 ``Σxxᵀ − nμμᵀ`` would keep ~3 digits there)."""
    g = torch.Generator().manual_seed(1)
    rows = [offset + torch.randn(int(torch.randint(1, 9, (1,), generator=g)), 5, generator=g) for _ in range(40)]
    m = mo._Moment(centered)
    for i, r in enumerate(rows):
        m.add_rows(r, 1.0, None)
        if (i + 1) % mo._FOLD_EVERY == 0:
            m.fold()
    m.fold()
    got = m.about(None)
    assert got is not None
    n, s_x, s_xx = _dense(rows, centered)
    assert float(m.n) == float(n)  # type: ignore[arg-type]
    # float32 windows of power-of-two-scaled deviations: relative error of a few float32 ulp of the scale
    assert_close(got[1], s_xx, rtol=1e-5, atol=1e-5 * float(s_xx.diagonal().max()))
    assert_close(got[0] if m.origin is None else got[0] + n * m.origin, s_x if not centered else n * torch.cat(rows).double().mean(0),
                 rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("centered", [False, True])
def test_reduced_calls_and_projected_calls_add_like_their_rows(centered: bool) -> None:
    """``add_call`` of a call reduced in its forward hook, and of ``x = A z`` through ``A [Σzzᵀ] Aᵀ``, equals
    ``add_rows`` of the same rows (float64 throughout); a centred moment about another point re-centres exactly
    (raw moments have no origin: ``about`` returns them as they are)."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(9, 3, generator=g, dtype=torch.float64)
    zs = [3.0 + torch.randn(6, 3, generator=g, dtype=torch.float64) for _ in range(5)]
    rows = [z @ a.T for z in zs]
    by_rows, by_calls, by_projection = mo._Moment(centered), mo._Moment(centered), mo._Moment(centered)
    for z, r in zip(zs, rows):
        by_rows.add_rows(r, 1.0, None)
        by_calls.add(by_calls.reduce(r), None)
        by_projection.add(mo._CallMoment.projected(z, a, torch.float64), None)
    point = torch.randn(9, generator=g, dtype=torch.float64) if centered else None
    n, s_x, s_xx = _dense(rows, centered, point)
    for m in (by_rows, by_calls, by_projection):
        m.fold()
        got = m.about(point)
        assert got is not None
        assert_close(got[0], s_x, rtol=1e-10, atol=1e-9)
        assert_close(got[1], s_xx, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("centered", [False, True])
def test_sketched_moment_is_the_dense_moment_times_the_probe(centered: bool) -> None:
    g = torch.Generator().manual_seed(3)
    probe = torch.randn(6, 3, generator=g, dtype=torch.float64)
    rows = [2.0 + torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(20)]
    m = mo._Moment(centered, probe)
    for i, r in enumerate(rows):
        m.add(r if i % 2 else m.reduce(r), None)
        if i == 10:
            m.fold()
    m.fold()
    got = m.about(None)
    assert got is not None
    _, _, s_xx = _dense(rows, centered)
    assert_close(got[1], s_xx @ probe, rtol=1e-10, atol=1e-9)


def test_masked_contributions_add_exact_zeros() -> None:
    """``ok = False`` (a deferred non-finite call) adds nothing, even a NaN row; ``ok = True`` adds the rows."""
    m = mo._Moment(True)
    bad = torch.tensor([[float("nan"), 1.0], [2.0, 3.0]])
    good = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    m.add_rows(bad, 1.0, torch.tensor(False))
    m.add_rows(good, 1.0, torch.tensor(True))
    m.fold()
    got = m.about(None)
    assert got is not None
    n, _, s_xx = _dense([good], True)
    assert float(m.n) == float(n)  # type: ignore[arg-type]
    assert_close(got[1], s_xx)


@pytest.mark.parametrize("centered", [False, True])
def test_flagged_calls_of_several_sizes_count_like_the_good_calls_alone(centered: bool) -> None:
    """Under deferred checks a window counts its flagged calls' rows once per fold (grouped by row count);
    calls of 3 and 5 rows, flagged and not, some bad, reduced or not, over two windows: the count, mean
    and second moment equal those of the good calls added alone (float64: exactly equal counts)."""
    g = torch.Generator().manual_seed(5)
    calls = [(1.0 + torch.randn(3 if i % 3 else 5, 4, generator=g, dtype=torch.float64), i % 4 != 2, i % 5 == 0) for i in range(11)]
    flagged, plain = mo._Moment(centered), mo._Moment(centered)
    for i, (rows, good, unflagged) in enumerate(calls):
        bad = rows.clone()
        bad[0, 0] = float("nan")
        item = rows if good else bad
        ok = None if unflagged and good else torch.tensor(good)
        flagged.add(item if i % 2 else flagged.reduce(item), ok)
        if good:
            plain.add(rows if i % 2 else plain.reduce(rows), None)
        if i == 6:
            flagged.fold()
            plain.fold()
    flagged.fold()
    plain.fold()
    kept = [r for r, good, _ in calls if good]
    n, s_x, s_xx = _dense(kept, centered)
    assert float(flagged.n) == float(plain.n) == float(n)  # type: ignore[arg-type]
    a, b = flagged.about(None), plain.about(None)
    assert a is not None and b is not None
    assert_close(a[1], b[1], rtol=1e-12, atol=1e-12)
    assert_close(a[1], s_xx, rtol=1e-10, atol=1e-9)


def test_row_norms_normalisation_and_scales() -> None:
    """Row norms stay finite and exact for rows of 1e30 and 1e-30 (the float32 fast path falls back to float64);
    a zero row stays zero; scales are powers of two."""
    x = torch.tensor([[3e30, 4e30], [3e-30, 4e-30], [0.0, 0.0], [3.0, 4.0]])
    norms = mo._row_norm2(x)
    norm2 = norms.sq
    assert norm2.dtype == torch.float64 and not norms.checked  # out of the float32 range: the float64 route
    assert_close(norm2, x.double().square().sum(1), rtol=1e-6, atol=0.0)
    unit = mo._normalize(x, norms)
    assert torch.isfinite(unit).all() and unit[2].eq(0).all()
    assert_close(unit[[0, 1, 3]], torch.tensor([[0.6, 0.8]] * 3))
    assert_close(mo._inverse_norm(norm2.clone()), torch.tensor([1 / 5e30, 1 / 5e-30, 0.0, 0.2], dtype=torch.float64))
    s = mo._pow2_scale(torch.tensor([3.0, 0.0, 0.0, float("nan")]), torch.tensor([1.0, 0.3, 0.0, 1.0]))
    assert s.tolist() == [2.0, 0.25, 1.0, 1.0]


def test_float32_fast_norm_is_the_rounded_root_of_the_float64_square() -> None:
    """The float32 CPU route hands :func:`_normalize` its own norm: it must equal the float64 route's
    ``sqrt(‖x_i‖²)`` rounded to float32 bit for bit, so normalising is the same either way."""
    x = torch.randn(257, 33, generator=torch.Generator().manual_seed(0)) * torch.logspace(-5, 5, 257).unsqueeze(1)
    fast = mo._row_norm2(x)
    assert fast.checked
    norm = fast.norm(torch.float32)
    norm2 = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).square()
    assert torch.equal(fast.sq, norm.double().square())
    assert torch.equal(norm, fast.sq.sqrt().float())
    slow = mo.RowNorms(root=fast.sq.sqrt())  # the float64 route given the same norms
    assert torch.equal(mo._normalize(x, fast), mo._normalize(x, slow))
    assert_close(fast.sq, norm2, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("sketched", [False, True])
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_folds_in_row_panels_reuse_the_window_and_match_the_dense_moment(
    monkeypatch: pytest.MonkeyPatch, centered: bool, sketched: bool, dtype: torch.dtype
) -> None:
    """Panels of 3 rows over d = 11 (ragged last panel), four windows: the totals' upper triangle (exact) or
    whole sketch equals the dense float64 moment; each later window reuses the zeroed buffer of the last."""
    monkeypatch.setattr(mo, "_SYRK_PANEL", 3)
    monkeypatch.setattr(mo, "_SYRK_BLOCK", 4)
    g = torch.Generator().manual_seed(5)
    probe = torch.randn(11, 4, generator=g, dtype=torch.float64) if sketched else None
    rows = [(50.0 + torch.randn(5, 11, generator=g, dtype=torch.float64)).to(dtype) for _ in range(12)]
    m = mo._Moment(centered, probe)
    buffers = []
    for i, r in enumerate(rows):
        m.add_rows(r, 1.0, None)
        if i % 3 == 0:
            buffers.append(m.w_xx)
        if i % 3 == 2:
            m.fold()
    got = m.about(None)
    assert got is not None
    _, _, s_xx = _dense([r.double() for r in rows], centered)
    want = s_xx @ probe if probe is not None else torch.triu(s_xx)
    have = got[1] if probe is not None else torch.triu(got[1])
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_close(have, want, rtol=tol, atol=tol * float(s_xx.abs().max()))
    # every window after the first reuses the zeroed buffer (float64 rows: the first became the totals)
    assert buffers[2] is buffers[1] and buffers[3] is buffers[1]
    assert (buffers[1] is buffers[0]) == (dtype == torch.float32)
