"""Tests of the randomized (Hutchinson) estimators (canonreg.sketch) and ``AlignmentLoss(estimator="hutchinson")``,
including its seeded probes (``seed=``: the loss's own generator, the global one untouched).

References: dense ``d × d`` matrices (``RowMoment.dense()``, ``WᵀW``, ``WWᵀ``), ``canonreg.functional.alignment``
and plain autograd through the dense formulas. Unbiasedness is checked with the per-probe estimates (each
probe column is one independent single-probe draw): the mean over many draws must lie within 5 standard
errors of the exact value. Everything float64 and seeded.
"""

from __future__ import annotations

import pickle
import re
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.testing import assert_close

from canonreg import functional as cf
from canonreg.loss_moments import LazyRowMoment, WeightGram, factored_alignment, row_moment
from canonreg.losses import AlignmentLoss
from canonreg.sketch import (
    centred_sketch,
    gram_sketches,
    rademacher_probes,
    sketch_pieces,
    sketch_product,
    sketched_alignment,
)

D64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


def _dense_centred(a: Tensor, metric: str) -> Tensor:
    return a - a.mean() if metric == "pearson" else a


def _operands(seed: int = 0, n: int = 40, da: int = 12, db: int = 9) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, da, generator=g, dtype=D64) @ torch.randn(da, da, generator=g, dtype=D64)
    w = torch.randn(db, da, generator=g, dtype=D64) / da**0.5
    return x, w


# ============================================================================ products
@pytest.mark.parametrize("preprocess", cf.PREPROCESS_MODES)
def test_sketch_product_matches_dense(preprocess: str) -> None:
    x, w = _operands()
    torch.manual_seed(1)
    om_a = torch.randn(12, 5, dtype=D64)
    om_b = torch.randn(9, 5, dtype=D64)
    dense_h = cf.second_moment(x, preprocess)  # type: ignore[arg-type]
    assert_close(sketch_product(row_moment(x, preprocess), om_a), dense_h @ om_a)  # type: ignore[arg-type]
    assert_close(sketch_product(LazyRowMoment(x, preprocess), om_a), dense_h @ om_a)  # type: ignore[arg-type]
    assert_close(sketch_product(WeightGram(w, "a"), om_a), w.T @ w @ om_a)
    assert_close(sketch_product(WeightGram(w, "b"), om_b), w @ w.T @ om_b)
    assert_close(sketch_product(dense_h, om_a), dense_h @ om_a)
    ua, ub = gram_sketches(w, om_a, om_b)
    assert_close(ua, w.T @ w @ om_a)
    assert_close(ub, w @ w.T @ om_b)


def test_gram_sketches_gradient_matches_autograd_of_dense() -> None:
    _, w = _operands(3)
    torch.manual_seed(2)
    om_a, om_b = torch.randn(12, 4, dtype=D64), torch.randn(9, 4, dtype=D64)
    g_a, g_b = torch.randn(12, 4, dtype=D64), torch.randn(9, 4, dtype=D64)
    w1 = w.clone().requires_grad_(True)
    ua, ub = gram_sketches(w1, om_a, om_b)
    ((ua * g_a).sum() + (ub * g_b).sum()).backward()
    w2 = w.clone().requires_grad_(True)
    ((w2.T @ w2 @ om_a * g_a).sum() + (w2 @ w2.T @ om_b * g_b).sum()).backward()
    assert_close(w1.grad, w2.grad)
    w3 = w.clone().requires_grad_(True)  # only one side used: the other output's gradient is None
    gram_sketches(w3, om_a, om_b)[1].mul(g_b).sum().backward()
    w4 = w.clone().requires_grad_(True)
    (w4 @ w4.T @ om_b * g_b).sum().backward()
    assert_close(w3.grad, w4.grad)


@pytest.mark.parametrize("preprocess", cf.PREPROCESS_MODES)
def test_lazy_row_sketch_gradient_matches_autograd_of_dense(preprocess: str) -> None:
    """The hand-written backward of ``M Ω`` (row norms, centring) vs autograd through ``second_moment``,
    with an all-zero row (its normalisation is the constant 1)."""
    x, _ = _operands(5, n=20, da=7)
    x[4] = 0.0
    torch.manual_seed(3)
    om, g = torch.randn(7, 3, dtype=D64), torch.randn(7, 3, dtype=D64)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (sketch_product(LazyRowMoment(x1, preprocess), om) * g).sum().backward()  # type: ignore[arg-type]
    (cf.second_moment(x2, preprocess) @ om * g).sum().backward()  # type: ignore[arg-type]
    assert_close(x1.grad, x2.grad)


def test_rademacher_probes_are_signs_with_identity_second_moment() -> None:
    torch.manual_seed(0)
    om = rademacher_probes(6, 20000, like=torch.zeros((), dtype=D64))
    assert set(om.unique().tolist()) == {-1.0, 1.0}
    assert_close(om @ om.T / om.shape[1], torch.eye(6, dtype=D64), atol=0.03, rtol=0)  # 5 σ at 20000 draws: 0.035


# ============================================================================ unbiased pieces
@pytest.mark.parametrize("metric", cf.METRICS)
@pytest.mark.parametrize("pair", [("H_a", "Z_a"), ("H_b", "Z_b")])
def test_sketch_pieces_are_unbiased(metric: str, pair: tuple[str, str]) -> None:
    """Each probe column is one single-probe draw; the mean of 40000 draws is within 5 standard errors."""
    x, w = _operands(4)
    h_a = row_moment(x, "normalized")
    h_b = row_moment(x @ w.T, "normalized")
    ops = {"H_a": h_a, "Z_a": WeightGram(w, "a"), "H_b": h_b, "Z_b": WeightGram(w, "b")}
    a, b = ops[pair[0]], ops[pair[1]]
    da, db = _dense_centred(a.dense(), metric), _dense_centred(b.dense(), metric)
    torch.manual_seed(5)
    om = rademacher_probes(a.dim, 40000, like=x)
    u, v = centred_sketch(a, om, metric), centred_sketch(b, om, metric)  # type: ignore[arg-type]
    per_probe = {"inner": (u * v).sum(0), "sq_a": (u * u).sum(0), "sq_b": (v * v).sum(0)}
    exact = {"inner": (da * db).sum(), "sq_a": (da * da).sum(), "sq_b": (db * db).sum()}
    inner, sq_a, sq_b = sketch_pieces(u, v)
    assert_close(torch.stack([inner, sq_a, sq_b]), torch.stack([per_probe[k].mean() for k in ("inner", "sq_a", "sq_b")]))
    for k, draws in per_probe.items():
        se = draws.std() / draws.numel() ** 0.5
        assert abs(float(draws.mean() - exact[k])) < 5 * float(se) + 1e-12, (k, float(draws.mean()), float(exact[k]), float(se))


def test_piece_gradients_are_unbiased() -> None:
    """Gradient of the Hutchinson ⟨H_b, Z_b⟩ and ‖Z_b‖² in W and in the rows: mean over 300 draws within 5
    standard errors of the gradient of the exact (dense) value, entry by entry."""
    x, w = _operands(6, n=30, da=8, db=7)
    draws_w, draws_x = [], []
    torch.manual_seed(7)
    for _ in range(300):
        w1, x1 = w.clone().requires_grad_(True), x.clone().requires_grad_(True)
        hb = LazyRowMoment(x1 @ w1.T, "normalized")
        om = rademacher_probes(7, 2, like=x)
        u, v = centred_sketch(hb, om, "pearson"), centred_sketch(WeightGram(w1, "b"), om, "pearson")
        inner, _, sq_b = sketch_pieces(u, v)
        gw, gx = torch.autograd.grad(inner + 0.5 * sq_b, [w1, x1])
        draws_w.append(gw)
        draws_x.append(gx)
    w2, x2 = w.clone().requires_grad_(True), x.clone().requires_grad_(True)
    hb_d = _dense_centred(cf.second_moment(x2 @ w2.T, "normalized"), "pearson")
    zb_d = _dense_centred(w2 @ w2.T, "pearson")
    ref_w, ref_x = torch.autograd.grad((hb_d * zb_d).sum() + 0.5 * (zb_d * zb_d).sum(), [w2, x2])
    for draws, ref in ((torch.stack(draws_w), ref_w), (torch.stack(draws_x), ref_x)):
        se = draws.std(0) / draws.shape[0] ** 0.5
        assert bool(((draws.mean(0) - ref).abs() <= 5 * se + 1e-10).all()), float(((draws.mean(0) - ref).abs() / se).max())


# ============================================================================ α: bounded, exact at alignment, bias and spread
@pytest.mark.parametrize("metric", cf.METRICS)
def test_sketched_alignment_exact_when_aligned(metric: str) -> None:
    """``A = cB`` (+ a constant for pearson) gives α̂ = 1 for every draw, and |α̂| ≤ 1 always."""
    _, w = _operands(8)
    z = w.T @ w
    a = 3.0 * z + (0.7 if metric == "pearson" else 0.0)
    torch.manual_seed(9)
    for _ in range(20):
        assert abs(float(sketched_alignment(a, WeightGram(w, "a"), 3, metric)) - 1.0) < 1e-12  # type: ignore[arg-type]
    x, _ = _operands(9)
    vals = torch.stack([sketched_alignment(row_moment(x, "centered"), WeightGram(w, "a"), 2, metric) for _ in range(50)])  # type: ignore[arg-type]
    assert bool((vals.abs() <= 1.0).all())


@pytest.mark.parametrize("metric", cf.METRICS)
def test_sketched_alignment_spread_and_bias_shrink_with_probes(metric: str) -> None:
    """std(α̂) ≈ c/√k (ratio of k = 4 to k = 64 between 2.5 and 6.5; 4 in theory) and the mean over draws
    approaches the exact α (its ratio bias is O(1/k))."""
    x, w = _operands(10, n=120, da=64, db=64)
    h, z = row_moment(x, "normalized"), WeightGram(w, "a")
    exact = float(factored_alignment(h, z, metric))  # type: ignore[arg-type]
    torch.manual_seed(11)
    stats = {}
    for k in (4, 64):
        v = [float(sketched_alignment(h, z, k, metric)) for _ in range(200)]  # type: ignore[arg-type]
        stats[k] = (statistics.fmean(v), statistics.stdev(v))
    assert 2.5 < stats[4][1] / stats[64][1] < 6.5, stats
    assert abs(stats[64][0] - exact) < 5 * stats[64][1] / 200**0.5 + 1e-3, (stats, exact)
    assert abs(stats[64][0] - exact) < abs(stats[4][0] - exact) + 5 * stats[4][1] / 200**0.5, (stats, exact)


def test_alpha_gradient_bias_below_noise() -> None:
    """The gradient of α̂ is a ratio estimator (biased O(1/k) in principle). At k = 8 the mean over 600 draws
    differs from the exact gradient by no more than its own sampling noise (‖mean − exact‖ ≈ √Σ se² when
    unbiased; the check allows 1.5× that plus 1%), and points along it (cosine > 0.99)."""
    x, w = _operands(12, n=60, da=40, db=40)
    h = row_moment(x, "normalized")
    w_ex = w.clone().requires_grad_(True)
    (g_exact,) = torch.autograd.grad(factored_alignment(h, WeightGram(w_ex, "a"), "pearson"), [w_ex])
    torch.manual_seed(13)
    grads = []
    for _ in range(600):
        w1 = w.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(sketched_alignment(h, WeightGram(w1, "a"), 8, "pearson"), [w1])
        grads.append(g)
    draws = torch.stack(grads)
    mean = draws.mean(0)
    noise = float(draws.var(0).sum().sqrt() / draws.shape[0] ** 0.5 / g_exact.norm())
    rel = float((mean - g_exact).norm() / g_exact.norm())
    cos = float((mean * g_exact).sum() / (mean.norm() * g_exact.norm()))
    assert rel < 1.5 * noise + 0.01 and cos > 0.99, (rel, noise, cos)


# ============================================================================ the module
def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 48), nn.Tanh(), nn.Linear(48, 40), nn.Tanh(), nn.Linear(40, 3)).double()


def _batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 10, generator=g, dtype=D64), torch.randint(0, 3, (64,), generator=g)


@pytest.mark.parametrize("metric", cf.METRICS)
def test_module_with_probes_above_width_equals_exact(metric: str) -> None:
    """Sides of width ≤ probes are computed exactly: with probes ≥ every width the two estimators agree."""
    model = _mlp()
    x, y = _batch()
    vals = {}
    for est in ("exact", "hutchinson"):
        with AlignmentLoss(model, ("f-RWA", "b-RWA"), metric=metric, estimator=est, probes=64) as align:  # type: ignore[arg-type]
            F.cross_entropy(model(x), y)
            vals[est] = align()
    assert_close(vals["hutchinson"], vals["exact"])


@pytest.mark.parametrize("relations", [("f-RWA", "b-RWA"), ("f-RGA", "b-GWA")])
def test_module_mean_value_and_gradient_match_exact(relations: tuple[str, str]) -> None:
    """Mean over 200 calls of the randomized loss and of its weight gradient (the gradient of the mean) vs the
    exact loss (probes 16 < widths 40, 48; G by double backprop): value within 0.01, gradient cosine > 0.98."""
    model = _mlp()
    x, y = _batch()
    params = [p for n, p in model.named_parameters() if n.endswith("weight")]
    with AlignmentLoss(model, relations, metric="pearson") as align:
        task = F.cross_entropy(model(x), y)
        ref = align(task)
        ref_g = torch.autograd.grad(ref, params)
    torch.manual_seed(14)
    with AlignmentLoss(model, relations, metric="pearson", estimator="hutchinson", probes=16) as align:
        task = F.cross_entropy(model(x), y)
        mean = torch.stack([align(task) for _ in range(200)]).mean()
        assert set(align.last_alignment["2"]) == set(relations)
        mean_g = torch.cat([g.flatten() for g in torch.autograd.grad(mean, params)])
    flat_ref = torch.cat([g.flatten() for g in ref_g])
    assert abs(float(mean.detach()) - float(ref.detach())) < 0.01, (float(mean.detach()), float(ref.detach()))
    assert float((mean_g @ flat_ref) / (mean_g.norm() * flat_ref.norm())) > 0.98


def test_module_ema_g_with_hutchinson_runs_and_is_bounded() -> None:
    """g_mode='ema' (dense G operands) under the sketch: finite, in [0, 2], and differentiable."""
    model = _mlp()
    x, y = _batch()
    with AlignmentLoss(model, ("b-GWA",), g_mode="ema", estimator="hutchinson", probes=8) as align:
        F.cross_entropy(model(x), y).backward()
        loss = align(F.cross_entropy(model(x), y))
        assert 0.0 <= float(loss.detach()) <= 2.0
        loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"estimator": "sketch"}, "estimator"), ({"probes": 0}, "probes"), ({"probes": 2.5}, "probes"), ({"probes": True}, "probes")],
)
def test_bad_estimator_options_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AlignmentLoss(_mlp(), **kwargs)


# ============================================================================ seeded probes (AlignmentLoss(seed=))
def _one_layer() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(10, 6)).double()


def test_seeded_loss_draws_its_probes_from_its_own_generator() -> None:
    """f-RWA of one layer (probes 4 < d_a = 10) vs the dense reference with Ω drawn from a generator of the same
    seed: Ã = A − mean(A) (pearson), α̂ = ⟨ÃΩ, Z̃Ω⟩ / (‖ÃΩ‖ ‖Z̃Ω‖), one fresh Ω per call (the generator's next draw)."""
    model = _one_layer()
    x, _ = _batch()
    gen = torch.Generator().manual_seed(123)
    w = model[0].weight.detach()
    dense = {"H_a": cf.second_moment(x, "normalized"), "Z_a": w.T @ w}
    with AlignmentLoss(model, ("f-RWA",), metric="pearson", estimator="hutchinson", probes=4, seed=123) as align:
        for _ in range(3):
            model(x)
            omega = torch.randint(0, 2, (10, 4), generator=gen, dtype=D64) * 2.0 - 1.0
            u, v = ((m - m.mean()) @ omega for m in (dense["H_a"], dense["Z_a"]))
            want = 1.0 - (u * v).sum() / (u.norm() * v.norm())
            assert_close(align(), want)


def test_same_seed_gives_identical_values_and_gradients_whatever_the_global_rng() -> None:
    x, y = _batch()
    runs = []
    for seed, global_seed in ((5, 0), (5, 99), (6, 0)):
        model = _mlp()
        torch.manual_seed(global_seed)
        vals, grads = [], []
        with AlignmentLoss(model, "all", estimator="hutchinson", probes=8, seed=seed) as align:
            for _ in range(3):
                model.zero_grad()
                task = F.cross_entropy(model(x), y)
                val = align(task)
                val.backward()
                vals.append(val.detach())
                grads.append([p.grad.clone() for p in model.parameters()])
        runs.append((torch.stack(vals), grads))
    (v5, g5), (v5b, g5b), (v6, _) = runs
    assert torch.equal(v5, v5b)
    assert all(torch.equal(a, b) for ga, gb in zip(g5, g5b) for a, b in zip(ga, gb))
    assert not torch.equal(v5, v6)  # the seed does choose the probes
    assert len(set(v5.tolist())) == 3  # fresh probes at every call


def test_seeded_loss_leaves_the_global_rng_untouched() -> None:
    x, y = _batch()
    states = {}
    for seed in (None, 7):
        model = _mlp()
        with AlignmentLoss(model, ("f-RWA", "b-RWA", "f-RGA"), estimator="hutchinson", probes=8, seed=seed) as align:
            task = F.cross_entropy(model(x), y)
            before = torch.get_rng_state()
            align(task).backward()
            states[seed] = torch.equal(before, torch.get_rng_state())
    assert states == {None: False, 7: True}  # unseeded: the probes come from the global generator


def test_seeded_probe_stream_round_trips_through_state_dict_and_restarts_at_reset() -> None:
    x, _ = _batch()
    model = _mlp()
    with AlignmentLoss(model, ("f-RWA", "b-RWA"), estimator="hutchinson", probes=8, seed=11) as align:
        model(x)
        first = align().detach()
        model(x)
        align()
        state = align.state_dict()
        model(x)
        third = align().detach()
        align.reset()
        model(x)
        assert torch.equal(align().detach(), first)
    with AlignmentLoss(model, ("f-RWA", "b-RWA"), estimator="hutchinson", probes=8, seed=11) as other:
        other.load_state_dict(state)
        model(x)
        assert torch.equal(other().detach(), third)
    with AlignmentLoss(model, ("f-RWA", "b-RWA"), estimator="hutchinson", probes=8) as unseeded:
        with pytest.warns(RuntimeWarning, match="seed=None"):
            unseeded.load_state_dict(state)
        assert "probe_rng" not in unseeded.state_dict()["_extra_state"]


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True, "3"])
def test_bad_seed_is_refused(seed: object) -> None:
    with pytest.raises(ValueError, match=r"`seed`.*" + re.escape(repr(seed))):
        AlignmentLoss(_mlp(), estimator="hutchinson", seed=seed)  # type: ignore[arg-type]


def test_rademacher_probes_with_a_generator_match_a_direct_draw() -> None:
    like = torch.zeros(1, dtype=torch.float32)
    omega = rademacher_probes(7, 5, like=like, generator=torch.Generator().manual_seed(2))
    want = torch.randint(0, 2, (7, 5), generator=torch.Generator().manual_seed(2)).float() * 2 - 1
    assert omega.dtype == torch.float32 and torch.equal(omega, want)
    with pytest.raises(TypeError, match="generator"):
        rademacher_probes(7, 5, like=like, generator=2)  # type: ignore[arg-type]


def test_a_pickled_copy_of_a_seeded_loss_continues_its_probe_stream() -> None:
    x, _ = _batch()
    model = _mlp()
    with AlignmentLoss(model, ("f-RWA", "b-RWA"), estimator="hutchinson", probes=8, seed=4) as align:
        model(x)
        align()
        clone = pickle.loads(pickle.dumps(align))
        model(x)
        want = align().detach()
    with clone:
        clone.model(x)
        assert torch.equal(clone().detach(), want)
