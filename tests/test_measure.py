"""measure_crh: the post-training, task-gradient-only measurement every reported α comes from."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import canonreg
from canonreg import CanonRegError, measure_crh
from canonreg.functional import alignment, moment_from_sums
from canonreg.measure import min_alignment


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3))


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(150, 6, generator=g), torch.randint(0, 3, (150,), generator=g)


def per_sample_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """Dense float64 H_a, G_b of one Linear layer, normalized protocol, one sample at a time."""
    lin = model[layer]
    rows_a, rows_g = [], []
    for i in range(len(y)):
        cache = {}
        h = lin.register_forward_hook(lambda m, inp, out: cache.update(a=inp[0], b=out))
        out = model(x[i : i + 1])
        h.remove()
        (g,) = torch.autograd.grad(F.cross_entropy(out, y[i : i + 1]), cache["b"])
        rows_a.append(cache["a"][0].detach().double())
        rows_g.append(-g[0].double())
    out = {}
    for key, rows in (("H_a", rows_a), ("G_b", rows_g)):
        r = torch.stack(rows)
        r = r / r.norm(dim=1, keepdim=True)
        out[key] = moment_from_sums(r.T @ r, r.sum(0), float(len(r)), centered=True)
    return out


def test_matches_per_sample_reference(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = mlp()
    x, y = data
    report = measure_crh(model, x, y, batch_size=37)
    ref = per_sample_reference(model, x, y, 2)
    mats = report.matrices("2")
    torch.testing.assert_close(mats["H_a"], ref["H_a"], rtol=1e-5, atol=1e-7)  # float32 forward
    torch.testing.assert_close(mats["G_b"], ref["G_b"], rtol=1e-4, atol=1e-7)
    w = model[2].weight.detach().double()
    assert report.alignment["2"]["f-RWA"] == pytest.approx(float(alignment(ref["H_a"], w.T @ w, "pearson")), abs=1e-5)


def test_independent_of_batch_size_and_of_the_input_form(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = mlp()
    x, y = data
    a = measure_crh(model, x, y, batch_size=150)
    b = measure_crh(model, x, y, batch_size=16)
    c = measure_crh(model, [(x[:70], y[:70]), (x[70:], y[70:])])
    # 1e-5: the float32 forward passes themselves differ in the last bits between batch shapes.
    for layer in a.layers:
        for rel in canonreg.RELATIONS:
            assert b.alignment[layer][rel] == pytest.approx(a.alignment[layer][rel], abs=1e-5)
            assert c.alignment[layer][rel] == pytest.approx(a.alignment[layer][rel], abs=1e-5)


def test_leaves_grads_mode_and_buffers_untouched(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.5), nn.Linear(12, 3))
    x, y = data
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    measure_crh(model, x, y)
    assert model.training
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())  # BN running stats not updated
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # no hooks left


def test_refuses_an_attached_regulariser_and_works_after_detach(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = mlp()
    x, y = data
    align = canonreg.AlignmentLoss(model, relations=("f-RWA",))
    with pytest.raises(CanonRegError, match="AlignmentLoss is attached"):
        measure_crh(model, x, y)
    align.detach()
    opt = canonreg.NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1), model, weight_decay=1e-3)
    with pytest.raises(CanonRegError, match="NoiseCalibrated is attached"):
        measure_crh(model, x, y)
    opt.detach()
    assert math.isfinite(measure_crh(model, x, y).mean_alignment())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(y=None), TypeError, "`y`"),
        (dict(y=torch.zeros(3, dtype=torch.long)), ValueError, "same first"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(loss_fn=lambda out, y: out.sum(1)), ValueError, "scalar"),
        (dict(loss_fn=lambda out, y: out.sum() * float("nan")), CanonRegError, "not finite"),
        (dict(loss_fn="ce"), TypeError, "loss_fn"),
        (dict(preprocess="whitened"), ValueError, "preprocess"),
    ],
)
def test_bad_arguments_name_the_argument(data: tuple[torch.Tensor, torch.Tensor], kwargs: dict, error: type, match: str) -> None:
    x, y = data
    kw = {"y": y, **kwargs}
    with pytest.raises(error, match=match):
        measure_crh(mlp(), x, **kw)


def test_empty_data_and_frozen_model_are_errors(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = data
    with pytest.raises(CanonRegError, match="empty"):
        measure_crh(mlp(), x[:0], y[:0])
    frozen = mlp().requires_grad_(False)
    with pytest.raises(CanonRegError, match="requires grad"):
        measure_crh(frozen, x, y)


def test_min_alignment(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    report = measure_crh(mlp(), *data)
    every = [report.alignment[n][r] for n in ["2"] for r in canonreg.RELATIONS]
    assert min_alignment(report, ["2"]) == min(every)
    assert min_alignment(report) == min(report.alignment[n][r] for n in report.layers for r in canonreg.RELATIONS)
    with pytest.raises(ValueError, match="layers"):
        min_alignment(report, ["nope"])


def test_seed_renamed_bootstrap_seed(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    # `seed` → `bootstrap_seed` (the vocabulary of CRHMonitor.compute): the old name gives the same report with a FutureWarning.
    x, y = data
    model = mlp()
    kw = dict(exponents=True, n_bootstrap=20)
    new = measure_crh(model, x, y, bootstrap_seed=3, **kw)
    with pytest.warns(FutureWarning, match="`seed` is renamed `bootstrap_seed`"):
        old = measure_crh(model, x, y, seed=3, **kw)  # type: ignore[call-arg]
    other = measure_crh(model, x, y, bootstrap_seed=4, **kw)

    def intervals(report: canonreg.CRHReport) -> list[str]:  # repr: NaN intervals (too few points) compare equal
        return [repr((f.ci_low, f.ci_high)) for fits in report.exponents.values() for f in fits.values()]

    assert intervals(old) == intervals(new)
    assert intervals(other) != intervals(new)  # the seed reaches the bootstrap
    with pytest.raises(TypeError, match="both `seed` and its new name `bootstrap_seed`"):
        measure_crh(model, x, y, seed=3, bootstrap_seed=3)  # type: ignore[call-arg]


@pytest.mark.parametrize("preprocess", ["raw", "centered"])
def test_ignore_index_weights_every_real_position_alike_whatever_the_batch_size(preprocess: str) -> None:
    """Sequences with 1–6 real tokens, a loss averaged over each batch's real tokens: ``G_b`` of the head is the
    second moment of every real token's own ``onehot − softmax`` (closed form), at any ``batch_size``. (Scaling each
    batch by its sequence count instead weighted batches by B / real tokens: α moved by up to 0.07.)"""
    torch.manual_seed(0)
    vocab, t, n = 7, 6, 12
    model = nn.Sequential(nn.Embedding(vocab, 8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, vocab)).double()
    x, y = torch.randint(0, vocab, (n, t)), torch.randint(0, vocab, (n, t))
    for i in range(n):
        y[i, i % t + 1 :] = -100

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.reshape(-1, vocab), target.reshape(-1), ignore_index=-100)

    reports = [
        measure_crh(model, x, y, loss_fn=loss, ignore_index=-100, preprocess=preprocess, batch_size=b, layers=["1", "3"])
        for b in (n, 5, 1)
    ]
    with torch.no_grad():
        keep = y.reshape(-1) != -100
        logits = model(x).reshape(-1, vocab)[keep]
        g = F.one_hot(y.reshape(-1)[keep], vocab).double() - logits.softmax(-1)
    want = g.T @ g / g.shape[0]
    if preprocess == "centered":
        want = want - torch.outer(g.mean(0), g.mean(0))
    for report in reports:
        torch.testing.assert_close(report.matrices("3")["G_b"], want, rtol=1e-10, atol=1e-12)
        for layer in ("1", "3"):
            for rel, a in report.alignment[layer].items():
                assert a == pytest.approx(reports[0].alignment[layer][rel], abs=1e-12)


def test_ignore_index_skips_batches_of_padding_only() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5)).double()
    x, y = torch.randint(0, 5, (4, 3)), torch.randint(0, 5, (4, 3))
    y[2:] = -100  # the second batch of 2 holds padding only

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.reshape(-1, 5), target.reshape(-1))

    both = measure_crh(model, x, y, loss_fn=loss, ignore_index=-100, batch_size=2, preprocess="centered")
    first = measure_crh(model, x[:2], y[:2], loss_fn=loss, ignore_index=-100, batch_size=2, preprocess="centered")
    torch.testing.assert_close(both.matrices("1")["G_b"], first.matrices("1")["G_b"], rtol=0, atol=0)


def test_a_frozen_first_layer_is_left_out_with_a_warning_or_refused_when_named() -> None:
    """No gradient reaches a frozen first layer (its input needs none): by default it is left out with a warning
    naming it and why; named in ``layers`` it is an error whose advice (``on_missing``) measure_crh accepts."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    model[0].requires_grad_(False)
    x, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    with pytest.warns(RuntimeWarning, match="'0': the layer's output never required grad"):
        report = measure_crh(model, x, y)
    assert report.layers == ["2"]
    with pytest.raises(CanonRegError, match="on_missing='skip'"):
        measure_crh(model, x, y, layers=["0", "2"])
    assert measure_crh(model, x, y, layers=["0", "2"], on_missing="skip").layers == ["2"]
    with pytest.raises(ValueError, match="on_missing"):
        measure_crh(model, x, y, on_missing="drop")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"relations": ["f-XYZ"]}, ValueError, "`relations` from"),
        ({"relations": "f-RGA"}, TypeError, "`relations` to be a list"),
        ({"layers": "0"}, TypeError, "`layers` to be a list"),
        ({"layers": 0}, TypeError, "`layers` to be a list"),
        ({"layers": ["9"]}, ValueError, "`layers` to name layers"),
    ],
)
def test_min_alignment_names_a_bad_argument(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    report = measure_crh(model, torch.randn(30, 4), torch.randint(0, 3, (30,)))
    with pytest.raises(error, match=match):
        min_alignment(report, **kwargs)  # type: ignore[arg-type]
