"""Tests of canonreg.losses: the factored trace identities and the AlignmentLoss module.

References are written the obvious way: dense ``d × d`` moments (``canonreg.functional.second_moment``
or conftest's per-sample outer products), dense weight Grams, ``canonreg.functional.alignment``, and
per-sample ``torch.autograd.grad`` loops for the gradient moments; float64 throughout unless a test
is about float32.
"""

from __future__ import annotations

import copy
import gc
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    make_case,
    ref_cosine,
    ref_matrices,
    ref_pearson,
    reference_rows,
    rows_in,
    rows_out,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.testing import assert_close

import canonreg
from canonreg import CanonRegError, CRHMonitor
from canonreg import functional as cf
from canonreg.loss_moments import (
    RowMoment,
    WeightGram,
    alignment_loss,
    entry_sum,
    frobenius_inner,
    gram_sqnorm,
    row_moment,
    squared_frobenius,
)
from canonreg.losses import AlignmentLoss

MODES = cf.PREPROCESS_MODES
METRICS = cf.METRICS
G_RELATIONS = ("f-RGA", "f-GWA", "b-RGA", "b-GWA")


# ============================================================================ helpers
def tanh_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3)).double()


Seen = dict[str, list[tuple[Tensor, Tensor, Tensor]]]


def capture(model: nn.Module, names: list[str]) -> tuple[Seen, list]:
    """Independent forward hooks: (input, output, copy of the output) of every call of each named layer.

    The output itself is what gradients are taken against; the copy survives in-place activations.
    """
    seen: Seen = {n: [] for n in names}
    mods = dict(model.named_modules())
    handles = [
        mods[n].register_forward_hook(lambda m, i, o, n=n: seen[n].append((i[0], o, o.clone()))) for n in names
    ]
    return seen, handles


def per_sample_g(losses: Tensor, out: Tensor) -> Tensor:
    """Rows ``g_i = −∂ℓ_i/∂h_b`` by one ``autograd.grad`` per sample (differentiable: create_graph)."""
    rows = []
    for i in range(losses.shape[0]):
        (g,) = torch.autograd.grad(losses[i], out, create_graph=True)
        rows.append(-g[i])
    return torch.stack(rows)


def dense_loss(mats: dict[str, dict[str, Tensor]], relations, metric: str) -> Tensor:
    """Unweighted mean over layers and relations of ``1 − α`` with dense matrices."""
    terms = [1 - cf.alignment(*(mats[n][m] for m in cf.RELATION_PAIRS[r]), metric) for n in mats for r in relations]
    return torch.stack(terms).mean()


def linear_dense_matrices(
    model: nn.Module, seen, mode: str, g_rows: dict[str, Tensor] | None = None
) -> dict[str, dict[str, Tensor]]:
    mods = dict(model.named_modules())
    mats = {}
    for n, calls in seen.items():
        w = mods[n].weight
        ha = torch.cat([i.reshape(-1, i.shape[-1]) for i, _, _ in calls])
        hb = torch.cat([oc.reshape(-1, oc.shape[-1]) for _, _, oc in calls])
        m = {"H_a": cf.second_moment(ha, mode), "H_b": cf.second_moment(hb, mode), "Z_a": w.T @ w, "Z_b": w @ w.T}
        if g_rows is not None:
            m["G_b"] = cf.second_moment(g_rows[n], mode)
            m["G_a"] = cf.second_moment(g_rows[n] @ w, mode)
        mats[n] = m
    return mats


# ============================================================================ functional core
@pytest.mark.parametrize("mode", MODES)
def test_row_moment_is_second_moment_and_image_is_rows_times_wt(mode: str) -> None:
    x = torch.randn(11, 6, dtype=torch.float64)
    x[3] = 0.0  # a zero row stays zero under normalisation and still counts as a sample
    w = torch.randn(4, 6, dtype=torch.float64)
    m = row_moment(x, mode, image=x @ w.T)
    assert_close(m.dense(), cf.second_moment(x, mode))
    assert m.image is not None
    assert_close(m.image, m.rows @ w.T)


def _operand_pairs(mode: str) -> list[tuple[str, object, object, Tensor, Tensor]]:
    n, d_a, d_b = 9, 6, 4
    x = torch.randn(n, d_a, dtype=torch.float64)
    w = torch.randn(d_b, d_a, dtype=torch.float64)
    hb = x @ w.T + torch.randn(d_b, dtype=torch.float64)
    g = torch.randn(n, d_b, dtype=torch.float64)
    g_other = torch.randn(5, d_b, dtype=torch.float64)  # a different number of rows
    wide = torch.randn(30, d_b, dtype=torch.float64)  # d < n/2: the d × d branch of RowMoment·RowMoment
    wide2 = torch.randn(30, d_b, dtype=torch.float64)
    c = cf.second_moment(torch.randn(7, d_b, dtype=torch.float64), mode)
    ca = cf.second_moment(torch.randn(7, d_a, dtype=torch.float64), mode)
    za, zb = WeightGram(w, "a"), WeightGram(w, "b")
    return [
        ("H_a~Z_a image", row_moment(x, mode, image=x @ w.T), za, cf.second_moment(x, mode), w.T @ w),
        ("H_a~Z_a", row_moment(x, mode), za, cf.second_moment(x, mode), w.T @ w),
        ("H_b~Z_b", row_moment(hb, mode), zb, cf.second_moment(hb, mode), w @ w.T),
        ("H_b~G_b", row_moment(hb, mode), row_moment(g, mode), cf.second_moment(hb, mode), cf.second_moment(g, mode)),
        ("n != n'", row_moment(hb, mode), row_moment(g_other, mode), cf.second_moment(hb, mode), cf.second_moment(g_other, mode)),
        ("wide", row_moment(wide, mode), row_moment(wide2, mode), cf.second_moment(wide, mode), cf.second_moment(wide2, mode)),
        ("dense~rows", c, row_moment(g, mode), c, cf.second_moment(g, mode)),
        ("dense~Z_b", c, zb, c, w @ w.T),
        ("Z_a~dense", za, ca, w.T @ w, ca),
        ("Z~Z", zb, WeightGram(w, "b"), w @ w.T, w @ w.T),
    ]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("mode", MODES)
def test_factored_alignment_equals_dense(mode: str, metric: str) -> None:
    for label, a, b, da, db in _operand_pairs(mode):
        assert_close(frobenius_inner(a, b), (da * db).sum(), msg=label)
        assert_close(squared_frobenius(a), (da * da).sum(), msg=label)
        assert_close(entry_sum(b), db.sum(), msg=label)
        assert_close(alignment_loss(a, b, metric), 1 - cf.alignment(da, db, metric), msg=label)
        assert_close(alignment_loss(b, a, metric), 1 - cf.alignment(db, da, metric), msg=label)


@pytest.mark.parametrize(
    "relation,mode,metric",
    [("f-RWA", "normalized", "cosine"), ("f-RWA", "raw", "pearson"), ("b-RWA", "centered", "cosine"),
     ("b-RGA", "normalized", "pearson"), ("f-GWA", "raw", "cosine"), ("f-RGA", "centered", "pearson")],
)
def test_gradcheck_factored_against_dense(relation: str, mode: str, metric: str) -> None:
    """gradcheck (float64) of the factored loss, and its gradient equals the dense version's."""
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64)

    def factored(x: Tensor, w: Tensor, g: Tensor) -> Tensor:
        hb = x @ w.T + b
        ops = {
            "H_a": row_moment(x, mode, image=hb - b), "H_b": row_moment(hb, mode),
            "G_b": row_moment(g, mode), "G_a": row_moment(g @ w, mode),
            "Z_a": WeightGram(w, "a"), "Z_b": WeightGram(w, "b"),
        }
        p, q = cf.RELATION_PAIRS[relation]
        return alignment_loss(ops[p], ops[q], metric)

    def dense(x: Tensor, w: Tensor, g: Tensor) -> Tensor:
        hb = x @ w.T + b
        mats = {
            "H_a": cf.second_moment(x, mode), "H_b": cf.second_moment(hb, mode),
            "G_b": cf.second_moment(g, mode), "G_a": cf.second_moment(g @ w, mode),
            "Z_a": w.T @ w, "Z_b": w @ w.T,
        }
        p, q = cf.RELATION_PAIRS[relation]
        return alignment_loss(mats[p], mats[q], metric)

    assert torch.autograd.gradcheck(factored, (x, w, g))
    got = torch.autograd.grad(factored(x, w, g), (x, w, g), allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(dense(x, w, g), (x, w, g), allow_unused=True, materialize_grads=True)
    for a, e in zip(got, want):
        assert_close(a, e)


@pytest.mark.parametrize("shape", [(3, 8), (8, 3)])
def test_gram_sqnorm_value_gradient_and_no_double_backward(shape: tuple[int, int]) -> None:
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert_close(gram_sqnorm(x), ((x.T @ x) ** 2).sum())
    assert torch.autograd.gradcheck(gram_sqnorm, (x,))
    (g,) = torch.autograd.grad(gram_sqnorm(x), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_pearson_float32_survives_a_large_mean() -> None:
    """Raw moments of shifted features: the Pearson centring subtracts large terms (done in float64)."""
    x = torch.randn(64, 32, dtype=torch.float64) + 20.0
    w = torch.randn(16, 32, dtype=torch.float64)
    want = alignment_loss(cf.second_moment(x, "raw"), w.T @ w, "pearson")
    got = alignment_loss(row_moment(x.float(), "raw"), WeightGram(w.float(), "a"), "pearson")
    # float32 inputs: agreement to ~1e-4 absolute is what float32 rows allow here
    assert abs(float(got) - float(want)) < 1e-4


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    scale=st.floats(1e-3, 1e3),
    metric=st.sampled_from(METRICS),
    mode=st.sampled_from(MODES),
)
def test_loss_bounds_symmetry_and_scale_invariance(seed: int, scale: float, metric: str, mode: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 4, dtype=torch.float64, generator=gen)
    w = torch.randn(3, 4, dtype=torch.float64, generator=gen)
    val = alignment_loss(row_moment(x, mode), WeightGram(w, "a"), metric)
    assert 0.0 <= float(val) <= 2.0
    assert_close(val, alignment_loss(WeightGram(w, "a"), row_moment(x, mode), metric))
    assert_close(val, alignment_loss(row_moment(scale * x, mode), WeightGram(w / scale, "a"), metric))


def test_alignment_loss_is_zero_for_proportional_matrices() -> None:
    w = torch.randn(5, 5, dtype=torch.float64)
    x = (3.0 * 5) ** 0.5 * w  # 5 rows: E[x xᵀ] = (15/5) WᵀW = 3 WᵀW
    assert float(alignment_loss(row_moment(x, "raw"), WeightGram(w, "a"), "cosine")) == pytest.approx(0.0, abs=1e-12)


# ============================================================================ module: values and gradients
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("mode", MODES)
def test_module_exact_mode_matches_dense_per_sample_reference(mode: str, metric: str) -> None:
    """All six relations, exact G: value and parameter gradients equal a dense per-sample reference."""
    model = tanh_mlp()
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    align = AlignmentLoss(model, cf.RELATIONS, metric=metric, preprocess=mode, g_mode="exact")
    seen, handles = capture(model, ["0", "2", "4"])
    out = model(x)
    for h in handles:
        h.remove()
    losses = F.cross_entropy(out, y, reduction="none")
    val = align(losses.mean())
    got = torch.autograd.grad(val, list(model.parameters()), retain_graph=True)

    # the loss's G comes from the batch-mean task loss; the reference from each sample's own loss
    g_rows = {n: per_sample_g(losses, seen[n][0][1]) for n in seen}
    ref = dense_loss(linear_dense_matrices(model, seen, mode, g_rows), cf.RELATIONS, metric)
    want = torch.autograd.grad(ref, list(model.parameters()))
    assert_close(val, ref)
    for a, e in zip(got, want):
        assert_close(a, e)
    align.detach()


def test_module_conv1d_values_and_gradients() -> None:
    """Conv1d (padding, stride, dilation, 'same', circular) + Linear head, all six relations, exact G."""
    case = make_case("conv1d")
    model = case.model
    x, y = case.batches[0]
    refs = reference_rows(case, [case.batches[0]])  # explicit patch loops, per-sample losses, no gradients
    for mode, metric in (("normalized", "pearson"), ("raw", "cosine"), ("centered", "cosine")):
        align = AlignmentLoss(model, cf.RELATIONS, metric=metric, preprocess=mode, g_mode="exact")
        seen, handles = capture(model, case.layers)
        out = model(x)
        for h in handles:
            h.remove()
        task = case.loss(out, y)
        val = align(task)
        got = torch.autograd.grad(val, list(model.parameters()), retain_graph=True)

        # values: α of every term against the independent per-sample reference
        ref_alpha = ref_pearson if metric == "pearson" else ref_cosine
        for n in case.layers:
            mats = ref_matrices(refs[n], mode)
            for r in cf.RELATIONS:
                p, q = cf.RELATION_PAIRS[r]
                assert float(align.last_alignment[n][r]) == pytest.approx(ref_alpha(mats[p], mats[q]), abs=1e-9), (n, r)

        # gradients: a dense version built from differentiable explicit patch rows
        mods = dict(model.named_modules())
        outs = [seen[n][0][1] for n in case.layers]
        grads = torch.autograd.grad(task, outs, create_graph=True)
        mats = {}
        for n, g in zip(case.layers, grads):
            mod, (inp, _, oc) = mods[n], seen[n][0]
            w = mod.weight.reshape(mod.weight.shape[0], -1)
            ha, hb, gb = rows_in(mod, inp), rows_out(mod, oc), -rows_out(mod, g)
            mats[n] = {
                "H_a": cf.second_moment(ha, mode), "H_b": cf.second_moment(hb, mode),
                "G_b": cf.second_moment(gb, mode), "G_a": cf.second_moment(gb @ w, mode),
                "Z_a": w.T @ w, "Z_b": w @ w.T,
            }
        ref = dense_loss(mats, cf.RELATIONS, metric)
        want = torch.autograd.grad(ref, list(model.parameters()))
        assert_close(val, ref)
        for a, e in zip(got, want):
            assert_close(a, e)
        align.detach()


@pytest.mark.parametrize("mode", MODES)
def test_ema_mode_tracks_g_and_differentiates_only_h_and_z(mode: str) -> None:
    case = make_case("mlp")  # nn.ReLU(inplace=True) after layer "0": EMA hooks and H_b copies must cope
    model = case.model
    beta = 0.7
    b1, b2, b3 = case.batches[0], case.batches[1], case.batches[0]
    r1, r2 = reference_rows(case, [b1]), reference_rows(case, [b2])  # before attaching: its grads would count
    align = AlignmentLoss(model, cf.RELATIONS, preprocess=mode, metric="pearson", g_mode="ema", ema_decay=beta)
    for x, y in (b1, b2):
        model.zero_grad()
        case.loss(model(x), y).backward()  # the task loss alone: the EMA sees task gradients only
    for n in case.layers:
        for m, rows in (("G_b", lambda r: r.gb), ("G_a", lambda r: r.ga)):
            want = beta * cf.second_moment(rows(r1[n]), mode) + (1 - beta) * cf.second_moment(rows(r2[n]), mode)
            assert_close(align._ema[n][m], want)
        assert align._ema_updates[n] == 2

    seen, handles = capture(model, case.layers)
    x, y = b3
    model(x)
    for h in handles:
        h.remove()
    val = align()
    ema = {n: {k: v.clone() for k, v in align._ema[n].items()} for n in case.layers}
    # this backward reaches the layer outputs too, so the hooks fold its gradients into the EMA afterwards
    got = torch.autograd.grad(val, list(model.parameters()), retain_graph=True)
    assert all(align._ema_updates[n] == 3 for n in case.layers)
    mats = linear_dense_matrices(model, seen, mode)
    for n in case.layers:
        mats[n].update(ema[n])  # constants: no gradient flows through G
    ref = dense_loss(mats, cf.RELATIONS, "pearson")
    want = torch.autograd.grad(ref, list(model.parameters()))
    assert_close(val, ref)
    for a, e in zip(got, want):
        assert_close(a, e)


def test_layer_called_twice_in_one_pass_uses_the_rows_of_both_calls() -> None:
    shared = nn.Linear(4, 4).double()

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = shared

        def forward(self, x: Tensor) -> Tensor:
            return self.shared(torch.tanh(self.shared(x)))

    model = Twice()
    align = AlignmentLoss(model, ("f-RWA", "b-RWA"), preprocess="centered")
    seen, handles = capture(model, ["shared"])
    model(torch.randn(6, 4, dtype=torch.float64))
    for h in handles:
        h.remove()
    assert len(seen["shared"]) == 2
    ref = dense_loss(linear_dense_matrices(model, seen, "centered"), ("f-RWA", "b-RWA"), "pearson")  # default metric
    assert_close(align(), ref)


def test_layer_and_relation_weights_give_the_weighted_mean() -> None:
    model = tanh_mlp()
    lw, rw = {"0": 2.0, "4": 0.0}, {"f-RWA": 3.0}
    align = AlignmentLoss(model, ("f-RWA", "b-RWA"), layer_weights=lw, relation_weights=rw, weight=0.5)
    model(torch.randn(8, 5, dtype=torch.float64))
    val = align()
    num = den = 0.0
    for n in ("0", "2"):
        for r in ("f-RWA", "b-RWA"):
            wt = lw.get(n, 1.0) * rw.get(r, 1.0)
            num += wt * (1 - float(align.last_alignment[n][r]))
            den += wt
    assert "4" not in align.last_alignment  # weight 0: never computed
    assert float(val.detach()) == pytest.approx(0.5 * num / den, rel=1e-12)


# ============================================================================ module: behaviour
@pytest.mark.parametrize(
    "relations,mode,metric,g_mode",
    [(("f-RWA",), "normalized", "cosine", "ema"), (("b-RWA",), "centered", "pearson", "ema"),
     (("b-GWA",), "raw", "cosine", "exact")],
)
def test_optimising_the_loss_alone_aligns_the_target_relation(relations, mode, metric, g_mode) -> None:
    """Adam on the loss alone from a random init: CRHMonitor (same preprocess and metric) reads α ≥ 0.99."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(64, 8)
    align = AlignmentLoss(model, relations, preprocess=mode, metric=metric, g_mode=g_mode)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(120):
        task = model(x).square().mean()  # defines G (exact mode); never optimised itself
        loss = align(task)
        opt.zero_grad()
        loss.backward()
        opt.step()
    align.detach()
    monitor = CRHMonitor(model, preprocess=mode, metric=metric)
    with monitor:
        model(x).square().mean().backward()
    report = monitor.compute(exponents=False)
    for n in ("0", "2", "4"):
        for r in relations:
            assert report.alignment[n][r] >= 0.99, (n, r, report.alignment[n][r])


def _train(model: nn.Module, batches, align: AlignmentLoss | None, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for i in range(steps):
        x, y = batches[i % len(batches)]
        task = F.cross_entropy(model(x), y)
        loss = task if align is None else task + align(task)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("g_mode", ["ema", "exact"])
def test_weight_zero_is_bit_identical_to_training_without_the_loss(g_mode: str) -> None:
    torch.manual_seed(3)
    base = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))
    batches = [(torch.randn(16, 6), torch.randint(0, 3, (16,))) for _ in range(3)]
    plain, zero, on = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    _train(plain, batches, None, 6)
    _train(zero, batches, AlignmentLoss(zero, cf.RELATIONS, g_mode=g_mode, weight=0.0), 6)
    for p, q in zip(plain.parameters(), zero.parameters()):
        assert torch.equal(p, q)
    # the same loop with a positive weight does move the trajectory (so the check above can fail)
    _train(on, batches, AlignmentLoss(on, ("f-RWA", "b-RWA"), g_mode=g_mode, weight=0.1), 6)
    assert any(not torch.equal(p, q) for p, q in zip(plain.parameters(), on.parameters()))


def test_coexists_with_a_monitor_whose_report_is_unchanged_at_weight_zero() -> None:
    case = make_case("mlp")
    reports = []
    for with_loss in (False, True):
        model = copy.deepcopy(case.model)
        align = AlignmentLoss(model, cf.RELATIONS, g_mode="ema", weight=0.0) if with_loss else None
        monitor = CRHMonitor(model)
        with monitor:
            for x, y in case.batches:
                model.zero_grad()
                (case.loss(model(x), y) + (align() if align is not None else 0.0)).backward()
        reports.append(monitor.compute(exponents=False))
        if align is not None:
            assert align.attached and align._ema_updates  # its EMA hooks ran beside the monitor's
            align.detach()
    assert reports[0].alignment == reports[1].alignment


def test_ema_warmup_skip_uses_h_z_terms_until_a_backward_pass() -> None:
    model = tanh_mlp()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    align = AlignmentLoss(model, ("f-RWA", "b-GWA"), g_mode="ema", ema_warmup="skip")
    task = F.cross_entropy(model(x), y)
    first = align(task)
    assert {r for d in align.last_alignment.values() for r in d} == {"f-RWA"}
    assert_close(first, torch.stack([1 - align.last_alignment[n]["f-RWA"] for n in ("0", "2", "4")]).mean())
    (task + first).backward()
    model(x)
    align()
    assert {r for d in align.last_alignment.values() for r in d} == {"f-RWA", "b-GWA"}


def test_no_grad_forward_keeps_the_last_training_pass() -> None:
    model = tanh_mlp()
    align = AlignmentLoss(model, ("f-RWA",))
    x = torch.randn(8, 5, dtype=torch.float64)
    model(x)
    before = align()
    with torch.no_grad():
        model(torch.randn(8, 5, dtype=torch.float64))
    assert_close(align(), before)
    assert align().requires_grad


def test_autocast_bfloat16_is_close_to_float32() -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(64, 16)
    align = AlignmentLoss(model, ("f-RWA", "b-RWA"))
    model(x)
    ref = align()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
        val = align()
    assert val.dtype == torch.float32 and torch.isfinite(val)
    assert abs(float(val) - float(ref)) < 2e-2  # bf16 activations: ~3 significant digits


# ============================================================================ errors
def test_bad_arguments_raise_value_errors_naming_the_argument() -> None:
    model = tanh_mlp()
    cases = [
        ({"relations": ("f-RWA", "x-RWA")}, "relations"),
        ({"relations": ()}, "relations"),
        ({"relations": "f-RWA"}, "relations"),
        ({"relations": ("f-RWA", "f-RWA")}, "relations"),
        ({"metric": "l2"}, "metric"),
        ({"preprocess": "whitened"}, "preprocess"),
        ({"g_mode": "lagged"}, "g_mode"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"weight": -0.1}, "weight"),
        ({"layer_weights": {"7": 1.0}}, "layer_weights"),
        ({"layer_weights": {"0": -1.0}}, "layer_weights"),
        ({"relation_weights": {"b-RWA": 1.0}}, "relation_weights"),
        ({"layer_weights": {"0": 0.0, "2": 0.0, "4": 0.0}}, "layer_weights"),
        ({"ema_warmup": "wait"}, "ema_warmup"),
        ({"nonfinite": "ignore"}, "nonfinite"),
        ({"layers": "nope"}, "layers"),
    ]
    for kwargs, arg in cases:
        kwargs.setdefault("relations", ("f-RWA",))
        with pytest.raises(ValueError, match=f"`{arg}"):
            AlignmentLoss(model, **kwargs)
    align = AlignmentLoss(model, ("f-RWA",))
    with pytest.raises(ValueError, match="`weight`"):
        align.weight = -1.0


def test_lifecycle_errors() -> None:
    model = tanh_mlp()
    x = torch.randn(8, 5, dtype=torch.float64)
    align = AlignmentLoss(model, ("f-RWA", "b-GWA"), g_mode="ema")
    with pytest.raises(CanonRegError, match="before any grad-enabled forward pass"):
        align()
    with pytest.raises(CanonRegError, match="already attached"):
        AlignmentLoss(model, ("f-RWA",))
    model(x)
    with pytest.raises(CanonRegError, match="no backward pass has reached"):
        align()
    align.detach()
    with pytest.raises(CanonRegError, match="detached"):
        align()

    exact = AlignmentLoss(model, ("b-RGA",), g_mode="exact")
    model(x)
    with pytest.raises(ValueError, match="`task_loss`"):
        exact()
    with pytest.raises(ValueError, match="`task_loss`"):
        exact(torch.tensor(1.0))
    exact.detach()

    # the model takes two routes; the loss asks for a layer of the route not taken
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.a(x)

    branchy = Branchy()
    loss_b = AlignmentLoss(branchy, ("f-RWA",))
    branchy(torch.randn(4, 3))
    with pytest.raises(CanonRegError, match="'b' has no hook data"):
        loss_b()
    loss_b.detach()

    # task_loss that does not reach a layer's output
    ex = AlignmentLoss(branchy, ("b-GWA",), layers="a", g_mode="exact")
    branchy(torch.randn(4, 3))
    with pytest.raises(CanonRegError, match="does not depend on the output of layer 'a'"):
        ex((branchy.b.weight ** 2).sum())
    ex.detach()


def test_step_between_forward_and_loss_and_inplace_output_with_exact_g_raise() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 2))
    x = torch.randn(8, 4)
    align = AlignmentLoss(model, ("f-RWA", "b-RWA"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(x)
    align()  # in-place ReLU after layer "0" is fine for H–Z terms (output rows were copied)
    out.sum().backward()
    opt.step()
    with pytest.raises(CanonRegError, match="weights of layer '0' changed"):
        align()
    align.detach()
    exact = AlignmentLoss(model, ("b-RGA",), g_mode="exact")
    out = model(x)
    with pytest.raises(CanonRegError, match="modified in place"):
        exact(out.sum())
    exact.detach()


def test_undefined_alignment_follows_the_nonfinite_policy() -> None:
    model = tanh_mlp()
    with torch.no_grad():
        model[4].weight.zero_()  # Z of layer "4" is the zero matrix: α undefined
    x = torch.randn(8, 5, dtype=torch.float64)
    align = AlignmentLoss(model, ("f-RWA",))
    model(x)
    with pytest.raises(CanonRegError, match="'4'/f-RWA"):
        align()
    align.detach()
    for policy in ("warn", "skip"):
        align = AlignmentLoss(model, ("f-RWA",), nonfinite=policy)
        model(x)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            val = align()
        assert (len(rec) == 1) == (policy == "warn")
        want = torch.stack([1 - align.last_alignment[n]["f-RWA"] for n in ("0", "2")]).mean()
        assert_close(val, want)
        (gw,) = torch.autograd.grad(val, model[0].weight)
        assert torch.isfinite(gw).all()
        align.detach()


# ============================================================================ lifecycle / state
def test_detach_restores_the_model_and_context_manager_reattaches() -> None:
    model = tanh_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    align = AlignmentLoss(model, ("f-RWA", "b-GWA"))
    assert align.attached and model._forward_pre_hooks and model[0]._forward_hooks
    align.detach()
    align.detach()  # idempotent
    assert not model._forward_pre_hooks and not any(m._forward_hooks for m in model.modules())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    pickle.dumps(model)
    copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="boom"), align:
        assert align.attached
        raise RuntimeError("boom")
    assert not align.attached
    assert "model" not in dict(align.named_children()) and list(align.parameters()) == []


def test_a_dropped_loss_takes_its_hooks_and_claim() -> None:
    model = tanh_mlp()
    align = AlignmentLoss(model, ("f-RWA", "b-GWA"), g_mode="ema")
    x = torch.randn(8, 5, dtype=torch.float64)
    model(x).sum().backward()  # a G hook ran: it must not keep the loss alive
    out = model(x)  # a pending graph whose output carries a G hook
    del align
    gc.collect()
    assert not model._forward_pre_hooks and not any(m._forward_hooks for m in model.modules())
    out.sum().backward()  # the pending hook finds no loss and does nothing
    again = AlignmentLoss(model, ("f-RWA",))  # the claim went with the dropped loss
    model(x)
    assert torch.isfinite(again())
    again.detach()


@pytest.mark.parametrize("policy", ["error", "warn", "skip"])
def test_nonfinite_gradients_leave_the_g_average_unchanged_by_policy(policy: str) -> None:
    model = tanh_mlp()
    align = AlignmentLoss(model, ("b-GWA",), g_mode="ema", nonfinite=policy)  # type: ignore[arg-type]
    x = torch.randn(8, 5, dtype=torch.float64)
    model(x).square().sum().backward()
    before = {n: dict(d) for n, d in align._ema.items()}
    updates = dict(align._ema_updates)
    nan_pass = (model(x) * float("nan")).sum()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        if policy == "error":
            with pytest.raises(CanonRegError, match=r"Non-finite gradients reached layer '4'; its G average was not updated"):
                nan_pass.backward()
        else:
            nan_pass.backward()
    msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    if policy == "warn":
        assert msgs and all("Non-finite gradients reached layer" in m and "G average was not updated" in m for m in msgs)
    else:
        assert msgs == []
    assert align._ema_updates == updates
    assert all(torch.equal(align._ema[n][k], v) for n, d in before.items() for k, v in d.items())
    align.detach()


def test_state_dict_pickle_and_deepcopy_round_trip() -> None:
    model = tanh_mlp()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    align = AlignmentLoss(model, ("f-RWA", "b-GWA"), g_mode="ema", weight=0.3)
    F.cross_entropy(model(x), y).backward()
    sd = align.state_dict()
    assert list(sd) == ["_extra_state"]  # only the loss's own state, never the model's parameters
    attached_clone = pickle.loads(pickle.dumps(align))  # a copy of an attached loss is detached; the original stays
    assert align.attached and not attached_clone.attached
    model(x)
    want = align()

    align.detach()
    fresh_model = copy.deepcopy(model)
    fresh = AlignmentLoss(fresh_model, ("f-RWA", "b-GWA"), g_mode="ema")
    fresh.load_state_dict(sd)
    assert fresh.weight == 0.3
    fresh_model(x)
    assert_close(fresh(), want)
    fresh.detach()

    for clone in (pickle.loads(pickle.dumps(align)), copy.deepcopy(align)):
        assert not clone.attached and clone.model is not model
        assert clone._ema["2"].keys() == {"G_b"}
        assert torch.equal(clone._ema["2"]["G_b"], align._ema["2"]["G_b"])
        clone.attach()
        clone.model(x)
        assert_close(clone(), want)
        clone.detach()


def test_public_functional_twins_are_exported() -> None:
    import canonreg.losses as L

    for name in L.__all__:
        assert hasattr(L, name)
    assert isinstance(row_moment(torch.randn(3, 2)), RowMoment)
    assert canonreg.RELATIONS == cf.RELATIONS


#: The public names of canonreg.losses before it was split into loss_moments / loss_terms / sketch.
_LOSSES_NAMES_BEFORE_SPLIT = (
    "AlignmentLoss", "CRH_PRESET", "ESTIMATORS", "Estimator", "crh_loss", "inner_layers", "GMode", "Side", "LazyRowMoment",
    "MomentOperand", "RowMoment", "SketchOperand", "WeightGram", "alignment_from_moments", "alignment_loss",
    "centred_sketch", "entry_sum", "factored_alignment", "frobenius_inner", "gram_sketches", "gram_sqnorm",
    "rademacher_probes", "row_moment", "sketch_pieces", "sketch_product", "sketched_alignment", "spectral_flatness",
    "squared_frobenius",
)


def test_every_name_of_the_unsplit_module_is_still_importable_and_is_its_owners_object() -> None:
    import canonreg.loss_moments
    import canonreg.losses as L
    import canonreg.sketch

    assert set(L.__all__) == set(_LOSSES_NAMES_BEFORE_SPLIT) - {"Side"}
    for name in _LOSSES_NAMES_BEFORE_SPLIT:
        assert hasattr(L, name), name
    for owner in (canonreg.loss_moments, canonreg.sketch):
        for name in owner.__all__:
            if name in _LOSSES_NAMES_BEFORE_SPLIT:
                assert getattr(L, name) is getattr(owner, name), name


# ============================================================================ benchmark scripts (smoke)
def _load_script(name: str):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def test_benchmark_scripts_run_and_write_their_results(tmp_path) -> None:
    import json

    threads = torch.get_num_threads()
    try:
        over = _load_script("loss_overhead").main(
            ["--quick", "--d_in", "8", "--width", "16", "--hidden", "2", "--batch", "8", "--warmup", "1",
             "--rounds", "1", "--every", "2", "--probes", "4", "--spread_draws", "3", "--out", str(tmp_path / "o.json")]
        )
        saved = json.loads((tmp_path / "o.json").read_text())
        assert saved["ratio_to_plain"]["plain"] == 1.0 and saved["cpu_ratio_to_plain"]["plain"] == 1.0
        assert set(saved["ratio_to_plain"]) == {"plain", "attached", "loss", "loss/2", "hutch:4", "dense"} == set(over["ratio_to_plain"])
        spread = saved["spread_at_init"]
        assert set(spread["4"]) == set(spread["exact"]) and all(v["std"] > 0 for v in spread["4"].values())
        assert saved["config"]["width"] == 16 and "torch" in saved["environment"]

        eff = _load_script("loss_effect").main(
            ["--quick", "--steps", "3", "--width", "8", "--arms", "f-RWA+b-RWA@inner:2", "f-RWA+b-RWA@inner:2/hutchinson4",
             "--spread_probes", "4", "--spread_draws", "3", "--measure_on", "train",
             "--out", str(tmp_path / "e.json"), "--markdown", str(tmp_path / "e.md")]
        )
    finally:
        torch.set_num_threads(threads)
    md = (tmp_path / "e.md").read_text()
    assert "| f-RWA+b-RWA@inner:2 | ['2', '4'] |" in md and "**" in md
    arm = eff["summary"]["arms"]["f-RWA+b-RWA@inner:2"]
    assert arm["layers"] == ["2", "4"] and arm["relations"] == ["f-RWA", "b-RWA"]
    runs = json.loads((tmp_path / "e.json").read_text())["runs"]["0"]
    assert set(runs) == {"init", "baseline", "f-RWA+b-RWA@inner:2", "f-RWA+b-RWA@inner:2/hutchinson4"}
    assert runs["f-RWA+b-RWA@inner:2"]["train"]["weight"] == 2.0
    assert set(runs["f-RWA+b-RWA@inner:2"]["spread"]) == {"exact", "4"} and "spread" not in runs["f-RWA+b-RWA@inner:2/hutchinson4"]
    cmp = eff["summary"]["estimators"]["f-RWA+b-RWA@inner:2/hutchinson4"]
    assert cmp["exact_twin"] == "f-RWA+b-RWA@inner:2" and cmp["probes"] == 4 and set(cmp["alpha_minus_exact"]) == {"2/f-RWA", "2/b-RWA", "4/f-RWA", "4/b-RWA"}
    assert "Randomized vs exact estimator" in md and "measure_crh" in md and "## Spread of the randomized α" in md


def test_crh_reach_quick_runs_and_combines_per_seed_files(tmp_path) -> None:
    import json

    threads = torch.get_num_threads()
    bench = _load_script("crh_reach")
    try:
        args = ["--quick", "--steps", "6", "--measure-every", "3", "--baseline-wds", "5e-4", "--crh-weights", "1"]
        a = bench.main([*args, "--seeds", "0", "--out", str(tmp_path / "a.json")])
        bench.main([*args, "--seeds", "1", "--out", str(tmp_path / "b.json")])
        both = bench.main(["--combine", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "c.json")])
        with pytest.raises(SystemExit, match="repeat"):
            bench.main(["--combine", str(tmp_path / "a.json"), str(tmp_path / "a.json"), "--out", str(tmp_path / "d.json")])
    finally:
        torch.set_num_threads(threads)
    run = a["runs"][1]
    assert run["arm"] == "crh:1" and [h["step"] for h in run["history"]] == [3, 6]
    assert run["min_inner"] == min(run["alpha"][n][r] for n in run["groups"]["inner"] for r in cf.RELATIONS)
    assert run["groups"] == {"first": ["0"], "inner": ["2", "4", "6"], "head": ["8"]}
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["config"]["seeds"] == [0, 1] and len(saved["runs"]) == 4
    accs = [r["test_acc"] for r in saved["runs"] if r["arm"] == "crh:1"]
    assert both["summary"]["arms"]["crh:1"]["test_acc"][0] == pytest.approx(sum(accs) / 2)
    md = (tmp_path / "c.md").read_text()
    assert "| crh:1 |" in md and "Pareto front" in md and "(inner)" in md


class _Reused(nn.Module):
    """Layer ``r`` runs twice per forward pass (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.r, self.h = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.h(torch.tanh(self.r(torch.tanh(self.r(torch.tanh(self.a(x)))))))


@pytest.mark.parametrize("mode", MODES)
def test_ema_folds_every_call_of_a_reused_layer_into_one_update_per_backward(mode: str) -> None:
    """``G ← β G + (1 − β) G_pass`` with ``G_pass`` the moment of the rows of *both* calls of layer ``r`` (as ``H``
    is), one update per backward pass; at β = 0 the loss's α equals ``g_mode="exact"`` on that batch. (Each call
    was folded on its own: two updates per pass, β = 0 kept one call's G, α off by up to 0.09.)"""
    torch.manual_seed(0)
    model = _Reused().double()
    batches = [(torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))) for _ in range(2)]

    def g_rows(x: Tensor, y: Tensor) -> Tensor:  # −B dℓ/dh_b of both calls of r, by retain_grad (no canonreg)
        outs: list[Tensor] = []

        def keep(m: nn.Module, i: object, o: Tensor) -> None:
            o.retain_grad()
            outs.append(o)

        handle = model.r.register_forward_hook(keep)
        F.cross_entropy(model(x), y).backward()
        handle.remove()
        model.zero_grad(set_to_none=True)
        return torch.cat([-o.grad * x.shape[0] for o in outs])

    want = [cf.second_moment(g_rows(x, y), mode) for x, y in batches]
    beta = 0.6
    align = AlignmentLoss(model, ("b-RGA",), layers=["r"], preprocess=mode, g_mode="ema", ema_decay=beta)
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()
    assert align._ema_updates["r"] == 2
    assert_close(align._ema["r"]["G_b"], beta * want[0] + (1 - beta) * want[1])
    align.detach()

    x, y = batches[1]
    alphas = {}
    for g_mode, kw in (("ema", {"ema_decay": 0.0}), ("exact", {})):
        loss = AlignmentLoss(model, cf.RELATIONS, layers=["r"], preprocess=mode, g_mode=g_mode, **kw)  # type: ignore[arg-type]
        if g_mode == "ema":
            F.cross_entropy(model(x), y).backward()
        loss(F.cross_entropy(model(x), y))
        alphas[g_mode] = {k: float(v) for k, v in loss.last_alignment["r"].items()}
        loss.detach()
    for rel in cf.RELATIONS:
        assert alphas["ema"][rel] == pytest.approx(alphas["exact"][rel], abs=1e-10)
