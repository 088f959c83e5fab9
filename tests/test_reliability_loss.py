"""Reliability catalogue for AlignmentLoss / crh_loss: bad arguments, states and numerics.

Each case asserts the documented outcome: a clear error that names the argument (or the problem),
or a result checked against an independent reference (dense matrices, eigenvalues, a closed form).
Issue 10 item 7 (a frozen model gave a loss that can never act, silently) is covered by
``test_frozen_model_*`` and ``test_partly_frozen_model_names_the_layers_that_cannot_act``.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.testing import assert_close

import canonreg
from canonreg import CanonRegError, CRHMonitor
from canonreg import functional as cf
from canonreg.loss_moments import spectral_flatness
from canonreg.losses import CRH_PRESET, AlignmentLoss, crh_loss, inner_layers


def net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3)
    ).double()


def batch(seed: int = 1, n: int = 24) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


# ============================================================================ bad arguments
@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"relations": "al"}, "relations"),
        ({"relations": "ALL"}, "relations"),
        ({"flatness": -1.0}, "flatness"),
        ({"flatness": float("nan")}, "flatness"),
        ({"flatness": "1"}, "flatness"),
        ({"focus": 0.0}, "focus"),
        ({"focus": -0.5}, "focus"),
        ({"focus": float("inf")}, "focus"),
        ({"warmup": -1}, "warmup"),
        ({"warmup": 2.5}, "warmup"),
        ({"warmup": True}, "warmup"),
        ({"metric": "spearman"}, "metric"),
        ({"g_mode": "stopgrad"}, "g_mode"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, arg: str) -> None:
    with pytest.raises(ValueError, match=f"`{arg}`"):
        AlignmentLoss(net(), **kwargs)


def test_crh_loss_rejects_unknown_overrides_by_name() -> None:
    with pytest.raises(TypeError, match="flatnes"):
        crh_loss(net(), flatnes=1.0)
    with pytest.raises(ValueError, match="`weight`"):
        crh_loss(net(), weight=-1.0)


def test_flatness_alone_is_a_valid_objective_but_no_term_at_all_is_not() -> None:
    model = net()
    rels = ("f-RWA",)
    zero = {"f-RWA": 0.0}
    with pytest.raises(ValueError, match="at least one positive term"):
        AlignmentLoss(model, rels, relation_weights=zero)
    align = AlignmentLoss(model, rels, relation_weights=zero, flatness=1.0)
    model(batch()[0])
    val = align()
    want = torch.stack([1 - spectral_flatness(model[i].weight) for i in (0, 2, 4, 6)]).mean()
    assert_close(val, want)


# ============================================================================ issue 10 item 7: frozen models
def test_frozen_model_raises_at_construction() -> None:
    model = net().requires_grad_(False)
    with pytest.raises(CanonRegError, match="no parameter that requires grad"):
        AlignmentLoss(model, "all")


def test_model_frozen_after_construction_raises_at_the_call_naming_the_layers() -> None:
    model = net()
    x, y = batch()
    align = AlignmentLoss(model, ("f-RWA", "b-RWA"))
    model.requires_grad_(False)
    model(x)
    with pytest.raises(CanonRegError, match=r"cannot act.*'0', '2', '4', '6'"):
        align()


def test_partly_frozen_model_names_the_layers_that_cannot_act() -> None:
    model = net()
    x, _ = batch()
    model[0].requires_grad_(False)  # layer "0": data input, frozen W -> its H-Z terms are constants
    align = AlignmentLoss(model, ("f-RWA",), layers=["0", "2"])
    model(x)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        val = align()
        align()  # warned once, not at every call
    msgs = [str(r.message) for r in rec if "cannot act" in str(r.message)]
    assert len(msgs) == 1 and "['0']" in msgs[0]
    assert val.requires_grad
    (g2,) = torch.autograd.grad(val, model[2].weight)
    assert g2.abs().sum() > 0


# ============================================================================ defaults and states
def test_all_six_with_defaults_works_from_the_first_step() -> None:
    """Regression: `AlignmentLoss(model, relations=<all six>)` raised at the first call (no G average)."""
    model = net()
    x, y = batch()
    align = AlignmentLoss(model, relations=canonreg.RELATIONS)
    assert align.metric == "pearson" and align.g_mode == "exact"
    task = F.cross_entropy(model(x), y)
    val = align(task)
    assert torch.isfinite(val) and val.requires_grad
    assert {r for d in align.last_alignment.values() for r in d} == set(cf.RELATIONS)
    (task + val).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_all_is_the_six_relations() -> None:
    x, y = batch()
    vals = []
    for rel in ("all", cf.RELATIONS):
        model = net()
        align = AlignmentLoss(model, rel)
        vals.append(align(F.cross_entropy(model(x), y)))
        assert align.relations == cf.RELATIONS
        align.detach()
    assert_close(vals[0], vals[1])


def test_exact_g_without_task_loss_names_task_loss() -> None:
    model = net()
    align = AlignmentLoss(model, "all")
    model(batch()[0])
    with pytest.raises(ValueError, match="`task_loss`"):
        align()


def test_default_metric_is_the_monitors_score_on_the_same_batch() -> None:
    """1 − loss of a single f-RWA/b-RGA term equals CRHMonitor's α (normalized, pearson) on that batch."""
    model = net()
    x, y = batch(n=40)
    monitor = CRHMonitor(model, layers=["2"])
    align = AlignmentLoss(model, ("b-RGA",), layers=["2"])
    with monitor:
        task = F.cross_entropy(model(x), y)
        val = align(task)
        task.backward()
    align.detach()
    alpha = monitor.compute(exponents=False).alignment["2"]["b-RGA"]
    assert abs((1 - float(val.detach())) - alpha) < 1e-7


def test_warmup_ramps_the_weight_linearly_in_calls_and_survives_a_state_dict() -> None:
    x, y = batch()
    model = net()
    ref = AlignmentLoss(model, ("f-RWA", "b-RWA"), weight=2.0)
    model(x)
    full = ref()
    ref.detach()
    align = AlignmentLoss(model, ("f-RWA", "b-RWA"), weight=2.0, warmup=4)
    got = []
    for _ in range(6):
        model(x)
        got.append(align())
    assert_close(torch.stack(got), full * torch.tensor([0.25, 0.5, 0.75, 1.0, 1.0, 1.0], dtype=full.dtype))
    sd = align.state_dict()
    align.detach()
    fresh = AlignmentLoss(model, ("f-RWA", "b-RWA"), weight=2.0, warmup=4)
    fresh.load_state_dict(sd)
    assert fresh.calls == 6
    fresh.reset()
    assert fresh.calls == 0
    sd["_extra_state"]["calls"] = -3
    with pytest.raises(ValueError, match="'calls'"):
        fresh.load_state_dict(sd)


def test_warmup_with_weight_zero_is_still_an_exact_free_zero() -> None:
    model = net()
    align = AlignmentLoss(model, "all", weight=0.0, warmup=3)
    model(batch()[0])
    val = align()  # no task loss needed: nothing is computed
    assert float(val) == 0.0 and not val.requires_grad


def test_focus_is_the_soft_maximum_of_the_terms() -> None:
    x, y = batch()
    model = net()
    rels = ("f-RWA", "b-RWA", "b-RGA")
    w_l = {"0": 1.0, "2": 2.0, "4": 0.5, "6": 1.0}
    for tau in (0.05, 1.0, 1e4):
        align = AlignmentLoss(model, rels, focus=tau, layer_weights=w_l, flatness=0.5)
        val = align(F.cross_entropy(model(x), y))
        terms, wts = [], []
        for n, d in align.last_alignment.items():
            for r, a in d.items():
                terms.append(1 - float(a))
                wts.append(w_l[n] * (0.5 if r == "flatness" else 1.0))
        ref = tau * math.log(sum(w * math.exp(v / tau) for v, w in zip(terms, wts)) / sum(wts))
        assert abs(float(val.detach()) - ref) < 1e-9 * max(1.0, tau)
        if tau == 1e4:  # τ → ∞: the weighted mean
            assert abs(float(val) - sum(w * v for v, w in zip(terms, wts)) / sum(wts)) < 1e-4
        if tau == 0.05:  # τ → 0: close to the worst term
            assert max(terms) - 0.05 * math.log(sum(wts) / min(wts)) <= float(val) <= max(terms) + 1e-12
        align.detach()


# ============================================================================ numerics
def test_spectral_flatness_matches_eigenvalues() -> None:
    torch.manual_seed(0)
    for shape in ((7, 4), (4, 7), (6, 6)):
        w = torch.randn(*shape, dtype=torch.float64)
        lam = torch.linalg.eigvalsh(w.T @ w)
        ref = (lam**3).sum() / torch.sqrt((lam**2).sum() * (lam**4).sum())
        assert_close(spectral_flatness(w), ref)
    q, _ = torch.linalg.qr(torch.randn(9, 9, dtype=torch.float64))
    assert_close(spectral_flatness(5.0 * q[:3]), torch.tensor(1.0, dtype=torch.float64))  # scaled partial isometry
    assert_close(spectral_flatness(1e-30 * q[:3]), torch.tensor(1.0, dtype=torch.float64))  # no underflow to NaN
    assert torch.isnan(spectral_flatness(torch.zeros(3, 4)))
    with pytest.raises(ValueError, match="`w`"):
        spectral_flatness(torch.randn(5))


def test_flatness_gradient_matches_finite_differences() -> None:
    torch.manual_seed(2)
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(spectral_flatness, (w,))


def test_nonfinite_input_is_named_by_the_policy() -> None:
    model = net()
    x, y = batch()
    x[3, 1] = float("nan")
    align = AlignmentLoss(model, ("f-RWA",))
    model(x)
    with pytest.raises(CanonRegError, match="undefined"):
        align()


# ============================================================================ the preset
def test_crh_loss_is_the_documented_preset_on_the_inner_layers() -> None:
    model = net()
    assert inner_layers(model) == ["2", "4"]
    align = crh_loss(model, weight=0.7, focus=0.2)
    assert align.layer_names == ("2", "4") and align.weight == 0.7 and align.focus == 0.2
    assert align.relations == cf.RELATIONS and align.metric == CRH_PRESET["metric"]
    assert align.flatness == CRH_PRESET["flatness"] and align.warmup == CRH_PRESET["warmup"]
    align.detach()
    assert crh_loss(model, layers=["0"]).layer_names == ("0",)
    two = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert inner_layers(two) == ["0", "2"]  # fewer than three layers: all of them


def test_focus_with_every_term_skipped_is_zero_with_finite_gradients() -> None:
    model = net()
    with torch.no_grad():
        model[2].weight.zero_()  # Z of layer "2" is 0: its α is undefined and the term is skipped
    align = AlignmentLoss(model, ("f-RWA",), layers=["2"], focus=0.1, nonfinite="skip")
    model(batch()[0])
    val = align()
    assert float(val.detach()) == 0.0
    (g,) = torch.autograd.grad(val, model[0].weight, allow_unused=True)
    assert g is None or torch.isfinite(g).all()


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_raw_pearson_on_float32_inputs_far_from_zero_matches_the_float64_reference(offset: float) -> None:
    """``raw`` + ``pearson`` subtracts pieces that grow with the inputs' mean (``H_a ≈ μμᵀ + C``): on float32 rows
    of ``offset + N(0, 1)`` the loss's α and its gradient in ``W`` equal a dense float64 reference (float32
    pieces gave an undefined α at 1e3 and −0.002 for −0.089 at 1e4)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = torch.randn(256, 8) + offset, torch.randint(0, 4, (256,))
    align = AlignmentLoss(m, relations=("f-RWA",), layers=["0"], preprocess="raw", metric="pearson")
    val = align(F.cross_entropy(m(x), y))
    (got,) = torch.autograd.grad(val, [m[0].weight])
    align.detach()
    w = m[0].weight.detach().double().requires_grad_(True)
    x64 = x.double()
    ref = 1.0 - cf.alignment(x64.T @ x64 / x.shape[0], w.T @ w, "pearson")
    (want,) = torch.autograd.grad(ref, [w])
    assert float(val) == pytest.approx(float(ref), abs=1e-5)  # float64 itself cancels ~1e-6 at 1e4
    assert_close(got.double(), want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("preprocess", ["centered", "normalized"])
def test_identical_rows_have_no_spread_for_the_loss_either(preprocess: str, dtype: torch.dtype) -> None:
    """Every sample with the same input row: ``H_a`` is the zero matrix, α undefined, so the default
    ``nonfinite="error"`` raises (as the monitor reports NaN). The centred rows were ulps, not zeros: the loss
    scored them, float32 centered f-RWA as a perfect α = 1, with no error."""
    row = torch.tensor([[0.3, -1.7, 2.9, 0.11, 5.3]])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 3)).to(dtype)
    x, y = row.repeat(64, 1).to(dtype), torch.randint(0, 3, (64,))
    for rel in ("f-RWA", "f-RGA"):
        align = AlignmentLoss(model, relations=(rel,), layers=["0"], preprocess=preprocess)
        with pytest.raises(CanonRegError, match="undefined"):
            align(F.cross_entropy(model(x), y))
        align.detach()
    assert float(cf.second_moment(x, preprocess).abs().max()) == 0.0


def test_a_state_from_another_model_or_damaged_is_refused_and_changes_nothing() -> None:
    """G averages from a model of another width loaded silently (the next call failed on 8 × 8 vs 16 × 16, naming
    neither the layer nor the state); a damaged state was refused only after the averages and weight were replaced."""
    torch.manual_seed(0)

    def make(width: int) -> tuple[nn.Module, AlignmentLoss]:
        model = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 3))
        align = AlignmentLoss(model, relations=("b-GWA", "f-RGA"), g_mode="ema", weight=1.0)
        F.cross_entropy(model(torch.randn(16, 4)), torch.randint(0, 3, (16,))).backward()
        return model, align

    _, small = make(8)
    _, big = make(16)
    before = {n: {k: v.clone() for k, v in d.items()} for n, d in big._ema.items()}
    with pytest.raises(ValueError, match=r"G_a average of layer '2' to be 16 × 16 .* but got \(8, 8\)"):
        big.set_extra_state(small.get_extra_state())
    damaged = big.get_extra_state()
    damaged.update(weight=3.0, calls=-1)
    with pytest.raises(ValueError, match="'calls'"):
        big.set_extra_state(damaged)
    assert big.weight == 1.0
    for n, d in before.items():
        for k, v in d.items():
            assert torch.equal(big._ema[n][k], v)


def test_a_call_that_raises_does_not_move_the_warmup_ramp() -> None:
    """``warmup=4``: a call refused before any forward pass counted as call 1, so the first call that returned a
    value was weighted 2/4 instead of 1/4."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    align = AlignmentLoss(model, relations=("f-RWA",), warmup=4)
    with pytest.raises(CanonRegError, match="before any grad-enabled forward pass"):
        align()
    assert align.calls == 0
    x = torch.randn(16, 4)
    model(x)
    first = float(align())
    align.calls = 3  # the same pass with the ramp done: the unramped value
    model(x)
    assert first == pytest.approx(float(align()) / 4, rel=1e-6)


def test_g_relations_of_weight_zero_need_no_task_loss_and_no_double_backward() -> None:
    """``relations="all"`` with the four G relations weighted 0: no G term can act, so ``align()`` needs no
    ``task_loss`` (it demanded one and ran the double backward) and equals the H–Z relations alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(16, 4)
    zero_g = {r: 0.0 for r in cf.RELATIONS if "G_a" in cf.RELATION_PAIRS[r] or "G_b" in cf.RELATION_PAIRS[r]}
    align = AlignmentLoss(model, relations="all", relation_weights=zero_g)
    assert not align.uses_g
    model(x)
    value = align()
    align.detach()
    hz = AlignmentLoss(model, relations=("f-RWA", "b-RWA"))
    model(x)
    assert float(value) == pytest.approx(float(hz()), rel=1e-12)
