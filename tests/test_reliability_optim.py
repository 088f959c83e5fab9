"""Reliability catalogue for canonreg.NoiseCalibrated: bad arguments, lifecycle misuse, numerical
faults and damaged or mismatched state dicts (issue 10, items 2, 3, 4, 8). Each case asserts the
documented outcome: a clear error naming the problem, or a result checked against a reference."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from canonreg.errors import CanonRegError
from canonreg.optim import NoiseCalibrated

pytestmark = pytest.mark.usefixtures("single_thread")


def _mlp(width: int = 8, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 3))


def _data(batch: int = 16, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, generator=g), torch.randint(0, 3, (batch,), generator=g)


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


# ------------------------------------------------------------------ arguments: (build, exception, message)

Case = Callable[[], object]


def _sgd(model: nn.Module, **kw: object) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1, **kw)  # type: ignore[arg-type]


def _double_decay_via_group() -> object:
    model = _mlp()
    opt = NoiseCalibrated(torch.optim.SGD(list(model[0].parameters()), lr=0.1), model, weight_decay=0.01, layers=["0"])
    opt.add_param_group({"params": list(model[2].parameters()), "weight_decay": 0.1})
    return opt


ARGUMENT_CASES: dict[str, tuple[Case, type[Exception], str]] = {
    "optimizer class": (lambda: NoiseCalibrated(torch.optim.SGD, _mlp()), TypeError, "optimizer instance"),  # type: ignore[arg-type]
    "not an optimizer": (lambda: NoiseCalibrated(object(), _mlp()), TypeError, "torch.optim.Optimizer"),  # type: ignore[arg-type]
    "LBFGS": (lambda: NoiseCalibrated(torch.optim.LBFGS(_mlp().parameters()), None), TypeError, "LBFGS"),
    "nested wrapper": (
        lambda: NoiseCalibrated(NoiseCalibrated(_sgd(m := _mlp()), None), m),  # noqa: F841
        TypeError, "wrap the base once",
    ),
    "noise without model": (lambda: NoiseCalibrated(_sgd(_mlp()), None, noise=1.0), ValueError, "`model`"),
    # item 2: the base decays and the wrapper decays the same weights
    "double decay SGD": (
        lambda: NoiseCalibrated(_sgd(m := _mlp(), weight_decay=0.1), m, weight_decay=0.01),
        ValueError, r"param_groups\[0\]\['weight_decay'\] to be 0 .* but got 0.1",
    ),
    "double decay AdamW default": (
        lambda: NoiseCalibrated(torch.optim.AdamW((m := _mlp()).parameters(), lr=0.1), m, weight_decay=0.01),
        ValueError, r"AdamW's default is 0.01",
    ),
    "double decay via add_param_group": (_double_decay_via_group, ValueError, r"param_groups\[1\]\['weight_decay'\]"),
    "negative ramp_steps": (lambda: NoiseCalibrated(_sgd(m := _mlp()), m, ramp_steps=-1), ValueError, "`ramp_steps`"),
    "float ramp_steps": (lambda: NoiseCalibrated(_sgd(m := _mlp()), m, ramp_steps=2.5), ValueError, "`ramp_steps`"),  # type: ignore[arg-type]
    "nan weight_decay": (lambda: NoiseCalibrated(_sgd(m := _mlp()), m, weight_decay=math.nan), ValueError, "`weight_decay`"),
    "inf noise": (lambda: NoiseCalibrated(_sgd(m := _mlp()), m, noise=math.inf), ValueError, "`noise`"),
    "bool sketch": (lambda: NoiseCalibrated(_sgd(m := _mlp()), m, sketch=True), ValueError, "`sketch`"),  # type: ignore[arg-type]
    "layers decay rule without model": (lambda: NoiseCalibrated(_sgd(_mlp()), None, decay="layers"), ValueError, "`decay`='layers'"),
    "decay rule of wrong type": (lambda: NoiseCalibrated(_sgd(m := _mlp()), m, decay=3), TypeError, "`decay`"),  # type: ignore[arg-type]
    "model parameters not in optimizer": (
        lambda: NoiseCalibrated(torch.optim.SGD(_mlp().parameters(), lr=0.1), _mlp(seed=1)),
        ValueError, "to be in `optimizer`",
    ),
}


@pytest.mark.parametrize("name", sorted(ARGUMENT_CASES))
def test_bad_arguments(name: str) -> None:
    build, exc, match = ARGUMENT_CASES[name]
    with pytest.raises(exc, match=match):
        build()


def test_double_decay_refused_group_is_not_added() -> None:
    model = _mlp()
    opt = NoiseCalibrated(torch.optim.SGD(list(model[0].parameters()), lr=0.1), model, weight_decay=0.01, layers=["0"])
    with pytest.raises(ValueError):
        opt.add_param_group({"params": list(model[2].parameters()), "weight_decay": 0.1})
    assert len(opt.param_groups) == 1


def test_base_decay_alone_decays_once() -> None:
    # the explicit alternative policy: keep AdamW's decay and give the wrapper none -> W ← (1 − lr λ) W once
    model = _mlp()
    w0 = model[0].weight.detach().clone()
    opt = NoiseCalibrated(torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01), model, weight_decay=0.0)
    model(torch.zeros(2, 4)).sum().backward()
    for p in model.parameters():
        p.grad.zero_()  # Adam's update of a zero gradient is zero: only the decay acts
    opt.step()
    torch.testing.assert_close(model[0].weight, w0 * (1 - 0.1 * 0.01), rtol=0, atol=1e-7)


def test_group_hyperparameter_damaged_later() -> None:
    model = _mlp()
    opt = NoiseCalibrated(_sgd(model), model, weight_decay=0.01)
    opt.param_groups[0]["nc_noise"] = "loud"
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['nc_noise'\].*'loud'"):
        opt.step()
    opt.param_groups[0]["nc_noise"] = 0.0
    opt.param_groups[0]["weight_decay"] = 0.1  # e.g. a scheduler that touches the base's decay
    with pytest.raises(ValueError, match="decay twice"):
        opt.step()


# ------------------------------------------------------------------ lifecycle


def test_second_wrapper_on_one_model() -> None:
    model = _mlp()
    first = NoiseCalibrated(_sgd(model), model, noise=0.5)  # kept alive: a dropped wrapper releases the model
    with pytest.raises(CanonRegError, match="already attached"):
        NoiseCalibrated(_sgd(model), model)
    first.detach()
    NoiseCalibrated(_sgd(model), model)  # detaching released the claim


def test_noise_step_after_detach() -> None:
    model = _mlp()
    opt = NoiseCalibrated(_sgd(model), model, noise=0.5)
    opt.detach()
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(CanonRegError, match="captured no forward/backward"):
        opt.step()


def test_attach_without_model() -> None:
    opt = NoiseCalibrated(_sgd(_mlp()), None, weight_decay=0.01)
    with pytest.raises(CanonRegError, match="no model to attach"):
        opt.attach()


# ------------------------------------------------------------------ numerics


def _sketch_of(opt: NoiseCalibrated, batch: int) -> set[int]:
    """The sketch subset the wrapper's next forward will draw (replays its generator; see ``_draw``)."""
    g = torch.Generator()
    g.set_state(opt._gen.get_state())
    torch.randint(0, 2, (batch,), generator=g)
    return set(torch.randperm(batch, generator=g)[: opt._config.sketch].tolist())


@pytest.mark.parametrize("noise", [0.5, 0.0])
def test_nonfinite_input_outside_the_sketch_is_caught(noise: float) -> None:
    # item 3: one inf input in a batch of 64 whose sample the sketch (4 rows) does not pick
    model = _mlp()
    opt = NoiseCalibrated(_sgd(model), model, noise=noise, sketch=4, weight_decay=0.01)
    x, y = _data(64)
    missed = next(i for i in range(64) if i not in _sketch_of(opt, 64))
    x[missed, 0] = math.inf
    before = copy.deepcopy(model.state_dict())
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(CanonRegError, match=r"Non-finite gradient in layer\(s\) '0'"):
        opt.step()
    for k, v in model.state_dict().items():  # raised before anything changed
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("policy", ["skip", "warn"])
def test_nonfinite_gradient_skips_the_whole_step(policy: str) -> None:
    model = _mlp()
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, noise=1.0, weight_decay=0.01, nonfinite=policy)  # type: ignore[arg-type]
    x, y = _data()
    _step(model, opt, x, y)
    before = copy.deepcopy(model.state_dict())
    buf = opt.state[model[0].weight]["momentum_buffer"].clone()
    opt.zero_grad()
    (F.cross_entropy(model(x), y) * math.nan).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert (len([w for w in caught if "Non-finite gradient" in str(w.message)]) == 1) == (policy == "warn")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # no noise, no decay, no base step
    assert torch.equal(opt.state[model[0].weight]["momentum_buffer"], buf)
    assert opt.skipped_steps == 1
    _step(model, opt, x, y)  # training continues normally
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _one_hot_layer() -> tuple[nn.Linear, Tensor, Tensor]:
    """One Linear layer whose per-sample weight gradients have disjoint supports (one-hot inputs), so that
    ‖N‖² = Σ_b ‖∇L_b‖² for every draw of the signs: the noise term is deterministic."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 3).double()
    x = torch.eye(16, dtype=torch.float64) * torch.linspace(0.5, 2.0, 16, dtype=torch.float64)[:, None]
    y = torch.randn(16, 3, dtype=torch.float64)
    return layer, x, y


def test_gradient_accumulation_gives_the_full_batch_balance() -> None:
    # item 4: 4 micro-batches of loss/4 must give the full batch's balance, not 1/16 of its noise term
    def run(k: int) -> NoiseCalibrated:
        layer, x, y = _one_hot_layer()
        opt = NoiseCalibrated(torch.optim.SGD(layer.parameters(), lr=0.05), layer, weight_decay=0.1, sketch=None, ema_decay=0.0)
        opt.zero_grad()
        for xs, ys in zip(x.chunk(k), y.chunk(k)):
            (F.mse_loss(layer(xs), ys, reduction="sum") / x.shape[0]).backward()
        opt.step()
        return opt

    full, acc = run(1), run(4)
    # dense reference: per-sample gradients of the full-batch mean loss
    layer, x, y = _one_hot_layer()
    per = [torch.autograd.grad(F.mse_loss(layer(x[b : b + 1]), y[b : b + 1], reduction="sum") / 16, layer.weight)[0] for b in range(16)]
    ref_noise = 0.05**2 * sum(float(p.square().sum()) for p in per)  # η² Σ_b ‖∇L_b‖²
    for opt in (full, acc):
        assert opt.balance_state[""].unit_noise == pytest.approx(ref_noise, rel=1e-10)
        assert opt.balance_state[""].batch_size == 16
    assert acc.balance_state[""].micro_batches == 4 and full.balance_state[""].micro_batches == 1  # detected
    for k in ("decay", "drift", "noise", "signal", "noise_share"):
        assert getattr(acc.balance[""], k) == pytest.approx(getattr(full.balance[""], k), rel=1e-9), k


def test_zero_strength_with_nan_free_inputs_is_still_bit_exact() -> None:
    # the new finiteness check must not change a finite run: zero strength == the base optimizer
    ref_model, model = _mlp(), _mlp()
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model)
    for seed in range(4):
        x, y = _data(seed=seed)
        _step(ref_model, ref, x, y)
        _step(model, opt, x, y)
    for p, q in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------ state dicts


def _trained(width: int, **kw: object) -> tuple[nn.Module, NoiseCalibrated]:
    model = _mlp(width)
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, weight_decay=0.01, **kw)  # type: ignore[arg-type]
    x, y = _data()
    _step(model, opt, x, y)
    return model, opt


def test_load_state_dict_from_a_model_of_another_shape() -> None:
    # item 8: a wider model's momentum buffers must be refused at load time, naming the parameter
    _, wide = _trained(16)
    model, opt = _trained(8)
    with pytest.raises(ValueError, match=r"'momentum_buffer' of parameter '0.weight' .* \(8, 4\), but it has \(16, 4\)"):
        opt.load_state_dict(wide.state_dict())
    x, y = _data()
    _step(model, opt, x, y)  # the optimizer was left usable


def test_load_state_dict_with_other_layers() -> None:
    _, other = _trained(8)
    sd = other.state_dict()
    sd["noise_calibrated"]["balance"]["encoder.fc"] = sd["noise_calibrated"]["balance"]["0"]
    _, opt = _trained(8)
    with pytest.raises(ValueError, match="encoder.fc"):
        opt.load_state_dict(sd)


def test_load_state_dict_with_other_group_count() -> None:
    _, src = _trained(8)
    sd = src.state_dict()
    sd["param_groups"] = sd["param_groups"] * 2
    _, opt = _trained(8)
    with pytest.raises(ValueError, match="1 param groups"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("bad", [None, {"state": {}}, {"state": {}, "param_groups": [], "noise_calibrated": 3}])
def test_load_state_dict_damaged(bad: object) -> None:
    _, opt = _trained(8)
    with pytest.raises(ValueError, match="`state_dict"):
        opt.load_state_dict(bad)  # type: ignore[arg-type]


def test_load_older_checkpoint_without_new_balance_fields() -> None:
    model, src = _trained(8, noise=0.5)
    sd = src.state_dict()
    for values in sd["noise_calibrated"]["balance"].values():
        for k in ("signal", "growth", "last_weight_sq_norm", "unit_noise_fast", "micro_batches"):
            values.pop(k)
    model2 = copy.deepcopy(model)
    src.detach()
    opt = NoiseCalibrated(torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9), model2, weight_decay=0.01, noise=0.5)
    opt.load_state_dict(sd)
    st = opt.balance_state["0"]
    assert st.count == src.balance_state["0"].count and st.signal == 0.0 and math.isnan(st.last_weight_sq_norm)


def test_skipped_steps_survive_a_round_trip() -> None:
    model, opt = _trained(8, nonfinite="skip")
    x, y = _data()
    opt.zero_grad()
    (F.cross_entropy(model(x), y) * math.inf).backward()
    opt.step()
    sd = opt.state_dict()
    model2 = copy.deepcopy(model)
    opt.detach()
    opt2 = NoiseCalibrated(torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9), model2, weight_decay=0.01)
    opt2.load_state_dict(sd)
    assert opt2.skipped_steps == 1


def test_a_refused_wrap_leaves_the_base_optimizer_untouched_and_a_later_wrap_takes_its_own_values() -> None:
    """A refused construction wrote its ``nc_*`` values into the base optimizer first; the corrected wrap then
    ran with the refused one's (``setdefault``), e.g. noise 3.0 and decay 0.5 for 0.0 and 1e-4 asked."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    base = torch.optim.SGD(model[0].parameters(), lr=0.1)
    before = (dict(base.defaults), [dict(g) for g in base.param_groups])
    with pytest.raises(ValueError, match="to be in `optimizer`"):
        NoiseCalibrated(base, model, weight_decay=0.5, noise=3.0)  # layer '2' is not in the optimizer
    assert (dict(base.defaults), [dict(g) for g in base.param_groups]) == before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # no hooks left behind
    opt = NoiseCalibrated(base, model, weight_decay=1e-4, noise=0.0, layers=["0"])
    assert (opt.param_groups[0]["nc_weight_decay"], opt.param_groups[0]["nc_noise"]) == (1e-4, 0.0)
    opt.detach()
    # a later wrap of the same optimizer takes its own values; a value set on a group by hand wins
    base.add_param_group({"params": model[2].parameters(), "nc_weight_decay": 0.25})
    opt = NoiseCalibrated(base, model, weight_decay=2e-4, noise=0.5)
    assert [g["nc_weight_decay"] for g in opt.param_groups] == [2e-4, 0.25]
    assert [g["nc_noise"] for g in opt.param_groups] == [0.5, 0.5]


@pytest.mark.parametrize("base", ["RMSprop", "Adagrad", "Adamax", "RAdam", "NAdam"])
def test_optimizers_whose_geometry_the_balance_does_not_model_say_so(base: str) -> None:
    """The balance is modelled in SGD's and Adam's geometry. For other built-in preconditioned optimizers its
    terms were computed in the wrong one (RMSprop: predicted Δ‖W‖² +1.0 for +5.7 measured) or never (Adamax:
    ``noise='auto'`` silently kept σ = 0): now a warning and no balance, and ``noise='auto'`` is refused."""
    model = _mlp()
    make = getattr(torch.optim, base)
    with pytest.raises(ValueError, match=f"fixed `noise` strength with {base}"):
        NoiseCalibrated(make(model.parameters(), lr=1e-3), model, weight_decay=0.1, noise="auto")
    with pytest.warns(RuntimeWarning, match=f"{base}'s preconditioner is not modelled"):
        opt = NoiseCalibrated(make(model.parameters(), lr=1e-3), model, weight_decay=0.1, noise=0.5)
    x = torch.randn(16, 4)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert opt.balance == {}
    opt.param_groups[0]["nc_noise"] = "auto"
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['nc_noise'\] to be a fixed strength"):
        opt._check_groups()
    opt.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NoiseCalibrated(make(model.parameters(), lr=1e-3), model, weight_decay=0.1, track_balance=False).detach()


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head_a, self.head_b = nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(8, 3)

    def forward(self, x: Tensor, task: str) -> Tensor:
        h = torch.tanh(self.body(x))
        return self.head_a(h) if task == "a" else self.head_b(h)


def test_a_layer_unused_this_step_with_a_zeroed_gradient_steps_like_the_base() -> None:
    """``zero_grad(set_to_none=False)`` leaves a zero ``.grad`` on the head a multi-task step did not use: no noise
    is due there (it raised CanonRegError advising ``attach()``); a nonzero gradient without a capture still raises."""
    torch.manual_seed(0)
    model = _TwoHeads()
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1), model, noise=0.5)
    x = torch.randn(16, 4)
    for task in ("a", "b", "a"):
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(x, task), torch.randint(0, 2 if task == "a" else 3, (16,))).backward()
        opt.step()
    model.head_b.weight.grad.fill_(1.0)  # a gradient the wrapper never saw a backward pass for
    opt.zero_grad(set_to_none=False)
    model.head_b.weight.grad.fill_(1.0)
    F.cross_entropy(model(x, "a"), torch.randint(0, 2, (16,))).backward()
    with pytest.raises(CanonRegError, match="captured no forward/backward"):
        opt.step()


@pytest.mark.parametrize(
    "damage",
    [
        lambda own: own.pop("rng_state"),
        lambda own: own.__setitem__("rng_state", torch.zeros(3)),
        lambda own: own.pop("steps"),
        lambda own: own.__setitem__("steps", -1),
        lambda own: own["balance"].__setitem__("0", 1.5),
    ],
    ids=["no-rng", "bad-rng", "no-steps", "negative-steps", "bad-balance"],
)
def test_a_damaged_wrapper_entry_is_refused_before_anything_is_loaded(damage: Callable[[dict], object]) -> None:
    """The base optimizer's state was loaded first, then a bare KeyError/TypeError left it half-loaded."""
    model = _mlp()
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, weight_decay=1e-3, noise=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["lr"] = 123.0
    damage(sd["noise_calibrated"])
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"state_dict\['noise_calibrated'\]"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"] and after["noise_calibrated"]["steps"] == before["noise_calibrated"]["steps"]


def test_a_layer_unfrozen_after_wrapping_gets_noise_and_balance() -> None:
    """Gradual unfreezing: a layer frozen when the wrapper was built (its parameters in the optimizer) is inert
    while frozen and gets noise and balance once unfrozen (it was excluded for good at construction)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    model[0].requires_grad_(False)
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.01), model, noise=2.0, weight_decay=1e-2)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    w0 = model[0].weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert torch.equal(model[0].weight, w0) and model[0].weight.grad is None  # frozen: untouched
    model[0].requires_grad_(True)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        clean = model[0].weight.grad.clone()
        opt.step()
        assert not torch.equal(model[0].weight.grad, clean)  # the noise reached its gradient
    assert "0" in opt.balance and "0" not in opt.excluded
    opt.detach()
    model[0].requires_grad_(False)  # frozen and left out of the optimizer: excluded, saying why
    other = NoiseCalibrated(torch.optim.SGD(model[2].parameters(), lr=0.01), model)
    assert other.excluded == {"0": "its weight does not require grad (frozen) and is not in the optimizer"}


def test_a_grad_scaler_the_wrapper_was_not_given_is_refused_at_its_step() -> None:
    """``scaler.step(opt)`` without ``grad_scaler=scaler``: the captured gradients carry the loss scale, so the noise
    was 65536× too large, silently. Now a CanonRegError saying what to pass; a disabled scaler is harmless."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    for enabled in (True, False):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, enabled=enabled)
        opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.0), model, noise=1.0)
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        if enabled:
            with pytest.raises(CanonRegError, match=r"grad_scaler=scaler"):
                scaler.step(opt)
        else:
            scaler.step(opt)
        opt.detach()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"seed": "a"}, ValueError, "`seed`"),
        ({"seed": 1.7}, ValueError, "`seed`"),
        ({"seed": -1}, ValueError, "`seed`"),
        ({"track_balance": "no"}, TypeError, "`track_balance`"),
    ],
)
def test_seed_and_track_balance_are_checked_by_name(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    """``seed=1.7`` was truncated and ``track_balance="no"`` read as True."""
    model = _mlp()
    with pytest.raises(error, match=match):
        NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1), model, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("base", ["SGD", "Adam"])
def test_balance_of_a_maximizing_optimizer_adds_up_like_the_minimizing_one(base: str) -> None:
    """``maximize=True`` on ``−loss`` takes the same steps as minimizing ``loss``: the same drift and net Δ‖W‖²
    (the drift's sign was flipped: −3.8e-3 measured, +4.5e-3 predicted)."""
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(3))
    states = []
    for maximize in (False, True):
        model = _mlp(seed=1)
        make = getattr(torch.optim, base)
        opt = NoiseCalibrated(make(model.parameters(), lr=0.01, maximize=maximize), model, weight_decay=1e-2)
        for _ in range(3):
            opt.zero_grad()
            loss = model(x).square().mean()
            (-loss if maximize else loss).backward()
            opt.step()
        states.append(opt.balance_state["2"])
    assert states[1].drift == pytest.approx(states[0].drift, rel=1e-9)
    assert states[1].net == pytest.approx(states[0].net, rel=1e-9)


class _SharedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


def test_batch_is_counted_once_per_pass_for_a_reused_layer_or_two_backward_passes() -> None:
    """A layer called twice in one forward pass, or two backward passes through one graph, is one batch of B
    (it reported micro_batches 2 and batch_size 2B, which also halved the balance's SGD noise); two
    forward/backward passes before a step (gradient accumulation) are two."""
    torch.manual_seed(0)
    model = _SharedLayer()
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1), model, weight_decay=1e-2, ema_decay=0.0)  # last step's
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))

    def counts() -> list[tuple[float, float]]:
        return [(opt.balance_state[n].micro_batches, opt.balance_state[n].batch_size) for n in ("a", "b")]

    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert counts() == [(1.0, 16.0), (1.0, 16.0)]
    opt.zero_grad()
    out = model(x)
    F.cross_entropy(out, y).backward(retain_graph=True)
    out.square().mean().backward()
    opt.step()
    assert counts() == [(1.0, 16.0), (1.0, 16.0)]
    opt.zero_grad()
    for half in (slice(0, 8), slice(8, 16)):
        (F.cross_entropy(model(x[half]), y[half]) / 2).backward()
    opt.step()
    assert counts() == [(2.0, 16.0), (2.0, 16.0)]
