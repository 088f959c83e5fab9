"""Pure functions: hypothesis properties and closed-form checks against obvious implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch.testing import assert_close

from canonreg import functional as cf

pytestmark = pytest.mark.usefixtures("single_thread")

PROPS = settings(max_examples=40, deadline=None, derandomize=True)  # seeded: same examples every run

finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def matrix_pair(draw, square: bool = False):
    n = draw(st.integers(1, 5))
    m = n if square else draw(st.integers(1, 5))
    a = draw(arrays(np.float64, (n, m), elements=finite))
    b = draw(arrays(np.float64, (n, m), elements=finite))
    return torch.from_numpy(a), torch.from_numpy(b)


def _spread(x: torch.Tensor) -> float:
    return float((x - x.mean()).abs().max())


def _np_pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.reshape(-1).numpy(), b.reshape(-1).numpy())[0, 1])


# ----------------------------------------------------------------------------- alignment
@PROPS
@given(matrix_pair(), st.sampled_from(["pearson", "cosine"]))
def test_alignment_symmetric_and_bounded(pair, metric) -> None:
    a, b = pair
    x, y = cf.alignment(a, b, metric), cf.alignment(b, a, metric)
    assert_close(x, y, equal_nan=True)
    if not math.isnan(float(x)):
        assert -1.0 <= float(x) <= 1.0


@PROPS
@given(matrix_pair(), st.floats(1e-3, 1e3), st.floats(1e-3, 1e3), st.sampled_from(["pearson", "cosine"]))
def test_alignment_positive_scale_invariant(pair, c1, c2, metric) -> None:
    a, b = pair
    assume(_spread(a) > 1e-3 and _spread(b) > 1e-3 and float(a.abs().max()) > 1e-3 and float(b.abs().max()) > 1e-3)
    assert_close(cf.alignment(c1 * a, c2 * b, metric), cf.alignment(a, b, metric), rtol=1e-9, atol=1e-9)
    # a negative scale flips the sign
    assert_close(cf.alignment(-c1 * a, b, metric), -cf.alignment(a, b, metric), rtol=1e-9, atol=1e-9)


@PROPS
@given(matrix_pair(), st.randoms(use_true_random=False), st.sampled_from(["pearson", "cosine"]))
def test_alignment_permutation_invariant(pair, rnd, metric) -> None:
    a, b = pair
    perm = list(range(a.numel()))
    rnd.shuffle(perm)
    p = torch.tensor(perm)
    pa = a.reshape(-1)[p].reshape(a.shape)
    pb = b.reshape(-1)[p].reshape(b.shape)
    assert_close(cf.alignment(pa, pb, metric), cf.alignment(a, b, metric), rtol=1e-9, atol=1e-12, equal_nan=True)


@PROPS
@given(matrix_pair(), st.floats(1e-3, 1e3))
def test_cosine_is_one_for_positive_multiples(pair, c) -> None:
    a, _ = pair
    assume(float(a.abs().max()) > 1e-6)
    assert float(cf.alignment(c * a, a, "cosine")) == pytest.approx(1.0, abs=1e-12)
    assert float(cf.alignment(-c * a, a, "cosine")) == pytest.approx(-1.0, abs=1e-12)


@PROPS
@given(matrix_pair())
def test_alignment_matches_numpy_formulas(pair) -> None:
    a, b = pair
    assume(_spread(a) > 1e-6 and _spread(b) > 1e-6)
    assert float(cf.alignment(a, b, "pearson")) == pytest.approx(_np_pearson(a, b), abs=1e-9)
    cos = float((a * b).sum() / (a.norm() * b.norm()))
    assert float(cf.alignment(a, b, "cosine")) == pytest.approx(cos, abs=1e-9)


def test_alignment_degenerate_inputs_are_nan() -> None:
    z = torch.zeros(3, 3)
    c = torch.full((3, 3), 2.0)
    r = torch.randn(3, 3)
    assert math.isnan(float(cf.alignment(z, r, "cosine")))
    assert math.isnan(float(cf.alignment(c, r, "pearson")))  # constant entries: no spread
    assert float(cf.alignment(c, r, "cosine")) == pytest.approx(float(r.sum() / (3 * r.norm())), abs=1e-6)


def test_alignment_tiny_float32_does_not_underflow() -> None:
    a = torch.randn(4, 4) * 1e-25
    b = torch.randn(4, 4) * 1e-22
    want = _np_pearson(a.double(), b.double())
    assert float(cf.alignment(a, b)) == pytest.approx(want, abs=1e-5)


def test_alignment_is_differentiable() -> None:
    a = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 3, dtype=torch.float64)
    for metric in ("pearson", "cosine"):
        assert torch.autograd.gradcheck(lambda x: cf.alignment(x, b, metric), (a,))


def test_alignment_integer_inputs() -> None:
    a = torch.tensor([[1, 2], [3, 5]])
    b = torch.tensor([[2, 4], [6, 10]])
    assert float(cf.alignment(a, b)) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "call,exc,pattern",
    [
        (lambda: cf.alignment(torch.ones(2, 2), torch.ones(2, 3)), ValueError, "same shape"),
        (lambda: cf.alignment(torch.ones(2, 2), torch.ones(2, 2), "spearman"), ValueError, "`metric`"),
        (lambda: cf.alignment([[1.0]], torch.ones(1, 1)), TypeError, "`a`"),
        (lambda: cf.alignment(torch.ones(0), torch.ones(0)), ValueError, "at least one entry"),
        (lambda: cf.relation_alignments({"H_a": torch.eye(2)}), ValueError, "`matrices`"),
        (lambda: cf.second_moment(torch.ones(3)), ValueError, "2-D"),
        (lambda: cf.second_moment(torch.ones(0, 3)), ValueError, "at least one row"),
        (lambda: cf.second_moment(torch.ones(2, 3), "whitened"), ValueError, "`preprocess`"),
        (lambda: cf.preprocess_rows(torch.ones(2, 3), "x"), ValueError, "`preprocess`"),
        (lambda: cf.moment_from_sums(torch.eye(2), torch.ones(2), 0, centered=True), ValueError, "`count`"),
        (lambda: cf.participation_ratio(torch.ones(2, 3)), ValueError, "square"),
        (lambda: cf.entropy_rank("x"), TypeError, "`h`"),
        (lambda: cf.n_components(torch.eye(3), 1.5), ValueError, "`threshold`"),
        (lambda: cf.n_components(torch.zeros(3, 3)), ValueError, "positive trace"),
        (lambda: cf.random_orthogonal(0), ValueError, "`d`"),
        (lambda: cf.rotation_null_alignment(torch.eye(2), torch.eye(3)), ValueError, "same shape"),
        (lambda: cf.rotation_null_alignment(torch.eye(2), torch.eye(2), num_samples=0), ValueError, "`num_samples`"),
        (lambda: cf.power_law_fit(torch.eye(2), torch.eye(3)), ValueError, "same shape"),
        (lambda: cf.power_law_fit(torch.eye(2), torch.eye(2), floor=1.0), ValueError, "`floor`"),
        (lambda: cf.power_law_fit(torch.eye(2), torch.eye(2), n_bootstrap=-1), ValueError, "`n_bootstrap`"),
        (lambda: cf.power_law_fit(torch.eye(2), torch.eye(2), eig=(torch.ones(3),)), ValueError, "`eig`"),
        (lambda: cf.nc1(torch.randn(4, 2), torch.zeros(4, dtype=torch.long)), ValueError, "at least 2 classes"),
        (lambda: cf.nc1(torch.randn(4, 2), torch.zeros(3, dtype=torch.long)), ValueError, "`labels`"),
        (lambda: cf.nc1(torch.randn(4, 2), [0, 1, 0, 1]), TypeError, "`labels`"),
        (lambda: cf.invariance_score(torch.randn(4, 2), torch.randn(4, 3)), ValueError, "same shape"),
        (lambda: cf.invariance_score(torch.randn(1, 2), torch.randn(1, 2)), ValueError, "at least 2"),
        (lambda: cf.balance_terms(1.0, 0.0, 0.0, lr=0.0, weight_decay=0.0, batch_size=1), ValueError, "`lr`"),
        (lambda: cf.balance_terms(1.0, 0.0, 0.0, lr=0.1, weight_decay=-1, batch_size=1), ValueError, "`weight_decay`"),
        (lambda: cf.balance_terms(1.0, 0.0, 0.0, lr=0.1, weight_decay=0.0, batch_size=0), ValueError, "`batch_size`"),
        (lambda: cf.balance_terms(1.0, 0.0, 0.0, lr=True, weight_decay=0.0, batch_size=1), ValueError, "`lr`"),
    ],
)
def test_bad_input_names_the_argument(call, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        call()


# ----------------------------------------------------------------------------- moments
@pytest.mark.parametrize("mode", ["raw", "centered", "normalized"])
def test_second_moment_matches_outer_products(mode: str) -> None:
    x = torch.randn(9, 4, dtype=torch.float64)
    x[3] = 0.0  # a zero row stays zero under normalisation and still counts as a sample
    rows = [r / r.norm() if (mode == "normalized" and r.norm() > 0) else r for r in x]
    mu = sum(rows) / len(rows)
    if mode == "raw":
        want = sum(torch.outer(r, r) for r in rows) / len(rows)
    else:
        want = sum(torch.outer(r - mu, r - mu) for r in rows) / len(rows)
    assert_close(cf.second_moment(x, mode), want)
    y = cf.preprocess_rows(x, mode)
    assert_close(cf.moment_from_sums(y.T @ y, y.sum(0), 9, centered=mode != "raw"), want)


# ----------------------------------------------------------------------------- power law
@st.composite
def codiagonal(draw):
    d = draw(st.integers(4, 10))
    kappa = draw(st.floats(-1.0, 3.0))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    lam = torch.exp(torch.empty(d, dtype=torch.float64).uniform_(-3, 3, generator=g))
    assume(float(lam.max() / lam.min()) > 2.0)
    v = cf.random_orthogonal(d, generator=g)
    return v, lam, kappa


@PROPS
@given(codiagonal())
def test_power_law_fit_recovers_exponent_on_codiagonal_pairs(data) -> None:
    v, lam, kappa = data
    a = v @ torch.diag(lam**kappa) @ v.T
    b = v @ torch.diag(lam) @ v.T
    fit = cf.power_law_fit(a, b, n_bootstrap=50, generator=torch.Generator().manual_seed(0))
    assert fit.exponent == pytest.approx(kappa, abs=1e-6)
    assert fit.intercept == pytest.approx(0.0, abs=1e-6)
    # |κ| ~ 1e-12 leaves a log-spread of a_i near round-off, so R² is only 1 to ~1e-7 there
    assert fit.r2 == pytest.approx(1.0, abs=1e-6)
    assert fit.off_diagonal == pytest.approx(0.0, abs=1e-9)
    assert fit.n_points == lam.numel()
    assert fit.ci_low - 1e-6 <= kappa <= fit.ci_high + 1e-6
    # a constant factor shifts only the intercept
    fit2 = cf.power_law_fit(2.5 * a, b, n_bootstrap=0)
    assert fit2.exponent == pytest.approx(kappa, abs=1e-6)
    assert fit2.intercept == pytest.approx(math.log(2.5), abs=1e-6)
    assert math.isnan(fit2.ci_low) and math.isnan(fit2.ci_high)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_power_law_fit_with_noise_interval_contains_truth(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    d, kappa = 40, 2.0
    lam = torch.exp(torch.linspace(-4, 2, d, dtype=torch.float64))
    v = cf.random_orthogonal(d, generator=g)
    noise = 0.1 * torch.randn(d, dtype=torch.float64, generator=g)
    a = v @ torch.diag(lam**kappa * torch.exp(noise)) @ v.T
    b = v @ torch.diag(lam) @ v.T
    fit = cf.power_law_fit(a, b, n_bootstrap=400, generator=g)
    assert fit.ci_low <= kappa <= fit.ci_high
    assert fit.ci_high - fit.ci_low < 0.1
    assert abs(fit.exponent - kappa) < 0.05
    assert 0.99 < fit.r2 <= 1.0


def test_power_law_off_diagonal_closed_form() -> None:
    lam = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    b = torch.diag(lam)
    a = torch.randn(4, 4, dtype=torch.float64)
    a = a @ a.T + torch.eye(4, dtype=torch.float64)
    off = torch.linalg.matrix_norm(a - torch.diag(torch.diagonal(a))) / torch.linalg.matrix_norm(a)
    fit = cf.power_law_fit(a, b, n_bootstrap=0)
    assert fit.off_diagonal == pytest.approx(float(off), rel=1e-12)
    # degenerate eigenspace of B: A's block inside it is basis-dependent and not counted
    b = torch.diag(torch.tensor([1.0, 1.0, 4.0, 8.0], dtype=torch.float64))
    a = torch.eye(4, dtype=torch.float64)
    a[0, 1] = a[1, 0] = 0.5
    assert cf.power_law_fit(a, b, n_bootstrap=0).off_diagonal == pytest.approx(0.0, abs=1e-12)
    a[0, 2] = a[2, 0] = 0.5
    off = math.sqrt(2 * 0.25) / float(torch.linalg.matrix_norm(a))
    assert cf.power_law_fit(a, b, n_bootstrap=0).off_diagonal == pytest.approx(off, rel=1e-12)


def test_power_law_floor_and_too_few_points() -> None:
    lam = torch.tensor([1e-9, 1e-8, 0.5, 1.0, 2.0], dtype=torch.float64)
    fit = cf.power_law_fit(torch.diag(lam**2), torch.diag(lam), floor=1e-6, n_bootstrap=0)
    assert fit.n_points == 3 and fit.exponent == pytest.approx(2.0)
    fit = cf.power_law_fit(torch.diag(lam**2), torch.diag(lam), floor=0.3, n_bootstrap=10)
    assert fit.n_points == 2 and math.isnan(fit.exponent) and math.isnan(fit.ci_low)
    flat = cf.power_law_fit(torch.diag(torch.tensor([1.0, 2.0, 3.0])), torch.eye(3), n_bootstrap=5)
    assert math.isnan(flat.exponent)  # equal eigenvalues: slope undefined
    zero = cf.power_law_fit(torch.zeros(3, 3), torch.eye(3) * torch.tensor([1.0, 2.0, 3.0]))
    assert math.isnan(zero.exponent) and math.isnan(zero.off_diagonal)
    assert set(fit.to_dict()) == {"exponent", "intercept", "r2", "ci_low", "ci_high", "off_diagonal", "n_points"}


def test_power_law_precomputed_eig_gives_same_fit() -> None:
    a = torch.randn(5, 5, dtype=torch.float64)
    a = a @ a.T
    b = torch.randn(5, 5, dtype=torch.float64)
    b = b @ b.T
    b = 0.5 * (b + b.T)  # exactly symmetric: a BLAS b @ bᵀ may differ from its transpose in the last bit
    f1 = cf.power_law_fit(a, b, n_bootstrap=30, generator=torch.Generator().manual_seed(1))
    f2 = cf.power_law_fit(a, b, n_bootstrap=30, generator=torch.Generator().manual_seed(1), eig=torch.linalg.eigh(b))
    assert f1 == f2


# ----------------------------------------------------------------------------- ranks & co
@PROPS
@given(st.lists(st.floats(0.0, 100.0), min_size=1, max_size=8), st.integers(0, 1000))
def test_participation_and_entropy_rank_closed_forms(spectrum, seed) -> None:
    lam = torch.tensor(spectrum, dtype=torch.float64)
    assume(float(lam.sum()) > 1e-3)
    q = cf.random_orthogonal(lam.numel(), generator=torch.Generator().manual_seed(seed))
    h = q @ torch.diag(lam) @ q.T
    pr = float(lam.sum() ** 2 / (lam**2).sum())
    p = [x / float(lam.sum()) for x in spectrum]
    er = math.exp(-sum(x * math.log(x) for x in p if x > 0))
    assert float(cf.participation_ratio(h)) == pytest.approx(pr, rel=1e-9)
    assert float(cf.entropy_rank(h)) == pytest.approx(er, rel=1e-6, abs=1e-9)
    assert 1.0 - 1e-9 <= float(cf.participation_ratio(h)) <= lam.numel() + 1e-9


def test_rank_special_cases() -> None:
    flat = torch.diag(torch.tensor([2.0, 2.0, 2.0, 0.0], dtype=torch.float64))
    assert float(cf.participation_ratio(flat)) == pytest.approx(3.0)
    assert float(cf.entropy_rank(flat)) == pytest.approx(3.0)
    v = torch.randn(5, dtype=torch.float64)
    assert float(cf.participation_ratio(torch.outer(v, v))) == pytest.approx(1.0)
    assert math.isnan(float(cf.participation_ratio(torch.zeros(3, 3))))
    assert math.isnan(float(cf.entropy_rank(torch.zeros(3, 3))))


def test_n_components_closed_form() -> None:
    q = cf.random_orthogonal(4, generator=torch.Generator().manual_seed(0))
    h = q @ torch.diag(torch.tensor([1.0, 5.0, 1.0, 3.0], dtype=torch.float64)) @ q.T
    assert cf.n_components(h, 0.5) == 1  # 5/10
    assert cf.n_components(h, 0.8) == 2  # (5+3)/10
    assert cf.n_components(h, 0.85) == 3
    assert cf.n_components(h, 0.95) == 4
    assert cf.n_components(h, 1.0) == 4


def test_random_orthogonal_is_orthogonal_and_seeded() -> None:
    q = cf.random_orthogonal(6, generator=torch.Generator().manual_seed(3))
    assert_close(q.T @ q, torch.eye(6, dtype=torch.float64))
    assert torch.equal(q, cf.random_orthogonal(6, generator=torch.Generator().manual_seed(3)))


def test_rotation_null_alignment() -> None:
    a = torch.randn(5, 5, dtype=torch.float64)
    a = a @ a.T
    g = torch.Generator().manual_seed(0)
    null = cf.rotation_null_alignment(a, 3.0 * torch.eye(5, dtype=torch.float64), "cosine", num_samples=7, generator=g)
    # Q (cI) Qᵀ = cI whatever Q is, so every sample equals α(A, I)
    assert null.shape == (7,)
    assert_close(null, cf.alignment(a, torch.eye(5, dtype=torch.float64), "cosine").expand(7))
    b = torch.randn(5, 5, dtype=torch.float64)
    b = b @ b.T
    n1 = cf.rotation_null_alignment(a, b, num_samples=5, generator=torch.Generator().manual_seed(1))
    n2 = cf.rotation_null_alignment(a, b, num_samples=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(n1, n2)
    assert bool(((n1 >= -1) & (n1 <= 1)).all())
    # each sample is α(A, Q B Qᵀ) for the Q drawn in sequence
    g = torch.Generator().manual_seed(1)
    for i in range(5):
        q = cf.random_orthogonal(5, generator=g)
        assert float(n1[i]) == pytest.approx(float(cf.alignment(a, q @ b @ q.T)), abs=1e-12)


def test_nc1_closed_form() -> None:
    torch.manual_seed(0)
    means = torch.tensor([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2])
    x = means[labels] + 0.3 * torch.randn(9, 2, dtype=torch.float64)
    mu = x.mean(0)
    sw = np.zeros((2, 2))
    sb = np.zeros((2, 2))
    for c in range(3):
        xc = x[labels == c].numpy()
        mc = xc.mean(0)
        sw += (xc - mc).T @ (xc - mc) / len(xc)
        sb += np.outer(mc - mu.numpy(), mc - mu.numpy())
    sw /= 3
    sb /= 3
    want = float(np.trace(sw @ np.linalg.pinv(sb)) / 3)
    assert cf.nc1(x, labels) == pytest.approx(want, rel=1e-9)
    assert cf.nc1(means[labels], labels) == pytest.approx(0.0, abs=1e-12)  # full collapse


def test_invariance_score_closed_form() -> None:
    h = torch.randn(6, 3, dtype=torch.float64)
    assert cf.invariance_score(h, h) == 0.0
    ht = h + 0.5 * torch.randn(6, 3, dtype=torch.float64)
    num = float(((ht - h) ** 2).sum(1).mean())
    pairs = [float(((h[i] - h[j]) ** 2).sum()) for i in range(6) for j in range(6) if i != j]
    assert cf.invariance_score(h, ht) == pytest.approx(num / (sum(pairs) / len(pairs)), rel=1e-12)
    assert math.isnan(cf.invariance_score(torch.ones(3, 2), torch.ones(3, 2)))


def test_balance_terms_closed_form() -> None:
    eta, gamma, s = 0.1, 0.01, 8
    b = cf.balance_terms(4.0, 0.3, 2.0, lr=eta, weight_decay=gamma, batch_size=s, mean_gradient_sq_norm=0.5)
    assert b.decay == pytest.approx(gamma * (2 - eta * gamma) * 4.0)
    assert b.drift == pytest.approx(2 * (1 - eta * gamma) * 0.3)
    assert b.noise == pytest.approx(eta / s * 2.0)
    assert b.signal == pytest.approx(eta * (1 - 1 / s) * 0.5)
    assert b.noise_share == pytest.approx(b.noise / b.decay)
    assert b.rho == pytest.approx(eta / (gamma * s))
    assert cf.balance_terms(4.0, 0.3, 2.0, lr=eta, weight_decay=0.0, batch_size=s).rho == math.inf
    assert cf.balance_terms(4.0, 0.3, 2.0, lr=eta, weight_decay=0.0, batch_size=s).noise_share == math.inf
    assert set(b.to_dict()) >= {"decay", "drift", "noise", "signal", "noise_share", "rho"}


# ---------------------------------------------------------------- compute() kernels (issue 13 item 2)
def _two_pass_pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """The textbook two-pass formula in float64 (centred vectors, then their cosine)."""
    x, y = a.reshape(-1).double(), b.reshape(-1).double()
    x, y = x - x.mean(), y - y.mean()
    return float(x @ y / (x.norm() * y.norm()))


@pytest.mark.parametrize("block", [7, 1 << 17])
def test_pairwise_alignment_equals_every_pair(block: int, monkeypatch) -> None:
    # block=7 splits each 9×9 matrix into 12 blocks (the path that 4608² matrices take)
    monkeypatch.setattr(cf, "_GRAM_BLOCK", block)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(9, 9, generator=g, dtype=torch.float64)
    mats = [base @ base.T + 1e6, base.T @ base, torch.randn(9, 9, generator=g, dtype=torch.float64) * 1e-3]
    for metric in ("pearson", "cosine"):
        table = cf.pairwise_alignment(mats, metric)
        assert table.shape == (3, 3)
        assert_close(table, table.T, rtol=0, atol=0)
        for i in range(3):
            for j in range(3):
                x, y = mats[i].reshape(-1), mats[j].reshape(-1)
                if metric == "pearson":
                    want = _two_pass_pearson(mats[i], mats[j])
                else:
                    want = float(x @ y / (x.norm() * y.norm()))
                # the 1e6 offset: the centred Gram keeps every digit the two-pass formula has
                assert float(table[i, j]) == pytest.approx(want, abs=1e-12), (metric, i, j)


def test_pairwise_alignment_nan_rows_and_validation() -> None:
    flat = torch.full((3, 3), 2.0)
    a = torch.randn(3, 3, dtype=torch.float64)
    table = cf.pairwise_alignment([a, flat.double(), torch.full((3, 3), float("nan"), dtype=torch.float64)])
    assert float(table[0, 0]) == pytest.approx(1.0)
    assert all(math.isnan(float(table[i, j])) for i in range(3) for j in (1, 2))  # zero spread / NaN: undefined
    with pytest.raises(ValueError, match="at least one tensor"):
        cf.pairwise_alignment([])
    with pytest.raises(ValueError, match=r"`matrices\[1\]`"):
        cf.pairwise_alignment([a, torch.zeros(2, 2)])
    with pytest.raises(TypeError, match=r"`matrices\[0\]`"):
        cf.pairwise_alignment([[1.0]])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="`metric`"):
        cf.pairwise_alignment([a], "spearman")  # type: ignore[arg-type]


def test_pairwise_alignment_grad_path_matches_blocked_path(monkeypatch) -> None:
    monkeypatch.setattr(cf, "_GRAM_BLOCK", 5)
    a = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 6, dtype=torch.float64)
    with torch.no_grad():
        blocked = cf.pairwise_alignment([a, b])
    recorded = cf.pairwise_alignment([a, b])
    assert_close(recorded.detach(), blocked, rtol=0, atol=1e-14)
    recorded[0, 1].backward()
    assert a.grad is not None and bool(torch.isfinite(a.grad).all())


def test_pairwise_alignment_tiny_float32_does_not_underflow() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(8, 8, generator=g)
    b = a + 0.1 * torch.randn(8, 8, generator=g)
    want = _two_pass_pearson(a, b)
    got = cf.pairwise_alignment([a * 1e-30, b * 1e-30])  # squares of 1e-30 underflow float32
    assert got.dtype == torch.float32
    assert float(got[0, 1]) == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("k,d,panel", [(3, 5, 256), (7, 300, 256), (4, 37, 8), (9, 16, 16)])
def test_symmetric_product_is_exactly_symmetric_and_equals_the_product(k: int, d: int, panel: int, monkeypatch) -> None:
    monkeypatch.setattr(cf, "_SYM_PANEL", panel)
    g = torch.Generator().manual_seed(d)
    w = torch.randn(k, d, generator=g, dtype=torch.float64)
    s = torch.randn(k, k, generator=g, dtype=torch.float64)
    s = s @ s.T
    for a, b, want in ((w, w, w.T @ w), (w, s @ w, w.T @ s @ w)):
        got = cf.symmetric_product(a, b)
        assert torch.equal(got, got.T)
        assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_symmetric_product_validates() -> None:
    with pytest.raises(ValueError, match="same shape"):
        cf.symmetric_product(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="`a`.*2-D"):
        cf.symmetric_product(torch.zeros(3), torch.zeros(3))


def test_moment_from_sums_leaves_its_inputs_alone() -> None:
    x = torch.randn(10, 4, dtype=torch.float64) + 3
    s_xx, s_x = x.T @ x, x.sum(0)
    keep = s_xx.clone(), s_x.clone()
    got = cf.moment_from_sums(s_xx, s_x, 10, centered=True)
    assert torch.equal(s_xx, keep[0]) and torch.equal(s_x, keep[1])
    assert_close(got, torch.cov(x.T, correction=0))


# ---------------------------------------------------------------- API vocabulary (issue 11)
@pytest.mark.parametrize("preprocess", ["raw", "centered", "normalized"])
def test_mode_is_renamed_preprocess(preprocess: str) -> None:
    x = torch.randn(7, 3, dtype=torch.float64)
    with pytest.warns(FutureWarning, match="`mode` is renamed `preprocess`"):
        old = cf.second_moment(x, mode=preprocess)
    assert torch.equal(old, cf.second_moment(x, preprocess=preprocess))
    assert torch.equal(old, cf.second_moment(x, preprocess))
    with pytest.warns(FutureWarning, match="`mode` is renamed `preprocess`"):
        rows = cf.preprocess_rows(x, mode=preprocess)
    assert torch.equal(rows, cf.preprocess_rows(x, preprocess=preprocess))
    with pytest.raises(TypeError, match="both `mode` and its new name `preprocess`"):
        cf.second_moment(x, mode=preprocess, preprocess=preprocess)
    assert torch.equal(cf.second_moment(x), cf.second_moment(x, "raw"))  # the default is unchanged


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [1.0, 0.1, 0.3, 1e4 / 3])
def test_pearson_of_a_constant_matrix_is_undefined_even_when_its_mean_rounds(c: float, dtype: torch.dtype) -> None:
    """A constant matrix has no spread: Pearson α is NaN. When ``c`` is not exact in binary its mean rounds, and
    the centred matrix was a tiny constant (α 0.0000 or rounding noise, in the monitor −0.38)."""
    from canonreg.loss_moments import alignment_from_moments

    a = torch.full((7, 7), c, dtype=dtype)
    b = torch.randn(7, 7, dtype=dtype, generator=torch.Generator().manual_seed(0))
    assert math.isnan(float(cf.alignment(a, b, "pearson")))
    s = cf.pairwise_alignment([a, b, b.T], "pearson")
    assert math.isnan(float(s[0, 1])) and math.isnan(float(s[0, 2])) and not math.isnan(float(s[1, 2]))
    a64, b64 = a.double(), b.double()
    pieces = [(a64 * b64).sum(), (a64 * a64).sum(), (b64 * b64).sum(), a64.sum(), b64.sum()]
    assert math.isnan(float(alignment_from_moments(*pieces, 49, "pearson")))
    # a real spread, however small against the mean, is kept: α defined and equal to the float64 reference
    spread = a64 + 1e-6 * b64
    want = float(cf.alignment(spread - spread.mean(), b64 - b64.mean(), "cosine"))
    assert float(cf.alignment(spread, b64, "pearson")) == pytest.approx(want, abs=1e-9)
