"""Reliability catalogue of CRHMonitor, CRHReport and canonreg.functional (issue 10).

Every case feeds a bad argument, a misused lifecycle, a numerically hostile input or a fault, and
asserts the documented outcome: either a clear error that names the problem (canonreg's
``CanonRegError`` for lifecycle/model problems, ``ValueError``/``TypeError`` for argument values, as
documented in :mod:`canonreg.errors`), or a correct result checked against a dense float64
reference written here the obvious way (captured rows, centred outer products, float64 throughout).
Hypothesis properties at the end cover classes of inputs (large offsets, tiny batches, extreme
scales, mixed dtypes) with few examples, so the file stays fast.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_case, ref_moment, reference_rows, run_monitor, two_simulated_ranks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.testing import assert_close

import canonreg
from canonreg import CanonRegError, CRHMonitor
from canonreg import functional as cf

pytestmark = pytest.mark.usefixtures("single_thread")

HYPO = settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ----------------------------------------------------------------------------- references
def capture_rows(layer: nn.Linear, model: nn.Module, batches: list[Tensor], loss_fn: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """``h_a``, ``h_b`` and ``g_b = −B · dL/dh_b`` of ``layer`` over ``batches`` (float64, no canonreg).

    ``loss_fn`` must be a mean over independent rows, so ``−B · dL/dh_b`` is each row's own gradient.
    """
    rows: dict[str, list[Tensor]] = {"ha": [], "hb": [], "gb": []}
    for x in batches:
        seen: dict[str, Tensor] = {}

        def keep(m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
            seen["ha"], seen["hb"] = inp[0].detach(), out
            out.retain_grad()

        h = layer.register_forward_hook(keep)
        try:
            loss = loss_fn(model(x))
        finally:
            h.remove()
        (grad,) = torch.autograd.grad(loss, [seen["hb"]])
        rows["ha"].append(seen["ha"].double())
        rows["hb"].append(seen["hb"].detach().double())
        rows["gb"].append(-grad.double() * x.shape[0])
    return {k: torch.cat(v) for k, v in rows.items()}


def dense_cov(x: Tensor) -> Tensor:
    """Population covariance of float64 rows by explicit centring."""
    x = x.double()
    xc = x - x.mean(0)
    return xc.T @ xc / x.shape[0]


def monitor_run(model: nn.Module, batches: list[Tensor], loss_fn: Callable[[Tensor], Tensor], **kwargs: object) -> canonreg.CRHReport:
    monitor = CRHMonitor(model, **kwargs)
    with monitor:
        for x in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model(x)).backward()
    return monitor.compute(exponents=False)


def sq_loss(out: Tensor) -> Tensor:
    return out.square().mean()


def linear_loss(target: Tensor) -> Callable[[Tensor], Tensor]:
    """A loss linear in the output (its gradient does not depend on the activations' scale)."""
    return lambda out: (out * target.to(out.dtype)).sum(1).mean()


def no_hooks(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules()
    ) and all(not p._backward_hooks and not getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())


# ============================================================================= 1. arguments
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _report() -> canonreg.CRHReport:
    m = _mlp()
    return monitor_run(m, [torch.randn(16, 5)], sq_loss)


ARGUMENT_CASES: list[tuple[str, Callable[[], object], type[BaseException], str]] = [
    ("monitor-model-not-module", lambda: CRHMonitor("model"), TypeError, r"`model`.*nn\.Module"),  # type: ignore[arg-type]
    ("monitor-accumulation-0", lambda: CRHMonitor(_mlp(), accumulation=0), ValueError, "`accumulation`.*positive int.*0"),
    ("monitor-accumulation-float", lambda: CRHMonitor(_mlp(), accumulation=2.5), ValueError, "`accumulation`"),  # type: ignore[arg-type]
    ("monitor-accumulation-bool", lambda: CRHMonitor(_mlp(), accumulation=True), ValueError, "`accumulation`"),
    ("monitor-grad-scale-nan", lambda: CRHMonitor(_mlp(), grad_scale=float("nan")), ValueError, "`grad_scale`"),
    ("monitor-grad-scale-inf", lambda: CRHMonitor(_mlp(), grad_scale=float("inf")), ValueError, "`grad_scale`"),
    ("monitor-max-rows-negative", lambda: CRHMonitor(_mlp(), max_rows=-3), ValueError, "`max_rows`"),
    ("monitor-every-float", lambda: CRHMonitor(_mlp(), every=1.5), ValueError, "`every`"),  # type: ignore[arg-type]
    ("monitor-layers-empty", lambda: CRHMonitor(_mlp(), layers=[]), ValueError, "at least one layer"),
    ("monitor-defer-checks-str", lambda: CRHMonitor(_mlp(), defer_checks="yes"), TypeError, "`defer_checks`"),  # type: ignore[arg-type]
    ("monitor-sync-dist-int", lambda: CRHMonitor(_mlp(), sync_dist=1), TypeError, "`sync_dist`"),  # type: ignore[arg-type]
    ("monitor-zero-width-out", lambda: CRHMonitor(nn.Sequential(nn.Linear(4, 0))), CanonRegError, r"Layer '0' \(Linear\) has a zero-width weight of shape \(0, 4\)"),
    ("monitor-zero-width-in", lambda: CRHMonitor(nn.Sequential(nn.Linear(3, 3), nn.Linear(0, 4))), CanonRegError, r"Layer '1' \(Linear\) has a zero-width weight of shape \(4, 0\)"),
    ("compute-lr-alone", lambda: _attached_with_data().compute(lr=0.1), ValueError, "given together"),
    ("compute-lr-nan", lambda: _attached_with_data().compute(lr=float("nan"), weight_decay=0.0, batch_size=4), ValueError, "`lr`"),
    ("compute-batch-size-0", lambda: _attached_with_data().compute(lr=0.1, weight_decay=0.0, batch_size=0), ValueError, "`batch_size`"),
    ("compute-floor-1", lambda: _attached_with_data().compute(floor=1.0), ValueError, "`floor`"),
    ("compute-eig-floor-1-old-name", lambda: _attached_with_data().compute(eig_floor=1.0), ValueError, "`eig_floor`"),
    ("compute-bootstrap-negative", lambda: _attached_with_data().compute(n_bootstrap=-1), ValueError, "`n_bootstrap`"),
    ("report-matrices-unknown-layer", lambda: _report().matrices("9"), KeyError, r"`layer`.*'9'"),
    ("report-phase-threshold", lambda: _report().phase("0", threshold=2.0), ValueError, "`threshold`"),
    ("report-table-kind", lambda: _report().table("spectra"), ValueError, "`what`"),
    ("report-mean-on-nan", lambda: _report().mean_alignment(on_nan="ignore"), ValueError, "`on_nan`"),  # type: ignore[arg-type]
    ("report-mean-unknown-relation", lambda: _report().mean_alignment(relations=("f-XYZ",)), ValueError, "`relations`"),
    ("report-json-path-type", lambda: _report().to_json(3), TypeError, "`path`"),  # type: ignore[arg-type]
    ("functional-alignment-shapes", lambda: cf.alignment(torch.eye(2), torch.eye(3)), ValueError, "same shape"),
    ("functional-alignment-empty", lambda: cf.alignment(torch.empty(0, 0), torch.empty(0, 0)), ValueError, "at least one entry"),
    ("functional-alignment-metric", lambda: cf.alignment(torch.eye(2), torch.eye(2), "spearman"), ValueError, "`metric`"),  # type: ignore[arg-type]
    ("functional-moment-count-0", lambda: cf.moment_from_sums(torch.eye(2), torch.zeros(2), 0, centered=True), ValueError, "`count`"),
    ("functional-second-moment-1d", lambda: cf.second_moment(torch.randn(5)), ValueError, "2-D"),
    ("functional-second-moment-0-rows", lambda: cf.second_moment(torch.randn(0, 3)), ValueError, "at least one row"),
    ("functional-pr-not-square", lambda: cf.participation_ratio(torch.ones(2, 3)), ValueError, "square"),
    ("functional-power-law-floor", lambda: cf.power_law_fit(torch.eye(3), torch.eye(3), floor=1.0), ValueError, "`floor`"),
    ("functional-random-orthogonal-0", lambda: cf.random_orthogonal(0), ValueError, "`d`"),
    ("functional-invariance-1-sample", lambda: cf.invariance_score(torch.randn(1, 3), torch.randn(1, 3)), ValueError, "at least 2 samples"),
    ("functional-balance-lr-0", lambda: cf.balance_terms(1.0, 0.0, 0.0, lr=0.0, weight_decay=0.0, batch_size=1), ValueError, "`lr`"),
    ("functional-n-components-threshold", lambda: cf.n_components(torch.eye(3), threshold=1.5), ValueError, "`threshold`"),
]


def _attached_with_data() -> CRHMonitor:
    m = _mlp()
    monitor = CRHMonitor(m)
    with monitor:
        m(torch.randn(8, 5)).square().mean().backward()
    return monitor


@pytest.mark.parametrize("case", ARGUMENT_CASES, ids=[c[0] for c in ARGUMENT_CASES])
def test_argument_catalogue(case: tuple[str, Callable[[], object], type[BaseException], str]) -> None:
    _, call, exc, pattern = case
    with pytest.raises(exc, match=pattern), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "Initializing zero-element tensors is a no-op"
        call()


# ============================================================================= 2. lifecycle
def test_nested_with_blocks_keep_the_outer_block_attached() -> None:
    """Issue 10 item 5: leaving an inner ``with monitor:`` must not detach the outer one (16 rows, not 8)."""
    m = _mlp()
    monitor = CRHMonitor(m)
    with monitor:
        m(torch.randn(4, 5)).sum().backward()
        with monitor:
            m(torch.randn(4, 5)).sum().backward()
        assert monitor.attached
        m(torch.randn(4, 5)).sum().backward()
        m(torch.randn(4, 5)).sum().backward()
    assert not monitor.attached and no_hooks(m)
    assert monitor.compute(exponents=False).samples == {"0": 16, "2": 16}


def test_with_block_inside_explicit_attach_leaves_it_attached() -> None:
    m = _mlp()
    monitor = CRHMonitor(m).attach()
    with monitor:
        pass
    assert monitor.attached
    monitor.detach()
    assert no_hooks(m)


def test_exception_in_nested_block_restores_each_level() -> None:
    m = _mlp()
    monitor = CRHMonitor(m)
    with pytest.raises(KeyError), monitor:
        with pytest.raises(ZeroDivisionError), monitor:
            raise ZeroDivisionError
        assert monitor.attached  # the inner block restored the outer block's state
        raise KeyError("outer")
    assert not monitor.attached and no_hooks(m)


def test_detach_inside_with_block_then_exit_is_clean() -> None:
    m = _mlp()
    monitor = CRHMonitor(m)
    with monitor:
        monitor.detach()
        m(torch.randn(4, 5)).sum().backward()  # not recorded
    assert no_hooks(m)
    with pytest.raises(CanonRegError, match="before any backward pass"):
        monitor.compute()


def test_forward_without_backward_and_no_grad_forward_give_clear_errors() -> None:
    m = _mlp()
    monitor = CRHMonitor(m)
    with monitor:
        m(torch.randn(4, 5))
        with torch.no_grad():
            m(torch.randn(4, 5))
    with pytest.raises(CanonRegError, match="no backward pass reached its output"):
        monitor.compute()
    other = CRHMonitor(m)
    with other, torch.no_grad():
        m(torch.randn(4, 5))
    with pytest.raises(CanonRegError, match="never ran in a grad-enabled forward pass"):
        other.compute()


def test_second_monitor_and_pickling_are_refused() -> None:
    m = _mlp()
    with CRHMonitor(m) as monitor:
        with pytest.raises(CanonRegError, match="already attached"):
            CRHMonitor(m).attach()
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(monitor)
        clone = pickle.loads(pickle.dumps(m))  # an attached model pickles to a plain model (no monitor hook)
        clone(torch.randn(4, 5)).sum().backward()
        assert not any(h for c in clone.modules() for h in (c._forward_hooks, c._forward_pre_hooks))
    pickle.dumps(m)  # detached: the model pickles too


def test_compute_twice_gives_the_same_report() -> None:
    m = _mlp()
    monitor = CRHMonitor(m, preprocess="centered")
    with monitor:
        for _ in range(20):  # spans a fold of the partial window
            m.zero_grad()
            m(1e3 + torch.randn(8, 5)).square().mean().backward()
    a, b = monitor.compute(n_bootstrap=0), monitor.compute(n_bootstrap=0)
    for layer in a.layers:
        for k, v in a.matrices(layer).items():
            assert torch.equal(v, b.matrices(layer)[k])


@pytest.mark.parametrize("owner", ["monitor", "loss", "optimizer"])
def test_uninitialised_lazy_layer_is_refused_naming_it(owner: str) -> None:
    """An ``nn.LazyLinear`` before its first forward pass has no weight shape yet: a CanonRegError naming the
    layer and what to do (was torch's ``ValueError: Attempted to use an uninitialized parameter``)."""
    model = nn.Sequential(nn.LazyLinear(7), nn.Tanh(), nn.Linear(7, 3))
    make: dict[str, Callable[[], object]] = {
        "monitor": lambda: CRHMonitor(model),
        "loss": lambda: canonreg.AlignmentLoss(model, relations=("f-RWA",)),
        "optimizer": lambda: canonreg.NoiseCalibrated(torch.optim.SGD(model[2].parameters(), lr=0.1), model),
    }
    with pytest.raises(CanonRegError, match=r"Layer '0' \(LazyLinear\) has uninitialised lazy parameters.*run one forward pass"):
        make[owner]()
    model(torch.randn(2, 5))  # initialised: measured like an nn.Linear
    if owner == "monitor":
        with CRHMonitor(model) as monitor:
            model(torch.randn(8, 5)).square().mean().backward()
        assert monitor.compute(exponents=False).layers == ["0", "2"]


def test_meta_device_model_is_refused_at_attach_naming_the_layer() -> None:
    """Issue 10 item 9: a meta-device model gets a CanonRegError at attach, not a torch error in a hook."""
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    monitor = CRHMonitor(m)
    with pytest.raises(CanonRegError, match=r"Layer '0' \(Linear\) has its weight on the meta device"):
        monitor.attach()
    assert not monitor.attached and no_hooks(m)
    # materialised later: the same monitor attaches and measures
    m.to_empty(device="cpu")
    for p in m.parameters():
        nn.init.normal_(p)
    with monitor:
        m(torch.randn(6, 4)).square().mean().backward()
    assert monitor.compute(exponents=False).samples["2"] == 6


def test_model_moved_to_meta_while_attached_raises_in_the_forward_naming_the_layer() -> None:
    m = nn.Sequential(nn.Linear(4, 3))
    monitor = CRHMonitor(m).attach()
    m.to("meta")
    with pytest.raises(CanonRegError, match=r"Layer '0' ran on the meta device"):
        m(torch.randn(2, 4, device="meta"))
    monitor.detach()


def test_reset_mid_window_then_more_steps_matches_a_fresh_monitor() -> None:
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(4, 3)).double()
    xs = [500 + torch.randn(6, 4, dtype=torch.float64) for _ in range(5)]
    monitor = CRHMonitor(m, preprocess="centered")
    with monitor:
        for x in xs[:3]:
            m(x).square().mean().backward()
        monitor.reset()
        for x in xs[3:]:
            m(x).square().mean().backward()
    rows = capture_rows(m[0], m, xs[3:], sq_loss)
    assert_close(monitor.compute(exponents=False).matrices("0")["H_a"], dense_cov(rows["ha"]))


# ============================================================================= 3. numerics
@pytest.fixture(params=["cpu", "accelerator"])
def route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The numerics tests below run on both routes of the monitor's moments: the CPU's (row panels, float32
    norms range-checked on the host) and the one a GPU takes (``moments._CPU_ROUTE`` empty: one matmul per
    Gram, float64 norms, no host read), here on the CPU."""
    if request.param == "accelerator":
        import canonreg.moments as moments

        monkeypatch.setattr(moments, "_CPU_ROUTE", ())
    return str(request.param)


def test_large_offset_centered_moments_do_not_cancel(route: str) -> None:
    """Issue 10 item 1: 20 steps of inputs 1000 + N(0, 1) in float32; H_a must be the covariance (≈ I)."""
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(4, 4))
    mon = CRHMonitor(m, preprocess="centered")
    mon.attach()
    xs = []
    for _ in range(20):
        x = 1000 + torch.randn(64, 4)
        xs.append(x)
        m(x).square().mean().backward()
    mon.detach()
    h_a = mon.compute(exponents=False).matrices("0")["H_a"]
    want = dense_cov(torch.cat(xs))
    # float32 rows: the inputs themselves carry ulp(1000) ≈ 6e-5; the old code was off by 0.8
    assert_close(h_a, want, rtol=0, atol=1e-5)
    assert float(torch.linalg.eigvalsh(h_a).min()) > 0.8


@pytest.mark.parametrize("identities", [True, False])
def test_large_offset_raw_moments_keep_their_spread(identities: bool, route: str) -> None:
    """Raw moments of float32 inputs 1e5 + N(0, 1) over 20 steps (two folds): ``E[xxᵀ] − μμᵀ`` (float64, from
    the report) is the covariance of the rows, and α matches the dense float64 reference. A float32 window
    ``Σxxᵀ`` (no shift) rounded the spread away: f-RGA came out 0.08 and −0.50 at offsets 1e5 and 1e6 for 0."""
    torch.manual_seed(4)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    xs = [1e5 + torch.randn(32, 4) for _ in range(20)]
    report = monitor_run(m, xs, sq_loss, preprocess="raw", identities=identities)
    rows = capture_rows(m[0], m, xs, sq_loss)
    x64 = rows["ha"].double()
    mu = x64.mean(0)
    got = report.matrices("0")
    assert_close(got["H_a"] - torch.outer(mu, mu), dense_cov(x64), rtol=0, atol=1e-4)
    hb = rows["hb"].detach().double()  # float32 rows of ~1e5: rounded by ~1e-8 relative (identities are exact)
    assert_close(got["H_b"], hb.T @ hb / hb.shape[0], rtol=1e-6, atol=0)
    w64 = m[0].weight.detach().double()
    want = cf.alignment(x64.T @ x64 / x64.shape[0], w64.T @ w64, "pearson")
    assert abs(report.alignment["0"]["f-RWA"] - float(want)) < 1e-6


def test_large_offset_normalized_mode_matches_the_dense_reference(route: str) -> None:
    """Normalised rows of 1000 + N(0, 1) nearly coincide: their covariance (~1e-7) sits under a mean of 0.25."""
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(4, 3))
    xs = [1000 + torch.randn(32, 4) for _ in range(18)]
    report = monitor_run(m, xs, sq_loss, preprocess="normalized")
    rows = capture_rows(m[0], m, xs, sq_loss)
    want = ref_moment(rows["ha"], "normalized")
    got = report.matrices("0")["H_a"]
    assert_close(got, want, rtol=0, atol=2e-3 * float(want.abs().max()))  # float32 normalisation: ~1e-4 relative


@pytest.mark.parametrize("preprocess", ["centered", "normalized"])
def test_one_sample_gives_nan_with_a_stated_reason(preprocess: str, route: str) -> None:
    """Issue 10 item 1: one sample has a zero covariance: NaN α with a reason, NaN ranks (never PR < 1)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    monitor = CRHMonitor(m, preprocess=preprocess)
    with monitor:
        m(torch.randn(1, 4)).sum().backward()
    report = monitor.compute()
    for layer in report.layers:
        for rel in canonreg.RELATIONS:
            assert math.isnan(report.alignment[layer][rel])
            assert "only 1 sample" in report.nan_reasons[layer][rel]
        for mat in ("H_a", "H_b", "G_a", "G_b"):
            assert torch.count_nonzero(report.matrices(layer)[mat]) == 0
            assert math.isnan(report.effective_rank[layer][mat]["participation"])


def test_one_sample_raw_mode_is_rank_one() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6))
    x = torch.randn(1, 4)
    report = monitor_run(m, [x], sq_loss, preprocess="raw")
    assert_close(report.matrices("0")["H_a"], torch.outer(x[0].double(), x[0].double()))
    assert report.effective_rank["0"]["H_a"]["participation"] == pytest.approx(1.0)


def test_participation_ratios_of_a_report_lie_in_one_to_d() -> None:
    torch.manual_seed(4)
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    report = monitor_run(m, [torch.randn(2, 6), 300 + torch.randn(3, 6)], sq_loss, preprocess="normalized")
    for layer in report.layers:
        for mat, r in report.effective_rank[layer].items():
            d = report.matrices(layer)[mat].shape[0]
            pr = r["participation"]
            assert math.isnan(pr) or 1.0 <= pr <= d, (layer, mat, pr)


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_extreme_activation_scales_in_float32(scale: float, route: str) -> None:
    """Activations of 1e±30 in a float32 model: the old code's float32 row norms overflowed (a false
    'non-finite' error) or its products underflowed (H = 0); now H_a = scale² · Cov(z)."""
    torch.manual_seed(5)
    m = nn.Sequential(nn.Linear(4, 3, bias=False))
    z = torch.randn(16, 4)
    target = torch.randn(16, 3)
    for mode in ("centered", "normalized", "raw"):
        report = monitor_run(m, [z * scale], linear_loss(target), preprocess=mode)
        rows = capture_rows(m[0], m, [z * scale], linear_loss(target))
        want = ref_moment(rows["ha"], mode)
        assert_close(report.matrices("0")["H_a"], want, rtol=1e-5, atol=0)
        assert_close(report.matrices("0")["G_b"], ref_moment(rows["gb"], mode), rtol=1e-5, atol=0)


def test_tiny_gradients_do_not_underflow(route: str) -> None:
    """A loss scaled by 1e-30 (float32): G_b ~ 1e-60 must come out, not zero (and α unchanged)."""
    torch.manual_seed(6)
    m = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x = torch.randn(16, 4)
    small = monitor_run(m, [x], lambda o: 1e-30 * o.square().mean(), preprocess="centered")
    rows = capture_rows(m[2], m, [x], lambda o: 1e-30 * o.square().mean())
    assert_close(small.matrices("2")["G_b"], dense_cov(rows["gb"]), rtol=1e-5, atol=0)
    plain = monitor_run(m, [x], sq_loss, preprocess="centered")
    for rel in canonreg.RELATIONS:
        assert small.alignment["2"][rel] == pytest.approx(plain.alignment["2"][rel], abs=1e-5)


@pytest.mark.parametrize("preprocess", ["centered", "raw"])
def test_wide_layer_blocked_gram_across_folds_with_offset(preprocess: str, route: str) -> None:
    """d_a = 300 > the 256-column block: upper-triangular windows and totals, symmetrised once at export."""
    torch.manual_seed(14)
    m = nn.Sequential(nn.Linear(300, 2))
    xs = [200 + torch.randn(8, 300) for _ in range(20)]  # two folds
    report = monitor_run(m, xs, sq_loss, preprocess=preprocess)
    x = torch.cat(xs).double()
    want = dense_cov(x) if preprocess == "centered" else x.T @ x / x.shape[0]
    got = report.matrices("0")["H_a"]
    assert torch.equal(got, got.T)
    assert_close(got, want, rtol=1e-6, atol=2e-5)


def test_float64_model_with_offset_1e6(route: str) -> None:
    torch.manual_seed(7)
    m = nn.Sequential(nn.Linear(3, 2)).double()
    xs = [1e6 + torch.randn(10, 3, dtype=torch.float64) for _ in range(20)]
    report = monitor_run(m, xs, sq_loss, preprocess="centered")
    assert_close(report.matrices("0")["H_a"], dense_cov(torch.cat(xs)), rtol=0, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_with_offset(dtype: torch.dtype, route: str) -> None:
    """Half/bfloat16 activations near 100: the covariance of the actual (rounded) rows, not a cancelled one."""
    torch.manual_seed(8)
    m = nn.Sequential(nn.Linear(4, 3)).to(dtype)
    xs = [(100 + 4 * torch.randn(32, 4)).to(dtype) for _ in range(3)]
    report = monitor_run(m, xs, lambda o: o.float().square().mean(), preprocess="centered")
    assert_close(report.matrices("0")["H_a"], dense_cov(torch.cat(xs)), rtol=1e-5, atol=1e-5)


def test_model_changing_dtype_mid_window(route: str) -> None:
    torch.manual_seed(9)
    m = nn.Sequential(nn.Linear(4, 3))
    xs = [50 + torch.randn(8, 4) for _ in range(4)]
    monitor = CRHMonitor(m, preprocess="centered")
    with monitor:
        for i, x in enumerate(xs):
            if i == 2:
                m.double()
            m.zero_grad()
            m(x.to(m[0].weight.dtype)).square().mean().backward()
    got = monitor.compute(exponents=False).matrices("0")["H_a"]
    assert_close(got, dense_cov(torch.cat(xs)), rtol=0, atol=1e-5)


def test_empty_batch_adds_nothing(route: str) -> None:
    torch.manual_seed(10)
    m = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(8, 4)
    monitor = CRHMonitor(m, preprocess="centered")
    with monitor:
        m(torch.randn(0, 4)).square().sum().backward()
    with pytest.raises(CanonRegError, match="before any backward pass"):
        monitor.compute()
    with monitor:
        m(x).square().mean().backward()
    assert_close(monitor.compute(exponents=False).matrices("0")["H_a"], dense_cov(x))


@pytest.mark.parametrize("defer", [False, True])
def test_inf_input_error_names_layer_and_call(defer: bool, route: str) -> None:
    m = _mlp()
    x = torch.randn(8, 5)
    x[3, 1] = float("inf")
    monitor = CRHMonitor(m, defer_checks=defer)
    with monitor, pytest.raises(CanonRegError, match=r"Non-finite activations \(h_a\) in layer '0' at forward call 1"):
        m(x).square().mean().backward()
        monitor.compute()


def test_nan_loss_with_skip_policy_does_not_average_silently() -> None:
    """Issue 10 item 6: a NaN loss poisons the weights; mean_alignment must not quietly average the rest."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    monitor = CRHMonitor(m, nonfinite="skip")
    with monitor:
        for i in range(4):
            loss = m(torch.randn(16, 5)).square().mean() * (float("nan") if i == 1 else 1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
    report = monitor.compute()  # exponents too: the old code crashed in eigh on the NaN weights
    assert report.skipped == {"0": 3, "2": 3}
    assert "nan in '0' (f-GWA, f-RWA): Z_a has non-finite entries" in str(report)
    nan_entries = [(n, r) for n in report.layers for r in canonreg.RELATIONS if math.isnan(report.alignment[n][r])]
    finite = [report.alignment[n][r] for n in report.layers for r in canonreg.RELATIONS if (n, r) not in nan_entries]
    assert len(nan_entries) == 8 and len(finite) == 4
    for n, r in nan_entries:
        assert "weights are not finite" in report.nan_reasons[n][r]
        assert math.isnan(report.exponents[n][r].exponent)
    with pytest.warns(RuntimeWarning, match=r"averages the 4 finite entries only; 8 of 12 alignment entries are NaN — 0/f-GWA: Z_a has non-finite"):
        got = report.mean_alignment()
    assert got == pytest.approx(sum(finite) / 4)
    assert math.isnan(report.mean_alignment(on_nan="propagate"))
    with pytest.raises(CanonRegError, match="8 of 12 alignment entries are NaN"):
        report.mean_alignment(on_nan="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert report.mean_alignment(on_nan="omit") == got
        assert report.mean_alignment(relations=("f-RGA", "b-RGA")) == got  # no NaN chosen: no warning


def test_gradient_accumulation_matches_the_full_batch() -> None:
    """Issue 10 item 4: 4 micro-batches of loss/4 per SGD step give the full batch's G_b and balance
    terms with accumulation=4; left unspecified, the monitor warns instead of reporting 1/16 silently."""
    torch.manual_seed(0)
    init = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(3, 64, 5, dtype=torch.float64), torch.randn(3, 64, 3, dtype=torch.float64)

    def run(k: int, accumulation: int | None) -> tuple[canonreg.CRHReport, list[str]]:
        m = copy.deepcopy(init)
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        monitor = CRHMonitor(m, preprocess="centered", accumulation=accumulation)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with monitor:
                for step in range(3):
                    opt.zero_grad()
                    for xb, yb in zip(x[step].chunk(k), y[step].chunk(k)):
                        ((m(xb) - yb).square().mean() / k).backward()
                    opt.step()
            report = monitor.compute(lr=0.05, weight_decay=1e-3, batch_size=64, exponents=False)
        return report, [str(w.message) for w in caught if "accumulation" in str(w.message)]

    full, full_warn = run(1, None)
    acc, acc_warn = run(4, 4)
    silent, silent_warn = run(4, None)
    assert full_warn == [] and acc_warn == []
    assert len(silent_warn) == 1 and "pass accumulation=k" in silent_warn[0]
    for layer in ("0", "2"):
        assert_close(acc.matrices(layer)["G_b"], full.matrices(layer)["G_b"])
        assert_close(acc.matrices(layer)["G_a"], full.matrices(layer)["G_a"])
        for term in ("noise", "drift", "decay"):
            assert getattr(acc.balance[layer], term) == pytest.approx(getattr(full.balance[layer], term), rel=1e-10)
        assert acc.alignment[layer] == pytest.approx(full.alignment[layer], abs=1e-10)
        # what the unspecified run measured: 1/16 of G (hence the warning)
        assert_close(silent.matrices(layer)["G_b"] * 16, full.matrices(layer)["G_b"])


def test_measurement_loop_without_zero_grad_does_not_warn() -> None:
    """Backward passes over batches that never zero .grad and never step: plain batch means, no warning."""
    m = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with CRHMonitor(m) as monitor:
            for _ in range(3):
                m(torch.randn(8, 5)).square().mean().backward()
        monitor.compute(exponents=False)


def test_zeroed_gradients_between_steps_do_not_warn() -> None:
    m = _mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    for set_to_none in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with CRHMonitor(m) as monitor:
                for _ in range(3):
                    opt.zero_grad(set_to_none=set_to_none)
                    m(torch.randn(8, 5)).square().mean().backward()
                    opt.step()
            monitor.compute(exponents=False)


# ============================================================================= 4. functional numerics
def test_functional_second_moment_large_offset() -> None:
    x = 1000 + torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
    assert_close(cf.second_moment(x, "centered").double(), dense_cov(x), rtol=0, atol=1e-5)


def test_functional_normalize_tiny_and_huge_rows() -> None:
    for scale in (1e-30, 1e30):
        x = torch.tensor([[3.0, 4.0], [0.0, 0.0]]) * scale
        assert_close(cf.preprocess_rows(x, "normalized"), torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


def test_functional_nonfinite_inputs_give_nan_not_torch_errors() -> None:
    bad = torch.eye(3, dtype=torch.float64)
    bad[0, 1] = bad[1, 0] = float("nan")
    assert math.isnan(float(cf.participation_ratio(bad)))
    assert math.isnan(float(cf.entropy_rank(bad)))
    assert math.isnan(float(cf.alignment(bad, torch.eye(3))))
    fit = cf.power_law_fit(bad, torch.eye(3) + torch.diag(torch.arange(3.0)))
    assert math.isnan(fit.exponent) and fit.n_points == 0


def test_functional_participation_ratio_of_roundoff_matrix_is_at_least_one() -> None:
    """The old (Tr H)²/‖H‖_F² went below 1 for a matrix of round-off (e.g. 1e-8 noise around 0)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64) * 1e-8
    noise = 0.5 * (a + a.T)
    assert (torch.diagonal(noise).sum() ** 2 / (noise * noise).sum()) < 1  # the old formula
    assert 1.0 <= float(cf.participation_ratio(noise)) <= 6


def test_report_json_file_round_trip_and_errors(tmp_path: Path) -> None:
    report = _report()
    path = tmp_path / "r.json"
    text = report.to_json(path)
    assert json.loads(path.read_text()) == json.loads(text) == report.to_dict()
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary left behind
    with pytest.raises(FileNotFoundError, match="directory of `path`"):
        report.to_json(tmp_path / "missing" / "r.json")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        report.to_json(tmp_path)


# ============================================================================= 5. properties
@HYPO
@given(offset=st.floats(0.0, 3e4), spread=st.sampled_from([1e-2, 1.0, 30.0]), seed=st.integers(0, 50))
def test_property_large_offsets_centered(offset: float, spread: float, seed: int) -> None:
    """float32 inputs offset + spread·N(0, 1) over 20 steps: H_a = Cov of the actual float32 rows."""
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Linear(3, 2))
    xs = [offset + spread * torch.randn(8, 3, generator=g) for _ in range(20)]
    report = monitor_run(m, xs, sq_loss, preprocess="centered")
    want = dense_cov(torch.cat(xs))
    # float32 products of (x − c)/s: relative error ~1e-6 of the spread², plus the data's own
    # quantisation ulp(offset) (already in `want`)
    tol = 1e-5 * spread**2 + 1e-6 * float(want.abs().max())
    assert_close(report.matrices("0")["H_a"], want, rtol=0, atol=tol)


@HYPO
@given(sizes=st.lists(st.integers(1, 3), min_size=1, max_size=5), mode=st.sampled_from(["raw", "centered", "normalized"]))
def test_property_tiny_batches_match_the_per_sample_reference(sizes: list[int], mode: str) -> None:
    case = make_case("mlp")
    g = torch.Generator().manual_seed(sum(sizes))
    batches = [(torch.randn(s, 5, dtype=torch.float64, generator=g), torch.randint(0, 3, (s,), generator=g)) for s in sizes]
    report = run_monitor(case, batches, preprocess=mode).compute(exponents=False)
    refs = reference_rows(case, batches)
    for layer in case.layers:
        ref = refs[layer]
        got = report.matrices(layer)
        assert report.samples[layer] == sum(sizes)
        assert_close(got["H_a"], ref_moment(ref.ha, mode))
        assert_close(got["G_b"], ref_moment(ref.gb, mode))
        assert_close(got["H_b"], ref_moment(ref.hb, mode))
        for mat, r in report.effective_rank[layer].items():
            pr = r["participation"]
            assert math.isnan(pr) or 1.0 <= pr <= got[mat].shape[0]


@HYPO
@given(exp=st.integers(-30, 30), mode=st.sampled_from(["raw", "centered", "normalized"]))
def test_property_extreme_scales_are_equivariant(exp: int, mode: str) -> None:
    """Inputs × 10^k (float32, linear loss): H_a scales by 10^2k (1 when normalised), G_b and α do not move."""
    torch.manual_seed(11)
    m = nn.Sequential(nn.Linear(4, 3, bias=False))
    z, target = torch.randn(12, 4), torch.randn(12, 3)
    s = 10.0**exp
    base = monitor_run(m, [z], linear_loss(target), preprocess=mode)
    scaled = monitor_run(m, [z * s], linear_loss(target), preprocess=mode)
    factor = 1.0 if mode == "normalized" else s * s
    assert_close(scaled.matrices("0")["H_a"] / factor, base.matrices("0")["H_a"], rtol=1e-5, atol=0)
    assert_close(scaled.matrices("0")["G_b"], base.matrices("0")["G_b"], rtol=1e-5, atol=1e-12)
    for rel in canonreg.RELATIONS:
        assert scaled.alignment["0"][rel] == pytest.approx(base.alignment["0"][rel], abs=1e-5)


@HYPO
@given(
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
    offset=st.sampled_from([0.0, 10.0, 200.0]),
    mode=st.sampled_from(["centered", "normalized"]),
)
def test_property_mixed_dtypes_match_the_rows_they_saw(dtype: torch.dtype, offset: float, mode: str) -> None:
    """Whatever the model dtype, H_a and G_b are the moments of the rows the layer actually saw."""
    torch.manual_seed(12)
    m = nn.Sequential(nn.Linear(4, 3)).to(dtype)
    xs = [(offset + torch.randn(16, 4)).to(dtype) for _ in range(3)]
    loss = lambda o: o.float().square().mean()  # noqa: E731
    report = monitor_run(m, xs, loss, preprocess=mode)
    rows = capture_rows(m[0], m, xs, loss)
    want_h, want_g = ref_moment(rows["ha"], mode), ref_moment(rows["gb"], mode)
    # float32 per-step products (the rows are exact in float32 for every dtype here)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert_close(report.matrices("0")["H_a"], want_h, rtol=tol, atol=tol * float(want_h.abs().max()))
    assert_close(report.matrices("0")["G_b"], want_g, rtol=tol, atol=tol * float(want_g.abs().max()))


@HYPO
@given(d=st.integers(1, 6), rank=st.integers(1, 6), noise=st.sampled_from([0.0, 1e-12, 1e-6]), seed=st.integers(0, 100))
def test_property_participation_ratio_in_one_to_rank(d: int, rank: int, noise: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, min(rank, d), generator=g, dtype=torch.float64)
    e = torch.randn(d, d, generator=g, dtype=torch.float64) * noise
    h = x @ x.T + 0.5 * (e + e.T)
    pr = float(cf.participation_ratio(h))
    assert 1.0 <= pr <= d
    lam = torch.linalg.eigvalsh(h).clamp_min(0)
    assert pr == pytest.approx(float(lam.sum() ** 2 / (lam * lam).sum()), rel=1e-9)


# ============================================================================= 6. faults and distribution
def test_keyboard_interrupt_inside_with_detaches_and_the_monitor_stays_usable() -> None:
    m = _mlp()
    monitor = CRHMonitor(m)
    with pytest.raises(KeyboardInterrupt), monitor:
        m(torch.randn(4, 5)).square().mean().backward()
        raise KeyboardInterrupt
    assert not monitor.attached and no_hooks(m)
    x = torch.randn(6, 5)
    with monitor:
        m.zero_grad()
        m(x).square().mean().backward()
    assert monitor.compute(exponents=False).samples == {"0": 10, "2": 10}


def test_two_simulated_ranks_recentre_on_the_global_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    """The distributed reduction (two ranks as threads, a barrier all-reduce): ranks whose data sit at
    different large offsets give the covariance of all rows, on both ranks, without cancellation."""
    torch.manual_seed(13)
    init = nn.Sequential(nn.Linear(4, 3))
    data = [[1000 + torch.randn(16, 4) for _ in range(3)], [1000.5 + torch.randn(16, 4) for _ in range(3)]]

    def rank_main(rank: int) -> canonreg.CRHReport:
        m = copy.deepcopy(init)
        monitor = CRHMonitor(m, preprocess="centered")
        with monitor:
            for x in data[rank]:
                m.zero_grad()
                m(x).square().mean().backward()
        return monitor.compute(exponents=False)

    reports, calls = two_simulated_ranks(monkeypatch, rank_main)
    assert calls == 2  # the small mean reduction, then the main one
    want = dense_cov(torch.cat([*data[0], *data[1]]))
    for rank in (0, 1):
        report = reports[rank]
        assert isinstance(report, canonreg.CRHReport)
        assert report.samples["0"] == 96
        assert_close(report.matrices("0")["H_a"], want, rtol=0, atol=1e-5)
    r0, r1 = reports[0], reports[1]
    assert isinstance(r0, canonreg.CRHReport) and isinstance(r1, canonreg.CRHReport)
    assert torch.equal(r0.matrices("0")["G_b"], r1.matrices("0")["G_b"])


def test_renamed_arguments_maps_old_name_with_a_warning_and_refuses_both() -> None:
    from canonreg.errors import renamed_arguments

    @renamed_arguments(mode="preprocess")
    def f(x: int, *, preprocess: str = "raw") -> str:
        return f"{x}:{preprocess}"

    with pytest.warns(FutureWarning, match="`mode` is renamed `preprocess`"):
        assert f(1, mode="centered") == "1:centered"
    assert f(2) == "2:raw"
    with pytest.raises(TypeError, match="both `mode` and its new name `preprocess`"):
        f(1, mode="a", preprocess="b")


@pytest.mark.parametrize("owner", ["monitor", "loss weight 0"])
def test_spectral_norm_layer_trains_bit_identically_with_an_observer(owner: str) -> None:
    """A parametrized weight is recomputed at every read, and ``spectral_norm`` runs a power-iteration step per
    read in training mode: canonreg reads it with the parametrizations in eval mode (the value the forward pass
    used, no buffer touched), so a monitor, or a loss of weight 0, leaves training bit-identical (``_u``/``_v``
    drifted by ~2e-3 in 5 steps)."""
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    base = nn.Sequential(spectral_norm(nn.Linear(5, 8)), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))

    def train(observe: bool) -> dict[str, Tensor]:
        m = copy.deepcopy(base)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        monitor = CRHMonitor(m, preprocess="normalized", identities=False) if observe and owner == "monitor" else None
        align = canonreg.AlignmentLoss(m, relations="all", weight=0.0) if observe and owner != "monitor" else None
        if monitor is not None:
            monitor.attach()
        for _ in range(5):
            task = torch.nn.functional.cross_entropy(m(x), y)
            loss = task + align(task) if align is not None else task
            opt.zero_grad()
            loss.backward()
            opt.step()
        if monitor is not None:
            assert monitor.compute(exponents=False).layers == ["0", "2"]
        return m.state_dict()

    plain, observed = train(False), train(True)
    for k, v in plain.items():
        assert torch.equal(v, observed[k]), k


@pytest.mark.parametrize("preprocess", ["centered", "normalized"])
@pytest.mark.parametrize("c", [0.5, 0.3])
def test_identical_inputs_have_no_covariance_even_when_their_mean_does_not_round(preprocess: str, c: float, route: str) -> None:
    """40 identical input rows per step over 20 steps (two folds): ``Cov(h_a) = 0``, so α with ``H_a`` and its ranks
    are undefined, with a reason. With ``c = 0.3`` the merges about shifts that are not exactly the mean left a
    covariance of ~1e-31 that scored finite α (0.08) and a participation ratio of 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12))
    monitor = CRHMonitor(model, preprocess=preprocess)
    with monitor:
        for _ in range(20):
            x = c * torch.arange(1.0, 17.0).expand(40, 16)
            (model(x) * torch.randn(40, 12)).sum().backward()
    report = monitor.compute()
    assert float(report.matrices("0")["H_a"].abs().max()) == 0.0
    for rel in cf.RELATIONS:
        if "H_a" in cf.RELATION_PAIRS[rel]:
            assert math.isnan(report.alignment["0"][rel]) and "H_a" in report.nan_reasons["0"][rel]
    assert math.isnan(report.effective_rank["0"]["H_a"]["participation"])
    assert not math.isnan(report.alignment["0"]["b-GWA"])  # G_b and Z_b: defined


def test_seeds_beyond_what_a_generator_takes_are_refused_by_name() -> None:
    """``2**64`` passed the checks and failed in ``torch.Generator.manual_seed`` ("Overflow when unpacking long long")."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"`seed` to be an int in \[0, 2\*\*64\)"):
        CRHMonitor(model, seed=2**70)
    with pytest.raises(ValueError, match=r"`seed` to be an int in \[0, 2\*\*64\)"):
        canonreg.NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1), model, seed=2**64)
    monitor = CRHMonitor(model, seed=2**64 - 1)
    with monitor:
        model(torch.randn(8, 3)).square().mean().backward()
    with pytest.raises(ValueError, match=r"`bootstrap_seed` \(formerly `seed`\) to be an int in \[0, 2\*\*64\)"):
        monitor.compute(exponents=True, n_bootstrap=5, bootstrap_seed=2**64)


@pytest.mark.parametrize("preprocess", ["raw", "centered", "normalized"])
@pytest.mark.parametrize("bad_call", [0, 16])
def test_deferred_checks_when_a_window_opens_with_a_bad_call(preprocess: str, bad_call: int, route: str) -> None:
    """``defer_checks=True``, ``nonfinite="skip"``: a non-finite call that opens a window (the first, or the 17th)
    gave the window a neutral shift and scale, and the later float32 rows of 1000 + 0.01·N(0, 1) then lost their
    spread (H_a off by 3e3 relative). Now equal to immediate checks: the bad call adds nothing, the next one opens."""
    xs = [1000 + 0.01 * torch.randn(8, 4, generator=torch.Generator().manual_seed(i)) for i in range(24)]
    xs[bad_call] = xs[bad_call].clone()
    xs[bad_call][0, 0] = float("nan")
    reports = []
    for defer in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3))
        monitor = CRHMonitor(model, preprocess=preprocess, defer_checks=defer, nonfinite="skip")
        with monitor:
            for x in xs:
                model(x).square().mean().backward()
        reports.append(monitor.compute(exponents=False))
    assert reports[0].skipped["0"] == reports[1].skipped["0"] == 1
    assert reports[0].samples == reports[1].samples
    for k, v in reports[0].matrices("0").items():
        assert_close(reports[1].matrices("0")[k], v, rtol=1e-9, atol=1e-12 * float(v.abs().max()))


class _Dense(nn.Module):
    """``y = x @ w`` with ``w`` stored ``(d_a, d_b)``."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(a, b) / a**0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.w


class _DenseTap(canonreg.taps.LinearTap):
    def __init__(self, transposed: bool) -> None:
        self.transposed = transposed

    def weight(self, module: nn.Module) -> Tensor:
        return module.w.T if self.transposed else module.w  # type: ignore[return-value,union-attr]

    def bias(self, module: nn.Module) -> Tensor | None:
        return None


def test_a_tap_whose_weight_is_not_d_b_by_d_a_is_refused_naming_the_layer() -> None:
    """A user tap returning ``Wᵀ`` gave a bare shape error inside a backward hook (or at compute()); now the first
    call names the layer and the expected shape. The right tap measures."""
    torch.manual_seed(0)
    model = nn.Sequential(_Dense(5, 7), nn.Tanh(), _Dense(7, 2))
    with pytest.raises(CanonRegError, match=r"Layer '0' \(_Dense\): its tap's weight has shape \(5, 7\).*\(7, 5\)"):
        with CRHMonitor(model, taps={_Dense: _DenseTap(transposed=False)}):
            model(torch.randn(8, 5)).sum().backward()
    with CRHMonitor(model, taps={_Dense: _DenseTap(transposed=True)}) as monitor:
        model(torch.randn(8, 5)).sum().backward()
    assert monitor.compute(exponents=False).layers == ["0", "2"]
    with pytest.raises(TypeError, match="`tap` to be a LayerTap instance"):
        canonreg.taps.register_tap(_Dense, _DenseTap)  # type: ignore[arg-type]
    # the capture engine checks it, so the loss and the wrapper refuse it the same way
    wrong = {_Dense: _DenseTap(transposed=False)}
    align = canonreg.AlignmentLoss(model, relations=("f-RWA",), taps=wrong)
    with pytest.raises(CanonRegError, match=r"Layer '0' \(_Dense\): its tap's weight has shape \(5, 7\)"):
        model(torch.randn(8, 5))
    align.detach()
    opt = canonreg.NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1), model, noise=0.5, taps=wrong)
    with pytest.raises(CanonRegError, match=r"Layer '0' \(_Dense\): its tap's weight has shape \(5, 7\)"):
        model(torch.randn(8, 5))
    opt.detach()


def test_every_k_warns_when_the_model_it_counts_is_never_called() -> None:
    """``every=5`` counts calls of the model it was given; a loop that calls its submodules collected every call."""
    torch.manual_seed(0)
    outer = nn.Module()
    outer.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    monitor = CRHMonitor(outer, every=5)
    with monitor:
        for _ in range(10):
            outer.net(torch.randn(8, 4)).square().mean().backward()
    with pytest.warns(RuntimeWarning, match=r"every=5.*never called"):
        monitor.compute(exponents=False)
    assert CRHMonitor(nn.Linear(3, 3), every=np.int64(2)).every == 2  # numpy integers are integers
