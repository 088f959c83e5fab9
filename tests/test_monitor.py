"""CRHMonitor against the independent per-sample reference (conftest), plus the conformance suite.

Models are float64 so that the monitor and the reference agree to round-off; the tolerances below
are the defaults of ``assert_close`` for float64 unless a comment says why they are looser.
"""

from __future__ import annotations

import copy
import gc
import math
import pickle
import sys
import warnings
import weakref
from functools import cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CASE_NAMES,
    Case,
    make_case,
    make_mlp,
    ref_cosine,
    ref_matrices,
    ref_moment,
    ref_pearson,
    reference_rows,
    run_monitor,
)
from torch import nn
from torch.testing import assert_close

import canonreg
from canonreg import CanonRegError, CRHMonitor
from canonreg import functional as cf

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel"),
]


@cache
def _reference(name: str, bias: bool):
    case = make_case(name, bias)
    return reference_rows(case)


# (preprocess, identities, metric): every mode, both metrics, identities on and off
CONFIGS = [
    ("raw", True, "pearson"),
    ("raw", False, "cosine"),
    ("centered", True, "cosine"),
    ("centered", False, "pearson"),
    ("normalized", True, "pearson"),
    ("normalized", True, "cosine"),
]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_reference_identities_hold(name: str, bias: bool) -> None:
    """The spec's exact identities on the reference itself: H_b = W H_a Wᵀ (+ bias terms), G_a = Wᵀ G_b W."""
    refs = _reference(name, bias)
    for ref in refs.values():
        # the reference rows satisfy h_b = W h_a + b per row (validates the explicit patch extraction)
        expected_hb = ref.ha @ ref.w.T + (ref.b if ref.b is not None else 0)
        assert_close(ref.hb, expected_hb)
        for mode in ("raw", "centered"):
            m = ref_matrices(ref, mode)
            assert_close(m["G_a"], ref.w.T @ m["G_b"] @ ref.w)
            if mode == "centered" or ref.b is None:
                assert_close(m["H_b"], ref.w @ m["H_a"] @ ref.w.T)
            else:
                mu = ref.ha.mean(0)
                wmu = ref.w @ mu
                b = ref.b
                expected = ref.w @ m["H_a"] @ ref.w.T + torch.outer(wmu, b) + torch.outer(b, wmu) + torch.outer(b, b)
                assert_close(m["H_b"], expected)


@pytest.mark.parametrize("preprocess,identities,metric", CONFIGS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_monitor_matches_reference(name: str, bias: bool, preprocess: str, identities: bool, metric: str) -> None:
    case = make_case(name, bias)
    refs = _reference(name, bias)
    lr, wd = 0.05, 1e-3
    monitor = run_monitor(case, preprocess=preprocess, identities=identities, metric=metric)
    report = monitor.compute(lr=lr, weight_decay=wd, batch_size=12, n_bootstrap=50, bootstrap_seed=3)

    assert report.layers == case.layers
    assert report.preprocess == preprocess and report.metric == metric
    assert report.derived == (preprocess != "normalized" and identities)
    gen = torch.Generator().manual_seed(3)  # build_report's bootstrap order: layers, then relations
    for layer in case.layers:
        ref = refs[layer]
        expected = ref_matrices(ref, preprocess)
        got = report.matrices(layer)
        assert set(got) == set(canonreg.functional.MATRIX_NAMES)
        for k in expected:
            assert got[k].dtype == torch.float64
            assert_close(got[k], expected[k], msg=lambda m, k=k: f"{layer} {k}: {m}")
        assert report.samples[layer] == ref.ha.shape[0]
        assert report.steps[layer] == len(case.batches)

        # alignments: the report's floats equal the functional score of the reference matrices,
        # which in turn equals an obvious numpy-free formula
        for rel, (pa, pb) in canonreg.RELATION_PAIRS.items():
            want = float(cf.alignment(expected[pa], expected[pb], metric))
            obvious = (ref_pearson if metric == "pearson" else ref_cosine)(expected[pa], expected[pb])
            assert report.alignment[layer][rel] == pytest.approx(want, abs=1e-9)
            assert want == pytest.approx(obvious, abs=1e-9)

        # PAH exponents: same fit as the functional on reference matrices (bootstrap replayed)
        for rel, (pa, pb) in canonreg.RELATION_PAIRS.items():
            fit = report.exponents[layer][rel]
            want = cf.power_law_fit(expected[pa], expected[pb], n_bootstrap=50, generator=gen)
            assert fit.n_points == want.n_points
            got_v = torch.tensor([fit.exponent, fit.intercept, fit.r2, fit.off_diagonal, fit.ci_low, fit.ci_high])
            want_v = torch.tensor([want.exponent, want.intercept, want.r2, want.off_diagonal, want.ci_low, want.ci_high])
            # eigenvectors and logs amplify the 1e-15 matrix differences a little
            assert_close(got_v, want_v, rtol=1e-6, atol=1e-8, equal_nan=True)

        # effective ranks: closed forms on the reference matrices
        for m in ("H_a", "H_b", "G_a", "G_b"):
            h = expected[m]
            pr = float(torch.trace(h) ** 2 / (h * h).sum())
            lam = np.clip(np.linalg.eigvalsh(h.numpy()), 0, None)
            p = lam / lam.sum()
            er = float(np.exp(-sum(pi * math.log(pi) for pi in p if pi > 0)))
            assert report.effective_rank[layer][m]["participation"] == pytest.approx(pr, rel=1e-9)
            # eigenvalues near zero carry ~1e-16 absolute noise into the entropy
            assert report.effective_rank[layer][m]["entropy"] == pytest.approx(er, rel=1e-7)

        # balance terms (theory §5): per-sample loops over rows
        ga_ha = sum(float(ref.ga[i] @ ref.ha[i]) for i in range(ref.ha.shape[0])) / ref.ha.shape[0]
        gn_hn = sum(float(ref.gb[i].square().sum() * ref.ha[i].square().sum()) for i in range(ref.ha.shape[0])) / ref.ha.shape[0]
        bal = report.balance[layer]
        assert bal.decay == pytest.approx(wd * (2 - lr * wd) * float(ref.w.square().sum()), rel=1e-10)
        assert bal.drift == pytest.approx(2 * (1 - lr * wd) * ga_ha, rel=1e-8, abs=1e-12)
        assert bal.noise == pytest.approx(lr / 12 * gn_hn, rel=1e-8)
        assert bal.noise_share == pytest.approx(bal.noise / bal.decay, rel=1e-12)


@pytest.mark.parametrize("name", ["mlp", "conv1d", "transformer"])
@pytest.mark.parametrize(
    "reduction,grad_scale,factor",
    [("mean", "batch", 1.0), ("sum", "none", 1.0), ("mean", "float", 1.0), ("mean", "none", None)],
    ids=["mean-batch", "sum-none", "mean-float", "mean-none"],
)
def test_grad_scale_and_loss_reduction(name: str, reduction: str, grad_scale: str, factor: float | None) -> None:
    case = make_case(name)
    refs = _reference(name, True)
    x, y = case.batches[0]
    B = x.shape[0]
    scale = float(B) if grad_scale == "float" else grad_scale
    monitor = run_monitor(case, [(x, y)], reduction=reduction, grad_scale=scale, preprocess="centered")
    report = monitor.compute()
    full = make_case(name)
    for layer in case.layers:
        ref = reference_rows(full, [(x, y)])[layer]
        expected = ref_matrices(ref, "centered")
        got = report.matrices(layer)
        # mean loss without rescaling: the hook gradients are (1/B)·dℓ_i/dh, so G shrinks by 1/B²
        f = factor if factor is not None else 1.0 / B**2
        for k in ("G_a", "G_b"):
            assert_close(got[k], f * expected[k])
        for k in ("H_a", "H_b", "Z_a", "Z_b"):
            assert_close(got[k], expected[k])
        for rel, (pa, pb) in canonreg.RELATION_PAIRS.items():
            assert report.alignment[layer][rel] == pytest.approx(float(cf.alignment(expected[pa], expected[pb])), abs=1e-9)
    assert refs  # the cached full reference exists for this case too


def test_transformer_attention_is_measured_as_q_k_v_out_and_out_proj_alone_is_refused() -> None:
    case = make_case("transformer")
    subs = [f"encoder.self_attn[{s}]" for s in ("q", "k", "v", "out")]
    monitor = CRHMonitor(case.model)
    assert [n for n in monitor.layers if n.startswith("encoder.self_attn")] == subs
    assert "encoder.self_attn.out_proj" not in monitor.excluded  # measured as encoder.self_attn[out]
    monitor = CRHMonitor(case.model, layers=nn.Linear)  # the attention module itself not selected
    assert "functionally" in monitor.excluded["encoder.self_attn.out_proj"]
    assert "'encoder.self_attn[out]'" in monitor.excluded["encoder.self_attn.out_proj"]

    report = run_monitor(case, layers=nn.Linear).compute(exponents=False)
    assert "excluded 'encoder.self_attn.out_proj'" in str(report)
    with pytest.raises(CanonRegError, match=r"out_proj.*functionally.*'encoder\.self_attn\[out\]'"):
        CRHMonitor(case.model, layers=["encoder.linear1", "encoder.self_attn.out_proj"])
    # a predicate that picks it ends in the clear error, never an empty measurement
    bad = run_monitor(case, layers=lambda n, m: n.endswith("out_proj"))
    with pytest.raises(CanonRegError, match="never fire"):
        bad.compute()
    report = run_monitor(case, layers=["encoder.self_attn"]).compute(exponents=False)
    assert report.layers == subs and all(report.samples[s] == 7 * 5 for s in subs)  # 7 sequences of 5 tokens

@pytest.mark.parametrize("preprocess,identities", [("raw", True), ("centered", False), ("normalized", True)])
@pytest.mark.parametrize("name", ["mlp", "conv1d", "transformer"])
def test_blocked_symmetric_gram_path(monkeypatch, name: str, preprocess: str, identities: bool) -> None:
    """Force the block-recursive upper-triangular Gram on tiny layers (it normally starts above 256 columns)."""
    import canonreg.moments as moments

    monkeypatch.setattr(moments, "_SYRK_BLOCK", 2)
    case = make_case(name)
    refs = _reference(name, True)
    report = run_monitor(case, preprocess=preprocess, identities=identities).compute(exponents=False)
    for layer in case.layers:
        expected = ref_matrices(refs[layer], preprocess)
        for k, v in report.matrices(layer).items():
            assert_close(v, expected[k], msg=lambda m, k=k: f"{layer} {k}: {m}")


@pytest.mark.parametrize("defer", [False, True])
@pytest.mark.parametrize("preprocess,identities", [("raw", True), ("centered", False), ("normalized", True)])
@pytest.mark.parametrize("name", ["mlp", "conv1d", "transformer"])
def test_accelerator_route_on_the_cpu(monkeypatch, name: str, preprocess: str, identities: bool, defer: bool) -> None:
    """The route a GPU takes (``moments._CPU_ROUTE`` empty: one matmul per Gram, float64 norms with no host
    read, folds in panels of up to ``_FOLD_PANEL_BYTES``), run on the CPU with blocks of 2 columns, fold
    panels of 3 rows and a fold after every call: the same six matrices as the dense reference."""
    import canonreg.moments as moments

    monkeypatch.setattr(moments, "_CPU_ROUTE", ())
    monkeypatch.setattr(moments, "_SYRK_BLOCK", 2)
    monkeypatch.setattr(moments, "_SYRK_PANEL", 3)
    monkeypatch.setattr(moments, "_FOLD_PANEL_BYTES", 8 * 3 * 4)  # 3 rows of 4 float64 columns at most
    monkeypatch.setattr(moments, "_FOLD_EVERY", 1)
    case = make_case(name)
    refs = _reference(name, True)
    report = run_monitor(case, preprocess=preprocess, identities=identities, defer_checks=defer).compute(exponents=False)
    for layer in case.layers:
        expected = ref_matrices(refs[layer], preprocess)
        for k, v in report.matrices(layer).items():
            assert_close(v, expected[k], msg=lambda m, k=k: f"{layer} {k}: {m}")


def test_wide_layer_beyond_block_size() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 270), nn.Tanh(), nn.Linear(270, 3)).double()
    x = torch.randn(7, 300, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    case = Case("wide", model, [(x, y)], ["0", "2"])
    refs = reference_rows(case)
    for preprocess in ("raw", "normalized"):
        report = run_monitor(case, preprocess=preprocess).compute(exponents=False)
        for layer in case.layers:
            expected = ref_matrices(refs[layer], preprocess)
            for k, v in report.matrices(layer).items():
                assert_close(v, expected[k], msg=lambda m, k=k: f"{preprocess} {layer} {k}: {m}")


@pytest.mark.parametrize("preprocess", ["raw", "centered", "normalized"])
def test_small_batch_wide_layers_keep_rows_until_backward(preprocess: str) -> None:
    """n ≤ d: the monitor holds rows and takes the Gram at commit time; numbers must not change."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(inplace=True), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    batches = [(torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))) for _ in range(2)]
    case = Case("narrow-batch", model, batches, ["0", "2", "4"])
    refs = reference_rows(case)
    report = run_monitor(case, preprocess=preprocess, identities=False).compute(exponents=False)
    for layer in case.layers:
        expected = ref_matrices(refs[layer], preprocess)
        for k, v in report.matrices(layer).items():
            assert_close(v, expected[k], msg=lambda m, k=k: f"{layer} {k}: {m}")


def test_input_modified_in_place_before_backward_is_an_error() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    model = nn.Sequential(lin)
    x = torch.randn(5, 4, requires_grad=True)
    monitor = CRHMonitor(model, preprocess="raw")
    with monitor:
        h = torch.tanh(x)
        out = model(h)
        h.add_(1.0)  # h_a changes after the layer used it
        with pytest.raises((CanonRegError, RuntimeError), match="in.?place"):
            out.sum().backward()


def test_benchmark_naive_reference_agrees_with_monitor(monkeypatch) -> None:
    """The benchmark's naive variant (torch.func + dense outer products) computes the same matrices."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "monitor_overhead.py"
    spec = importlib.util.spec_from_file_location("_bench_monitor_overhead", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses resolve their module by name
    spec.loader.exec_module(bench)
    torch.manual_seed(0)
    for model, x in ((bench.make_mlp(12, 8), torch.randn(6, 12)), (bench.make_cnn(), torch.randn(2, 3, 6, 6))):
        model = model.double()
        x = x.double()
        y = torch.randint(0, 10, (x.shape[0],))
        for mode in ("centered", "normalized"):
            monitor = CRHMonitor(model, preprocess=mode)
            with monitor:
                F.cross_entropy(model(x), y).backward()
            report = monitor.compute(exponents=False)
            naive = bench.naive_matrices(model, x, y, mode)
            assert sorted(naive) == sorted(int(n) for n in report.layers)
            for i, mats in naive.items():
                for k, v in mats.items():
                    assert_close(report.matrices(str(i))[k], v)


# ----------------------------------------------------------------------------- conformance
@pytest.mark.parametrize("preprocess", ["raw", "centered", "normalized"])
@pytest.mark.parametrize("name", ["mlp", "conv1d"])
def test_several_batches_equal_one_concatenated_batch(name: str, preprocess: str) -> None:
    case = make_case(name)
    x = torch.cat([b[0] for b in case.batches])
    y = torch.cat([b[1] for b in case.batches])
    split = [(x[:3], y[:3]), (x[3:10], y[3:10]), (x[10:], y[10:])]
    a = run_monitor(case, split, preprocess=preprocess).compute(n_bootstrap=20)
    b = run_monitor(case, [(x, y)], preprocess=preprocess).compute(n_bootstrap=20)
    for layer in case.layers:
        ma, mb = a.matrices(layer), b.matrices(layer)
        for k in ma:
            assert_close(ma[k], mb[k])
        assert a.samples[layer] == b.samples[layer]
        assert a.steps[layer] == 3 and b.steps[layer] == 1
        for rel in canonreg.RELATIONS:
            assert a.alignment[layer][rel] == pytest.approx(b.alignment[layer][rel], abs=1e-10)


def _hook_dicts(model: nn.Module) -> list[dict]:
    names = [
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
        "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
        "_state_dict_hooks", "_load_state_dict_pre_hooks",
    ]
    return [dict(getattr(m, a, {})) for m in model.modules() for a in names]


@pytest.mark.parametrize("preprocess", ["raw", "normalized"])
def test_detach_leaves_model_exactly_as_before(preprocess: str) -> None:
    case = make_case("conv1d")
    model = case.model
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_hooks = _hook_dicts(model)
    before_pickle = pickle.dumps(model)
    monitor = CRHMonitor(model, preprocess=preprocess)
    with monitor:
        assert monitor.attached
        assert any(d for d in _hook_dicts(model))
        x, y = case.batches[0]
        case.loss(model(x), y).backward()
    assert not monitor.attached
    assert _hook_dicts(model) == before_hooks
    assert all(not d for d in _hook_dicts(model))
    after = model.state_dict()
    assert list(after) == list(before_state)
    for k, v in after.items():
        assert torch.equal(v, before_state[k]), k
    assert pickle.dumps(model) == before_pickle
    restored = pickle.loads(pickle.dumps(model))
    for k, v in restored.state_dict().items():
        assert torch.equal(v, after[k])
    clone = copy.deepcopy(model)
    for k, v in clone.state_dict().items():
        assert torch.equal(v, after[k])
    assert all(not d for d in _hook_dicts(clone))
    # the monitor keeps its measurement after detaching
    assert monitor.compute(exponents=False).samples["c1"] > 0


def test_deepcopy_while_attached_does_not_feed_the_monitor() -> None:
    case = make_case("mlp")
    monitor = CRHMonitor(case.model).attach()
    try:
        clone = copy.deepcopy(case.model)
        x, y = case.batches[0]
        case.loss(clone(x), y).backward()
        with pytest.raises(CanonRegError, match="before any backward"):
            monitor.compute()
        case.loss(case.model(x), y).backward()
        assert monitor.compute(exponents=False).samples["0"] == x.shape[0]
    finally:
        monitor.detach()


def test_no_autograd_graph_retained() -> None:
    case = make_case("mlp")
    x, y = case.batches[0]
    monitor = CRHMonitor(case.model, preprocess="normalized")
    with monitor:
        out = case.model(x)
        loss = case.loss(out, y)
        loss.backward()
        ref_out, ref_loss = weakref.ref(out), weakref.ref(loss)
        del out, loss
        gc.collect()
        assert ref_out() is None and ref_loss() is None
        # a forward pass without backward: its graph dies with the user's references too
        out = case.model(x)
        ref_out = weakref.ref(out)
        del out
        gc.collect()
        assert ref_out() is None
    for state in monitor._state.values():
        stored = [*state.scalars.values()]
        for m in state.moments.values():
            stored += [getattr(m, k) for k in m.__slots__ if isinstance(getattr(m, k), torch.Tensor)]
        assert stored
        for t in stored:
            assert not t.requires_grad and t.grad_fn is None
    report = monitor.compute(exponents=False)
    assert report.samples["0"] == x.shape[0]  # the forward-only pass was not counted
    for layer in report.layers:
        for t in report.matrices(layer).values():
            assert not t.requires_grad


def test_reset_restores_fresh_state() -> None:
    case = make_case("mlp")
    monitor = CRHMonitor(case.model, preprocess="centered")
    x1, y1 = case.batches[0]
    x2, y2 = case.batches[1]
    with monitor:
        case.loss(case.model(x1), y1).backward()
        monitor.reset()
        with pytest.raises(CanonRegError, match="before any backward"):
            monitor.compute()
        case.loss(case.model(x2), y2).backward()
    got = monitor.compute(n_bootstrap=10)
    fresh = run_monitor(case, [(x2, y2)], preprocess="centered").compute(n_bootstrap=10)
    for layer in case.layers:
        for k, v in got.matrices(layer).items():
            assert_close(v, fresh.matrices(layer)[k])
        assert got.samples[layer] == fresh.samples[layer] == x2.shape[0]


def test_every_k_collects_calls_1_k_plus_1() -> None:
    case = make_case("mlp")
    torch.manual_seed(1)
    batches = [(torch.randn(4 + i, 5, dtype=torch.float64), torch.randint(0, 3, (4 + i,))) for i in range(7)]
    monitor = CRHMonitor(case.model, every=3, preprocess="normalized")
    with monitor:
        for i, (x, y) in enumerate(batches):
            case.loss(case.model(x), y).backward()
            with torch.no_grad():  # evaluation passes do not advance the count
                case.model(x)
    got = monitor.compute(n_bootstrap=10)
    want = run_monitor(case, [batches[0], batches[3], batches[6]], preprocess="normalized").compute(n_bootstrap=10)
    for layer in case.layers:
        assert got.samples[layer] == 4 + 7 + 10
        assert got.steps[layer] == 3
        for k, v in got.matrices(layer).items():
            assert_close(v, want.matrices(layer)[k])


@pytest.mark.parametrize("preprocess,bias", [("raw", False), ("centered", True)])
@pytest.mark.parametrize("name", ["mlp", "conv1d"])
def test_max_rows_subsamples_consistently(name: str, preprocess: str, bias: bool) -> None:
    case = make_case(name, bias)
    per_call = [run_monitor(case, [batch], preprocess="raw").compute(exponents=False).samples for batch in case.batches]
    report = run_monitor(case, max_rows=3, preprocess=preprocess, identities=False).compute(exponents=False)
    for layer in case.layers:
        assert report.samples[layer] == sum(min(3, rows[layer]) for rows in per_call)
        assert all(rows[layer] > 3 for rows in per_call)  # the cap really bites
        m = report.matrices(layer)
        w = case.model.get_submodule(layer).weight.detach()
        w = w.reshape(w.shape[0], -1)
        # identities=False accumulates H_b and G_a directly: they satisfy the exact identities
        # (raw without bias, or centred) only if the same rows were kept for h_a, h_b and the gradients
        assert_close(m["H_b"], w @ m["H_a"] @ w.T)
        assert_close(m["G_a"], w.T @ m["G_b"] @ w)


def test_max_rows_at_least_rows_equals_full() -> None:
    case = make_case("conv1d")
    full = run_monitor(case, preprocess="normalized").compute(n_bootstrap=10)
    big = run_monitor(case, preprocess="normalized", max_rows=10_000).compute(n_bootstrap=10)
    for layer in case.layers:
        for k, v in full.matrices(layer).items():
            assert_close(big.matrices(layer)[k], v)
        assert big.samples[layer] == full.samples[layer]


def test_max_rows_subsample_is_an_actual_subset() -> None:
    """With one call and max_rows = n − 1, H_a must be the moment of n − 1 of the n rows."""
    case = make_case("mlp")
    x, y = case.batches[0]
    report = run_monitor(case, [(x, y)], max_rows=x.shape[0] - 1, preprocess="raw").compute(exponents=False)
    got = report.matrices("0")["H_a"]
    candidates = [ref_moment(torch.cat([x[:i], x[i + 1 :]]), "raw") for i in range(x.shape[0])]
    assert any(torch.allclose(got, c, rtol=1e-10, atol=1e-12) for c in candidates)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_and_bfloat16_models_are_upcast(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = make_mlp().to(dtype)
    x = torch.randn(16, 5).to(dtype)
    y = torch.randint(0, 3, (16,))
    monitor = CRHMonitor(model, preprocess="raw")
    with monitor:
        F.cross_entropy(model(x).float(), y).backward()
    report = monitor.compute()
    assert all(p.dtype == dtype for p in model.parameters())
    m = report.matrices("0")
    for v in m.values():
        assert v.dtype == torch.float64 and bool(torch.isfinite(v).all())
    # the input moment is exact up to float32 summation of the (exactly representable) low-precision inputs
    assert_close(m["H_a"], ref_moment(x.double(), "raw"), rtol=1e-5, atol=1e-6)
    for layer in report.layers:
        assert all(math.isfinite(a) for a in report.alignment[layer].values())


def test_cpu_autocast_bfloat16() -> None:
    torch.manual_seed(0)
    model = make_mlp()
    x = torch.randn(16, 5)
    y = torch.randint(0, 3, (16,))
    for preprocess in ("centered", "normalized"):
        monitor = CRHMonitor(model, preprocess=preprocess)
        with monitor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            F.cross_entropy(out.float(), y).backward()
        report = monitor.compute(exponents=False)
        assert report.samples == {"0": 16, "2": 16, "4": 16}
        for layer in report.layers:
            assert all(bool(torch.isfinite(v).all()) for v in report.matrices(layer).values())
        # the hook sees the module's own (float32) input; autocast casts inside F.linear.
        # Tolerance: float32 per-step Grams.
        assert_close(report.matrices("0")["H_a"], ref_moment(x.double(), preprocess), rtol=1e-5, atol=1e-6)


def test_reset_restarts_row_subsampling() -> None:
    case = make_case("mlp")
    x, y = case.batches[0]
    monitor = CRHMonitor(case.model, max_rows=4, preprocess="raw")
    with monitor:
        case.loss(case.model(x), y).backward()
        first = monitor.compute(exponents=False).matrices("0")["H_a"]
        monitor.reset()
        case.loss(case.model(x), y).backward()
    assert_close(monitor.compute(exponents=False).matrices("0")["H_a"], first)


def test_hooks_removed_after_exception_inside_with() -> None:
    case = make_case("mlp")
    monitor = CRHMonitor(case.model)
    with pytest.raises(ZeroDivisionError):
        with monitor:
            x, y = case.batches[0]
            case.loss(case.model(x), y).backward()
            1 / 0
    assert not monitor.attached
    assert all(not d for d in _hook_dicts(case.model))
    other = CRHMonitor(case.model).attach()  # the claim was released too
    other.detach()


def test_second_monitor_on_same_model_raises() -> None:
    case = make_case("mlp")
    first = CRHMonitor(case.model).attach()
    try:
        with pytest.raises(CanonRegError, match="already attached"):
            CRHMonitor(case.model).attach()
        with pytest.raises(CanonRegError, match="already attached"):  # a submodule shares layers
            CRHMonitor(case.model[2]).attach()
        first.attach()  # idempotent for the owner
        assert first.attached
    finally:
        first.detach()
    second = CRHMonitor(case.model).attach()
    assert second.detach() is second  # detach() returns the monitor, like attach()
    assert second.detach() is second  # idempotent
    assert not second.attached


def test_compute_before_any_backward_raises() -> None:
    case = make_case("mlp")
    monitor = CRHMonitor(case.model)
    with pytest.raises(CanonRegError, match="before any backward"):
        monitor.compute()
    with monitor:
        case.model(case.batches[0][0])  # forward only
    with pytest.raises(CanonRegError, match="no backward pass reached"):
        monitor.compute()


def test_layer_that_never_runs_is_reported() -> None:
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)})
    monitor = CRHMonitor(model, layers=["used", "unused"])
    with monitor:
        model["used"](torch.randn(4, 3)).sum().backward()
    with pytest.raises(CanonRegError, match=r"'unused'.*never ran"):
        monitor.compute()
    monitor.on_missing = "warn"
    with pytest.warns(RuntimeWarning, match="unused"):
        report = monitor.compute(exponents=False)
    assert report.layers == ["used"] and "unused" in report.missing


def test_frozen_layer_reason() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    monitor = CRHMonitor(model, on_missing="skip")
    with monitor:
        model(torch.randn(5, 3)).sum().backward()
    report = monitor.compute(exponents=False)
    assert report.layers == ["1"]
    assert "never required grad" in report.missing["0"]


def test_nonfinite_activations_error_names_layer_and_call() -> None:
    case = make_case("mlp")
    x, y = case.batches[0]
    bad = x.clone()
    bad[2, 1] = float("nan")
    monitor = CRHMonitor(case.model)
    with monitor:
        case.loss(case.model(x), y).backward()
        with pytest.raises(CanonRegError, match=r"Non-finite activations.*layer '0' at forward call 2"):
            case.model(bad)


@pytest.mark.parametrize("policy", ["skip", "warn"])
def test_nonfinite_policy_skips_the_call(policy: str) -> None:
    case = make_case("mlp")
    (x1, y1), (x2, y2) = case.batches
    bad = x1.clone()
    bad[0, 0] = float("inf")
    monitor = CRHMonitor(case.model, nonfinite=policy, preprocess="centered")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with monitor:
            case.loss(case.model(x1), y1).backward()
            out = case.model(bad)
            case.loss(out.nan_to_num(), y1).backward()
            case.loss(case.model(x2), y2).backward()
    got = monitor.compute(n_bootstrap=10)
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning) and "Non-finite" in str(w.message)]
    assert (len(runtime) > 0) == (policy == "warn")
    # layer "0" dropped the bad call at its input; layers after it saw non-finite activations too
    assert got.skipped["0"] == 1
    want = run_monitor(case, [(x1, y1), (x2, y2)], preprocess="centered").compute(n_bootstrap=10)
    for k, v in got.matrices("0").items():
        assert_close(v, want.matrices("0")[k])
    assert "skipped 1 non-finite" in str(got)


def test_nonfinite_gradients_error_names_layer() -> None:
    case = make_case("mlp")
    x, y = case.batches[0]
    monitor = CRHMonitor(case.model)
    with monitor:
        out = case.model(x)
        with pytest.raises(CanonRegError, match=r"Non-finite gradients \(g_b\) in layer '4'"):
            (out * float("nan")).sum().backward()
    skip = CRHMonitor(case.model, nonfinite="skip")
    with skip:
        out = case.model(x)
        (out * float("nan")).sum().backward()
        case.loss(case.model(x), y).backward()
    report = skip.compute(exponents=False)
    assert report.skipped == {"0": 1, "2": 1, "4": 1}
    assert report.samples["0"] == x.shape[0]


@pytest.mark.parametrize("preprocess", ["raw", "centered", "normalized"])
@pytest.mark.parametrize("name", ["mlp", "conv1d", "transformer"])
def test_deferred_checks_give_the_same_report(name: str, preprocess: str) -> None:
    """defer_checks=True (the accelerator path: masks, no host sync) measures exactly the same numbers."""
    case = make_case(name)
    want = run_monitor(case, preprocess=preprocess, defer_checks=False).compute(n_bootstrap=0)
    got = run_monitor(case, preprocess=preprocess, defer_checks=True).compute(n_bootstrap=0)
    assert got.samples == want.samples and got.steps == want.steps and got.skipped == want.skipped
    for layer in case.layers:
        for k, v in want.matrices(layer).items():
            assert torch.equal(got.matrices(layer)[k], v), (layer, k)


@pytest.mark.parametrize("preprocess", ["centered", "normalized"])
@pytest.mark.parametrize("policy", ["skip", "warn"])
def test_deferred_checks_drop_non_finite_calls_like_immediate_checks(policy: str, preprocess: str) -> None:
    case = make_case("mlp")
    (x1, y1), (x2, y2) = case.batches
    bad = x1.clone()
    bad[0, 0] = float("inf")

    def run(defer: bool) -> tuple[object, list[str]]:
        monitor = CRHMonitor(case.model, nonfinite=policy, preprocess=preprocess, defer_checks=defer)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with monitor:
                case.loss(case.model(x1), y1).backward()
                case.loss(case.model(bad).nan_to_num(), y1).backward()
                case.loss(case.model(x2), y2).backward()
            report = monitor.compute(n_bootstrap=0)
        return report, sorted(str(w.message) for w in caught if "Non-finite" in str(w.message))

    want, want_warn = run(False)
    got, got_warn = run(True)
    assert got.skipped == want.skipped and got.skipped["0"] == 1
    assert got.samples == want.samples and got.steps == want.steps
    assert got_warn == want_warn and (len(got_warn) > 0) == (policy == "warn")
    for layer in case.layers:
        for k, v in want.matrices(layer).items():
            torch.testing.assert_close(got.matrices(layer)[k], v, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("defer", [False, True])
def test_one_sync_per_half_still_names_the_set_that_is_not_finite(defer: bool) -> None:
    """h_a and h_b are checked together (their sums added, one read): when only h_b overflows (float32
    weights of 1e30 on inputs of 1e10) the policy names h_b, not h_a, and drops just that call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    monitor = CRHMonitor(model, preprocess="normalized", nonfinite="warn", defer_checks=defer)
    with monitor, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            model[0].weight.mul_(1e30)
        F.cross_entropy(model(x * 1e10), y).backward()
        report = monitor.compute(n_bootstrap=0)
    messages = [str(w.message) for w in caught if "Non-finite" in str(w.message)]
    layer0 = [m for m in messages if "layer '0'" in m]  # (NaN reaches layer '2' through the overflowed h_b too)
    assert len(layer0) == 1 and "activations (h_b) in layer '0' at forward call 2" in layer0[0], messages
    assert report.skipped["0"] == 1 and report.samples["0"] == 5


@pytest.mark.parametrize("defer", [False, True])
def test_float64_rows_whose_squares_overflow_are_refused_not_summed_to_inf(defer: bool) -> None:
    """float64 activations whose every row norm and every square is finite (‖x_i‖² ≈ 1e308) but whose sum of
    squares over the 5 rows (the trace of the float64 moment) is not: the policy check, on ``Σ‖x_i‖²``,
    refuses the call instead of letting an infinite moment through (a check on ``Σ‖x_i‖`` would not)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = 5.7e153 * (1.0 + 0.01 * torch.randn(5, 3, dtype=torch.float64))
    assert torch.isfinite(x.square().sum(1)).all() and not torch.isfinite(x.square().sum())
    y = torch.randint(0, 2, (5,))
    monitor = CRHMonitor(model, defer_checks=defer)
    with pytest.raises(CanonRegError, match=r"Non-finite activations \(h_a\) in layer '0'"), monitor:
        F.cross_entropy(model(x), y).backward()
        monitor.compute()


def test_deferred_error_names_layer_and_call_at_the_next_resolution() -> None:
    case = make_case("mlp")
    x, y = case.batches[0]
    bad = x.clone()
    bad[2, 1] = float("nan")
    monitor = CRHMonitor(case.model, defer_checks=True)
    with monitor:
        case.loss(case.model(x), y).backward()
        case.loss(case.model(bad), y).backward()  # no sync, no error yet
        with pytest.raises(CanonRegError, match=r"Non-finite activations \(h_a\) in layer '0' at forward call 2"):
            monitor.compute()
    # flags are read every 16 committed calls of a layer: a bad call surfaces within that many steps
    # (here first in layer '4', whose 16th commit comes first in the backward pass; its input was NaN too)
    monitor2 = CRHMonitor(case.model, defer_checks=True)
    with monitor2, pytest.raises(CanonRegError, match=r"Non-finite activations \(h_a\) in layer '4' at forward call 3"):
        for i in range(16):
            case.loss(case.model(bad if i == 2 else x), y).backward()
    with pytest.raises(TypeError, match="defer_checks"):
        CRHMonitor(case.model, defer_checks="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("preprocess", ["raw", "centered", "normalized"])
def test_all_zero_gradients_give_nan_with_reason(preprocess: str) -> None:
    case = make_case("mlp")
    x, _ = case.batches[0]
    monitor = CRHMonitor(case.model, preprocess=preprocess)
    with monitor:
        (0.0 * case.model(x)).sum().backward()
    report = monitor.compute(lr=0.1, weight_decay=1e-3, batch_size=12)
    for layer in case.layers:
        a = report.alignment[layer]
        for rel in ("f-RGA", "f-GWA", "b-RGA", "b-GWA"):
            assert math.isnan(a[rel])
            assert "G_" in report.nan_reasons[layer][rel]
            assert math.isnan(report.exponents[layer][rel].exponent)
        assert not math.isnan(a["f-RWA"]) and not math.isnan(a["b-RWA"])
        assert math.isnan(report.effective_rank[layer]["G_b"]["participation"])
        assert report.balance[layer].noise == 0.0
    assert "nan" in str(report)
    assert report.to_dict()["alignment"]["0"]["f-RGA"] is None


def test_custom_tap_for_a_custom_module_matches_linear() -> None:
    class Dense(nn.Module):
        def __init__(self, w: torch.Tensor) -> None:
            super().__init__()
            self.w = nn.Parameter(w.clone())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.w.T

    class DenseTap:
        def check(self, module, name):
            return None

        def input_rows(self, module, inputs):
            return inputs[0].reshape(-1, inputs[0].shape[-1])

        def output_rows(self, module, output):
            return output.reshape(-1, output.shape[-1])

        def weight(self, module):
            return module.w

        def bias(self, module):
            return None

    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Linear(5, 2, bias=False)).double()
    dense = nn.Sequential(Dense(lin[0].weight.detach()), nn.Tanh(), Dense(lin[2].weight.detach())).double()
    x = torch.randn(9, 4, dtype=torch.float64)
    reports = []
    for model, kw in ((lin, {}), (dense, {"taps": {Dense: DenseTap()}})):
        monitor = CRHMonitor(model, preprocess="normalized", **kw)
        with monitor:
            model(x).square().mean().backward()
        reports.append(monitor.compute(n_bootstrap=10))
    for layer in ("0", "2"):
        for k, v in reports[0].matrices(layer).items():
            assert_close(reports[1].matrices(layer)[k], v)
    with pytest.raises(CanonRegError, match="has no tap"):
        CRHMonitor(dense, layers="0")


def test_unbatched_conv_input_counts_as_one_sample() -> None:
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1)).double()
    x = torch.randn(2, 6, dtype=torch.float64)
    a = CRHMonitor(conv, preprocess="raw")
    with a:
        conv(x).square().mean().backward()
    b = CRHMonitor(conv, preprocess="raw")
    with b:
        conv(x.unsqueeze(0)).square().mean().backward()
    ra, rb = a.compute(exponents=False), b.compute(exponents=False)
    assert ra.samples["0"] == rb.samples["0"] == 6
    for k, v in ra.matrices("0").items():
        assert_close(v, rb.matrices("0")[k])


def test_input_requiring_grad_uses_same_numbers() -> None:
    """First layer with x.requires_grad: the autograd input gradient path must give the same G_a."""
    case = make_case("mlp")
    x, y = case.batches[0]
    a = run_monitor(case, [(x, y)], preprocess="normalized").compute(exponents=False)
    b = run_monitor(case, [(x.clone().requires_grad_(True), y)], preprocess="normalized").compute(exponents=False)
    for layer in case.layers:
        for k, v in a.matrices(layer).items():
            assert_close(b.matrices(layer)[k], v)


def test_retain_graph_double_backward_commits_each_call_once() -> None:
    # The rows of one forward call are samples once, however often a retained graph is traversed.
    case = make_case("mlp")
    x, y = case.batches[0]
    monitor = CRHMonitor(case.model, preprocess="raw")
    with monitor:
        loss = case.loss(case.model(x), y)
        loss.backward(retain_graph=True)
        loss.backward()
    twice = monitor.compute(exponents=False)
    once = run_monitor(case, [(x, y)], preprocess="raw").compute(exponents=False)
    for layer in case.layers:
        assert twice.samples[layer] == once.samples[layer]
        for k, v in once.matrices(layer).items():
            assert_close(twice.matrices(layer)[k], v)


def test_long_run_folds_partial_sums() -> None:
    """More calls than one float32 partial window: float32 model vs its float64 twin."""
    torch.manual_seed(0)
    m32 = make_mlp()
    m64 = copy.deepcopy(m32).double()
    xs = [torch.randn(8, 5) for _ in range(40)]
    reports = []
    for model, dtype in ((m32, torch.float32), (m64, torch.float64)):
        monitor = CRHMonitor(model, preprocess="raw")
        with monitor:
            for x in xs:
                model(x.to(dtype)).square().mean().backward()
        reports.append(monitor.compute(exponents=False))
    for k, v in reports[1].matrices("2").items():
        # float32 per-step products: agreement to float32 round-off, not float64
        assert_close(reports[0].matrices("2")[k], v, rtol=2e-5, atol=1e-6)
    assert reports[0].samples["2"] == 320


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        ({"preprocess": "whitened"}, ValueError, "`preprocess`"),
        ({"metric": "spearman"}, ValueError, "`metric`"),
        ({"every": 0}, ValueError, "`every`"),
        ({"every": True}, ValueError, "`every`"),
        ({"max_rows": 0}, ValueError, "`max_rows`"),
        ({"grad_scale": -2.0}, ValueError, "`grad_scale`"),
        ({"grad_scale": "batches"}, ValueError, "`grad_scale`"),
        ({"nonfinite": "ignore"}, ValueError, "`nonfinite`"),
        ({"on_missing": "ignore"}, ValueError, "`on_missing`"),
        ({"identities": "yes"}, TypeError, "`identities`"),
        ({"track_balance": 1}, TypeError, "`track_balance`"),
        ({"seed": -1}, ValueError, "`seed`"),
        ({"layers": nn.Conv2d}, ValueError, r"matched none.*Tappable layers: \['0', '2', '4'\]"),
        ({"layers": "nope"}, ValueError, r"'nope' does not exist.*Tappable layers"),
        ({"layers": "1"}, CanonRegError, r"'1' \(ReLU\) has no tap"),
        ({"layers": 3.5}, TypeError, "`layers`"),
        ({"taps": {"Linear": object()}}, TypeError, "`taps`"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        CRHMonitor(make_mlp(), **kwargs)


def test_bad_model_and_grouped_conv() -> None:
    with pytest.raises(TypeError, match="`model`"):
        CRHMonitor("not a model")  # type: ignore[arg-type]
    grouped = nn.Sequential(nn.Conv1d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(8, 2))
    monitor = CRHMonitor(grouped)  # layers=None: the grouped conv is excluded with the reason
    assert list(monitor.layers) == ["2"]
    assert "grouped convolution (groups=2)" in monitor.excluded["0"]
    with pytest.raises(CanonRegError, match=r"grouped convolution \(groups=2\)"):
        CRHMonitor(grouped, layers=["0", "2"])  # asked for by name: the clear error
    monitor = CRHMonitor(grouped, layers="2")
    assert list(monitor.layers) == ["2"]


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        ({"lr": 0.1}, ValueError, "given together"),
        ({"lr": -0.1, "weight_decay": 0.0, "batch_size": 4}, ValueError, "`lr`"),
        ({"lr": 0.1, "weight_decay": -1.0, "batch_size": 4}, ValueError, "`weight_decay`"),
        ({"lr": 0.1, "weight_decay": 0.0, "batch_size": 0}, ValueError, "`batch_size`"),
        ({"n_bootstrap": -1}, ValueError, "`n_bootstrap`"),
        ({"floor": 1.5}, ValueError, "`floor`"),
        ({"exponents": "yes"}, TypeError, "`exponents`"),
        ({"bootstrap_seed": 1.5}, ValueError, "`bootstrap_seed`"),
    ],
)
def test_bad_compute_arguments(kwargs: dict, exc: type, pattern: str) -> None:
    case = make_case("mlp")
    monitor = run_monitor(case)
    with pytest.raises(exc, match=pattern):
        monitor.compute(**kwargs)


def test_balance_needs_tracking() -> None:
    case = make_case("mlp")
    monitor = run_monitor(case, track_balance=False)
    with pytest.raises(CanonRegError, match="track_balance"):
        monitor.compute(lr=0.1, weight_decay=0.0, batch_size=4)
    assert monitor.compute(exponents=False).balance == {}


def test_monitor_is_not_picklable_but_report_is() -> None:
    case = make_case("mlp")
    monitor = run_monitor(case)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(monitor)
    report = monitor.compute(n_bootstrap=10)
    again = pickle.loads(pickle.dumps(report))
    assert again.alignment == report.alignment
    for k, v in report.matrices("2").items():
        assert torch.equal(again.matrices("2")[k], v)


def test_graph_traversed_twice_is_committed_once_with_the_task_gradient() -> None:
    # An exact-G regulariser differentiates the task loss with create_graph=True, then loss.backward()
    # traverses the same graph again: each sample must count once, with the task loss's gradient.
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    mon = canonreg.CRHMonitor(m, track_balance=False)
    align = canonreg.AlignmentLoss(m, relations=("b-GWA",), g_mode="exact")
    with mon:
        task = torch.nn.functional.cross_entropy(m(x), y)
        (task + align(task)).backward()
    align.detach()
    report = mon.compute(exponents=False)
    assert report.samples == {"0": 10, "2": 10, "4": 10}
    ref = canonreg.measure_crh(m, x, y)  # task gradient only, same weights
    for layer in report.layers:
        torch.testing.assert_close(report.matrices(layer)["G_b"], ref.matrices(layer)["G_b"], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("offset", [0.0, 1000.0])
@pytest.mark.parametrize("preprocess,identities", [("normalized", True), ("centered", False), ("raw", False)])
def test_narrow_layers_use_the_per_call_identity_and_match_the_reference(
    monkeypatch: pytest.MonkeyPatch, preprocess: str, identities: bool, offset: float
) -> None:
    """Issue 13: H_b of a 3 → 40 layer and G_a of a 40 → 2 layer come from A [Σzzᵀ] Aᵀ with each call's
    weights (no 40 × 40 row Gram); every matrix still equals the per-sample reference, across folds."""
    import canonreg.monitor as cm

    calls = {"n": 0}
    projected = cm._CallMoment.projected.__func__  # type: ignore[attr-defined]

    def counted(cls: type, *args: object) -> object:
        calls["n"] += 1
        return projected(cls, *args)

    monkeypatch.setattr(cm._CallMoment, "projected", classmethod(counted))
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 40), nn.Tanh(), nn.Linear(40, 2)).double()
    with torch.no_grad():
        model[0].weight.mul_(1e-3 if offset else 1.0)  # keep the Tanh out of saturation at the offset
    batches = [(offset + torch.randn(64, 3, dtype=torch.float64), torch.randint(0, 2, (64,))) for _ in range(20)]
    case = Case("narrow", model, batches, ["0", "2"])
    refs = reference_rows(case)
    report = run_monitor(case, preprocess=preprocess, identities=identities).compute(exponents=False, ranks=False)
    assert calls["n"] == 2 * len(batches)  # H_b of layer 0 and G_a of layer 2, every call
    for layer in case.layers:
        expected = ref_matrices(refs[layer], preprocess)
        for k, v in report.matrices(layer).items():
            assert_close(v, expected[k], rtol=1e-9, atol=1e-12, msg=lambda m, k=k: f"{layer} {k}: {m}")


@pytest.mark.parametrize("accumulation", [None, 2])
def test_a_dropped_monitor_takes_its_hooks_and_claim(accumulation: int | None) -> None:
    # accumulation=None also puts hooks on the weights (the accumulation check): they must not keep it alive
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    monitor = CRHMonitor(model, accumulation=accumulation).attach()
    x = torch.randn(8, 4)
    model(x).square().mean().backward()
    ref = weakref.ref(monitor)
    del monitor
    gc.collect()
    assert ref() is None
    assert not model._forward_pre_hooks and not any(m._forward_hooks for m in model.modules())
    assert not any(p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())
    with CRHMonitor(model) as again:  # the claim went with the dropped monitor
        model(x).square().mean().backward()
    assert again.compute().samples == {"0": 8, "2": 8}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(6, 4), (2, 3, 4), (2, 3, 1, 4)])
def test_token_inputs_reuse_autograds_input_gradient_and_match_the_dense_g_a(shape: tuple[int, ...], bias: bool) -> None:
    # F.linear on (…, d) rows views a 2-D product: the monitor hooks the product's node under that view
    # (no extra dL/dh_b · W matmul) and G_a still equals the dense moment of the input gradients.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3, bias=bias)).double()
    x = torch.randn(*shape, dtype=torch.float64)
    monitor = CRHMonitor(model, preprocess="raw", grad_scale="none", identities=False)
    seen = []
    real = monitor._grad_input_node
    monitor._grad_input_node = lambda *a: seen.append(real(*a)) or seen[-1]  # type: ignore[method-assign]
    grads = {}
    h = model[2].register_full_backward_hook(lambda m, gi, go: grads.update(ga=gi[0].reshape(-1, 5)))
    with monitor:
        model(x).square().sum().backward()
    h.remove()
    assert seen[1] is not None and type(seen[1][0]).__name__ in ("AddmmBackward0", "MmBackward0")
    ga = grads["ga"]
    assert_close(monitor.compute(exponents=False, ranks=False).matrices("2")["G_a"], ga.T @ ga / ga.shape[0], rtol=1e-12, atol=1e-14)


def test_inactive_steps_are_not_looked_at_and_the_missing_reason_names_every() -> None:
    # every=3 over 7 passes: the engine delivers passes 0, 3, 6 only (inactive ones are skipped before any work)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    monitor = CRHMonitor(model, every=3)
    with monitor:
        for _ in range(7):
            model(torch.randn(6, 4)).square().mean().backward()
    stats = monitor._capture.stats["0"]
    assert (stats.fired, stats.delivered) == (3, 3) and monitor.compute(exponents=False).steps == {"0": 3, "2": 3}
    monitor.reset()
    assert not monitor._capture.paused

    class Sometimes(nn.Module):  # its second layer runs only on odd passes, which every=2 never collects
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.n = nn.Linear(3, 3), nn.Linear(3, 3), 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.n += 1
            return self.b(self.a(x)) if self.n % 2 == 0 else self.a(x)

    net = Sometimes()
    monitor = CRHMonitor(net, every=2, on_missing="error")
    with monitor:
        for _ in range(4):
            net(torch.randn(5, 3)).sum().backward()
    with pytest.raises(CanonRegError, match=r"'b'.*never ran in a grad-enabled forward pass on a collected step \(every=2\)"):
        monitor.compute()
