"""Tests of canonreg.optim.NoiseCalibrated against independent references (dense per-sample loops)."""

from __future__ import annotations

import copy
import dataclasses
import gc
import io
import math
import pickle
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import conv1d_and_linear_twins
from torch import Tensor, nn

import canonreg
from canonreg.errors import CanonRegError
from canonreg.functional import balance_terms
from canonreg.optim import (
    LayerBalanceState,
    NoiseCalibrated,
    WrapperConfig,
    adam_denominator,
    balance_from_state,
    controller_step,
    effective_lr,
    noise_share,
    per_sample_noise,
    ramped_target,
    update_balance_state,
)

OptFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]

BASES: dict[str, OptFactory] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}

# The same bases without their own decay, for a wrapper that decays (a base that decays too is refused).
UNDECAYED: dict[str, OptFactory] = {
    **BASES,
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0),
}


# tiny tensors: intra-op threads only add contention on a 2-core CI machine (fixture in conftest.py)
pytestmark = pytest.mark.usefixtures("single_thread")


def _mlp(seed: int = 0, d_in: int = 6, width: int = 16, d_out: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, d_out))


def _batches(n: int, batch: int = 32, d_in: int = 6, d_out: int = 3, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, d_in, generator=g), torch.randint(0, d_out, (batch,), generator=g)) for _ in range(n)]


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[Tensor, Tensor]]) -> None:
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"parameter {name} differs"


# ------------------------------------------------------------------ zero strength is the base optimizer


@pytest.mark.parametrize("kind", sorted(BASES))
@pytest.mark.parametrize("use_closure", [False, True])
def test_zero_strength_is_bit_exact(kind: str, use_closure: bool) -> None:
    ref_model = _mlp()
    model = copy.deepcopy(ref_model)
    ref = BASES[kind](list(ref_model.parameters()))
    opt = NoiseCalibrated(BASES[kind](list(model.parameters())), model, weight_decay=0.0, noise=0.0)
    for x, y in _batches(6):
        for m, o in ((ref_model, ref), (model, opt)):
            if use_closure:
                def closure(m: nn.Module = m, o: torch.optim.Optimizer = o, x: Tensor = x, y: Tensor = y) -> Tensor:
                    o.zero_grad()
                    loss = F.cross_entropy(m(x), y)
                    loss.backward()
                    return loss

                o.step(closure)
            else:
                o.zero_grad()
                F.cross_entropy(m(x), y).backward()
                o.step()
    _assert_same_params(ref_model, model)
    for p, q in zip(ref_model.parameters(), model.parameters()):
        for k, v in ref.state[p].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt.state[q][k]))
    assert set(opt.balance) == {"0", "2", "4"}  # measured, yet nothing changed


# ------------------------------------------------------------------ checkpoint round trip


@pytest.mark.parametrize("kind,noise", [("sgd_momentum", "auto"), ("adam", "auto"), ("sgd", 2.0)])
def test_resume_from_state_dict_is_exact(kind: str, noise: float | str) -> None:
    batches = _batches(8, batch=48)
    kw = dict(weight_decay=1e-2, noise=noise, sketch=16, target_share=1e6, max_noise=1e5)  # a target that makes the controller act
    full_model = _mlp()
    full = NoiseCalibrated(UNDECAYED[kind](list(full_model.parameters())), full_model, seed=3, **kw)  # type: ignore[arg-type]
    _train(full_model, full, batches)

    model = _mlp()
    opt = NoiseCalibrated(UNDECAYED[kind](list(model.parameters())), model, seed=3, **kw)  # type: ignore[arg-type]
    _train(model, opt, batches[:4])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    del model, opt
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)

    model2 = _mlp(seed=99)  # different init and a different seed: everything must come from the checkpoint
    opt2 = NoiseCalibrated(UNDECAYED[kind](list(model2.parameters())), model2, seed=12345, **kw)  # type: ignore[arg-type]
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups is opt2.optimizer.param_groups and opt2.state is opt2.optimizer.state
    _train(model2, opt2, batches[4:])
    _assert_same_params(full_model, model2)
    assert opt2.balance_state == full.balance_state
    if noise == "auto":
        assert any(s > 0 for s in full.noise_scale.values())  # the controller did act


# ------------------------------------------------------------------ Optimizer protocol


def test_scheduler_and_param_groups_are_shared() -> None:
    model = _mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = NoiseCalibrated(base, model, weight_decay=1e-3, noise=0.5)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups and opt.state is base.state and opt.defaults is base.defaults
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(model, opt, _batches(1))
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.05)
    assert {"nc_weight_decay", "nc_noise", "nc_target_share"} <= set(base.param_groups[0])

    # loading a checkpoint replaces the group dicts inside the base optimizer: still shared, scheduler still acts
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is base.param_groups
    _train(model, opt, _batches(1))
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.025)

    extra = nn.Parameter(torch.randn(4, 4))
    opt.add_param_group({"params": [extra], "nc_weight_decay": 0.5})
    assert base.param_groups[-1]["params"][0] is extra
    assert base.param_groups[-1]["nc_weight_decay"] == 0.5 and base.param_groups[-1]["nc_noise"] == 0.5
    base.add_param_group({"params": [nn.Parameter(torch.randn(2, 2))]})  # directly on the base: defaults fill in
    assert base.param_groups[-1]["nc_target_share"] == opt.defaults["nc_target_share"]


def test_group_hyperparameters_per_group_and_validated() -> None:
    model = _mlp()
    base = torch.optim.SGD(
        [{"params": model[0].parameters(), "nc_weight_decay": 0.0}, {"params": list(model[2].parameters()) + list(model[4].parameters())}],
        lr=0.1,
    )
    opt = NoiseCalibrated(base, model, weight_decay=0.1)
    w0, w2 = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    x, y = _batches(1)[0]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    g0, g2 = model[0].weight.grad.clone(), model[2].weight.grad.clone()
    opt.step()
    torch.testing.assert_close(model[0].weight, w0 - 0.1 * g0, rtol=0, atol=1e-7)  # setdefault kept the group's 0
    torch.testing.assert_close(model[2].weight, w2 * (1 - 0.1 * 0.1) - 0.1 * g2, rtol=0, atol=1e-7)
    opt.param_groups[1]["nc_noise"] = -1.0
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['nc_noise'\]"):
        opt.step()


# ------------------------------------------------------------------ the noise and its covariance


def test_per_sample_noise_matches_dense_loop() -> None:
    g = torch.Generator().manual_seed(0)
    delta, h, w = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    n_w, n_b = per_sample_noise(delta, h, w)
    ref_w = sum(w[r] * torch.outer(delta[r], h[r]) for r in range(7))
    ref_b = sum(w[r] * delta[r] for r in range(7))
    torch.testing.assert_close(n_w, ref_w)
    torch.testing.assert_close(n_b, ref_b)
    assert per_sample_noise(delta, h, w, bias=False)[1] is None
    with pytest.raises(ValueError, match="same n"):
        per_sample_noise(delta, h[:6], w)


class _SeqMLP(nn.Module):
    """Linear layers applied to every position of a (B, T, d) input: per-sample ≠ per-row noise."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x))).mean(1)


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv1d(1, 2, 3, padding=1), nn.Linear(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.conv(x.unsqueeze(1))).mean(-1))


def _mean_loss(out: Tensor, y: Tensor) -> Tensor:
    """``L = (1/B) Σ_b ℓ_b`` with ``ℓ_b = ‖out_b − y_b‖²``."""
    return F.mse_loss(out, y, reduction="sum") / y.shape[0]


def _per_sample_grads(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Rows ∇L_b: sample b's term (1/B)ℓ_b of the batch-mean loss, flattened over all parameters."""
    params = list(model.parameters())
    rows = []
    for b in range(x.shape[0]):
        loss = F.mse_loss(model(x[b : b + 1]), y[b : b + 1], reduction="sum") / x.shape[0]
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def _max_z(samples: Tensor, target: Tensor) -> float:
    """Largest |z| over the upper triangle of the empirical uncentred covariance against ``target``."""
    k, d = samples.shape
    prods = samples[:, :, None] * samples[:, None, :]
    c_hat, se = prods.mean(0), prods.std(0) / math.sqrt(k)
    iu = torch.triu_indices(d, d)
    z = (c_hat - target)[iu[0], iu[1]] / se[iu[0], iu[1]].clamp_min(1e-30)
    return float(z.abs().max())


@pytest.mark.parametrize(
    "make,shape,sketch",
    [(_SeqMLP, (6, 2, 3), None), (_SeqMLP, (6, 2, 3), 2), (_ConvNet, (5, 4), 3)],
    ids=["sequence-full", "sequence-sketch", "conv-sketch"],
)
def test_noise_covariance_is_the_per_sample_gradient_second_moment(make: type[nn.Module], shape: tuple[int, ...], sketch: int | None) -> None:
    torch.manual_seed(0)
    model = make().double()
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randn(shape[0], 2, dtype=torch.float64)
    sigma, draws = 0.7, 800
    per_sample = _per_sample_grads(model, x, y)
    target = sigma**2 * per_sample.T @ per_sample  # documented Cov[ξ] = σ² Σ_b ∇L_b ∇L_bᵀ
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.0), model, noise=sigma, sketch=sketch, seed=0)
    params = list(model.parameters())
    opt.zero_grad()
    _mean_loss(model(x), y).backward()
    clean = torch.cat([p.grad.reshape(-1) for p in params]).clone()
    samples = []
    for _ in range(draws):  # lr = 0: the weights stay put, the noise is what step() left in .grad
        opt.zero_grad()
        _mean_loss(model(x), y).backward()
        opt.step()
        samples.append(torch.cat([p.grad.reshape(-1) for p in params]) - clean)
    xi = torch.stack(samples)
    d = xi.shape[1]
    isotropic_target = torch.eye(d, dtype=torch.float64) * target.trace() / d
    iso = torch.randn(draws, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * (target.trace() / d).sqrt()

    # the injected noise matches the documented covariance (every entry within 5 standard errors)...
    assert _max_z(xi, target) < 5.0
    rel = torch.linalg.matrix_norm(xi.T @ xi / draws - target) / torch.linalg.matrix_norm(target)
    assert rel < 0.2
    # ...and the same test rejects isotropic noise of the same total variance, in both directions
    assert _max_z(iso, target) > 10.0
    assert _max_z(xi, isotropic_target) > 10.0
    assert torch.linalg.matrix_norm(iso.T @ iso / draws - target) / torch.linalg.matrix_norm(target) > 0.5
    torch.testing.assert_close(xi.square().sum(1).mean(), target.trace(), rtol=0.1, atol=0)


@pytest.mark.parametrize("base", ["sgd_momentum", "adam"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_factored_noise_equals_materialised_noise(base: str, accumulate: int) -> None:
    """Wide layers keep N = Aᵀ X factored (‖N‖² from k × k Grams, sketch rows, one addmm into .grad):
    the trajectory and every balance measurement equal the materialised path's (checked by the
    covariance test above) to float64 round-off, with gradient accumulation over several backward passes too."""
    batches = [(x.double(), y) for x, y in _batches(6 * accumulate, batch=8, d_in=48)]

    def run(factored: bool) -> tuple[nn.Module, NoiseCalibrated, list[bool]]:
        model = _mlp(d_in=48, width=64).double()
        opt = NoiseCalibrated(UNDECAYED[base](list(model.parameters())), model, weight_decay=1e-2, noise=1.5, sketch=4, seed=2)
        for layer in opt._layers.values():
            layer.factored = factored
        kept = []
        for i in range(0, len(batches), accumulate):
            opt.zero_grad()
            for x, y in batches[i : i + accumulate]:
                F.cross_entropy(model(x), y).backward()
            kept.append(any(bool(layer.factors) for layer in opt._layers.values()))
            opt.step()
        return model, opt, kept

    ref_model, ref, kept_ref = run(False)
    model, opt, kept = run(True)
    assert all(kept) and not any(kept_ref)  # the two paths really differ
    for p, q in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)
    for name, st in ref.balance_state.items():
        got = opt.balance_state[name]
        for k in ("unit_noise", "unit_noise_raw", "drift", "weight_sq_norm"):
            if hasattr(st, k):
                assert getattr(got, k) == pytest.approx(getattr(st, k), rel=1e-9, abs=1e-15), (name, k)


def test_model_copies_are_not_hooked() -> None:
    batches = _batches(3)
    ref_model = _mlp()
    ref = NoiseCalibrated(torch.optim.SGD(ref_model.parameters(), lr=0.1), ref_model, noise=1.0, seed=5)
    _train(ref_model, ref, batches)

    model = _mlp()
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1), model, noise=1.0, seed=5)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # e.g. an EMA copy, a checkpoint
            F.cross_entropy(clone(x), y).backward()
        opt.step()
    _assert_same_params(ref_model, model)


# ------------------------------------------------------------------ pickling, hooks, coexistence


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_pickle_and_deepcopy_carry_the_model_and_continue_identically(how: str) -> None:
    model = _mlp()
    opt = NoiseCalibrated(torch.optim.Adam(model.parameters(), lr=1e-2), model, weight_decay=1e-2, noise="auto", seed=2)
    _train(model, opt, _batches(2))
    if how == "pickle":
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    else:
        model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.attached and opt2.model is model2
    assert all(p is q for p, q in zip(opt2.param_groups[0]["params"], model2.parameters()))
    more = _batches(3, seed=7)
    _train(model, opt, more)
    _train(model2, opt2, more)
    _assert_same_params(model, model2)
    assert opt2.balance_state == opt.balance_state


def test_hooks_are_owned_claimed_and_released() -> None:
    model = _mlp()
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1), model, noise=0.5)
    with pytest.raises(CanonRegError, match="already attached"):
        NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1), model)
    assert opt.detach() is opt
    assert opt.detach() is opt  # idempotent; returns the wrapper like attach()
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in model.modules())
    x, y = _batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(CanonRegError, match="captured no forward/backward"):
        opt.step()
    opt.attach().attach()
    _train(model, opt, _batches(1))
    del opt
    gc.collect()  # a dropped optimizer takes its hooks with it
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in model.modules())
    pickle.dumps(model)


def test_coexists_with_crh_monitor() -> None:
    x, y = _batches(1, batch=64)[0]

    def report(with_wrapper: bool) -> dict[str, dict[str, float]]:
        model = _mlp()
        opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1), model, noise=1.0, weight_decay=1e-3) if with_wrapper else None
        monitor = canonreg.CRHMonitor(model)
        with monitor:
            F.cross_entropy(model(x), y).backward()
        alignment = monitor.compute(exponents=False).alignment
        if opt is not None:
            opt.step()
            assert set(opt.balance) == set(alignment)
        return alignment

    assert report(True) == report(False)


# ------------------------------------------------------------------ GradScaler


def _scaled_run(scaler: torch.amp.GradScaler | None, batches: list[tuple[Tensor, Tensor]], noise: float | str) -> tuple[nn.Module, NoiseCalibrated]:
    model = _mlp()
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, weight_decay=1e-2, noise=noise, grad_scaler=scaler, seed=4)
    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return model, opt


@pytest.mark.parametrize("noise", [1.5, "auto"])
def test_grad_scaler_uses_unscaled_gradients(noise: float | str) -> None:
    batches = _batches(4)
    plain_model, plain = _scaled_run(None, batches, noise)
    scaled_model, scaled = _scaled_run(torch.amp.GradScaler("cpu", init_scale=2.0**12), batches, noise)
    # power-of-two loss scales are exact in floating point, so the trajectories agree to round-off
    for p, q in zip(plain_model.parameters(), scaled_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    for name, st in plain.balance_state.items():
        assert scaled.balance_state[name].unit_noise == pytest.approx(st.unit_noise, rel=1e-5)


def test_grad_scaler_skipped_step_injects_nothing() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model = _mlp()
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1), model, weight_decay=1e-2, noise=1.0, grad_scaler=scaler)
    x, y = _batches(1)[0]
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    before = copy.deepcopy(model.state_dict())
    state = opt.balance_state
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y) * float("inf")).backward()
    scaler.step(opt)  # inf gradients: skipped
    scaler.update()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert opt.balance_state == state
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.step(opt)  # the skipped step's non-finite captures are gone
    assert opt.balance_state["0"].count == state["0"].count + 1


def test_nonfinite_policy() -> None:
    model = _mlp()
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1), model, noise=1.0)
    x, y = _batches(1)[0]
    (F.cross_entropy(model(x), y) * float("nan")).backward()
    with pytest.raises(CanonRegError, match=r"Non-finite gradient in layer\(s\) '0', '2', '4'"):
        opt.step()
    model2 = _mlp()
    opt2 = NoiseCalibrated(torch.optim.SGD(model2.parameters(), lr=0.0), model2, noise=1.0, nonfinite="skip")
    model2(x).sum().backward()
    model2[0].weight.grad.zero_()
    opt2._layers["0"].noise_w.fill_(float("inf"))  # a non-finite sample in one layer only
    opt2.step()
    assert torch.equal(model2[0].weight.grad, torch.zeros_like(model2[0].weight))  # no noise added there


# ------------------------------------------------------------------ decay rule and balance


def test_decay_rule_and_effective_lr() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    params0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, beta, gamma = 0.1, 0.9, 0.01
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=lr, momentum=beta), model, weight_decay=gamma)
    model(torch.tensor([0, 1, 2])).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    eta_eff = lr / (1 - beta)  # momentum rescales η to η/(1−β)
    assert effective_lr(opt.param_groups[0]) == pytest.approx(eta_eff)
    for n, p in model.named_parameters():
        shrink = 1 - eta_eff * gamma if p.dim() >= 2 else 1.0  # weights and embeddings decay; biases, LayerNorm do not
        torch.testing.assert_close(p, params0[n] * shrink - lr * grads[n], rtol=0, atol=1e-7, msg=n)
    assert effective_lr({"lr": 0.1, "betas": (0.9, 0.99)}) == 0.1
    assert effective_lr({"lr": 0.1, "momentum": 0.5, "dampening": 0.5}) == pytest.approx(0.1)

    for rule, decayed in (("layers", {"2.weight"}), (lambda n, p: n in {"0.weight", "2.bias"}, {"0.weight", "2.bias"})):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(5, 4), nn.LayerNorm(4), nn.Linear(4, 3))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.0), model, weight_decay=gamma, decay=rule)
        model(torch.tensor([0, 1, 2])).square().mean().backward()
        opt.step()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed == set()  # lr = 0 switches the decay off too (η_eff γ)
        opt.param_groups[0]["lr"] = 0.1
        opt.zero_grad()
        model(torch.tensor([0, 1, 2])).square().mean().backward()
        for p in model.parameters():
            p.grad.zero_()
        opt.step()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed == decayed


def _orthogonal_case() -> tuple[nn.Linear, Tensor, Tensor]:
    """One Linear layer whose per-sample weight gradients have disjoint supports (one-hot inputs)."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    x = torch.eye(4, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)[:, None]
    y = torch.randn(4, 3, dtype=torch.float64)
    return layer, x, y


@pytest.mark.parametrize("sigma", [0.0, 2.0])
def test_balance_matches_dense_reference_sgd(sigma: float) -> None:
    layer, x, y = _orthogonal_case()
    lr, gamma = 0.05, 0.1
    # dense reference from per-sample autograd: g_b = −dℓ_b/dh_b, h_a = x
    w = layer.weight.detach().clone()
    gb = []
    for b in range(4):
        h = layer(x[b : b + 1])
        gb.append(-torch.autograd.grad(F.mse_loss(h, y[b : b + 1], reduction="sum"), h)[0][0])
    g = torch.stack(gb)
    ref = balance_terms(
        float((w**2).sum()),
        float(((g @ w) * x).sum(1).mean()),
        (1 + sigma**2) * float(((g**2).sum(1) * (x**2).sum(1)).mean()),
        lr=lr, weight_decay=gamma, batch_size=4,
    )
    opt = NoiseCalibrated(torch.optim.SGD(layer.parameters(), lr=lr), layer, weight_decay=gamma, noise=sigma)
    F.mse_loss(layer(x), y, reduction="sum").div(4).backward()
    opt.step()
    got = opt.balance[""]
    for k in ("decay", "drift", "noise", "noise_share", "lr", "weight_decay"):
        assert getattr(got, k) == pytest.approx(getattr(ref, k), rel=1e-9), k
    assert got.batch_size == 4
    assert got.noise_share == pytest.approx(noise_share(sigma, opt.balance_state[""].unit_noise, opt.balance_state[""].decay))


def test_balance_uses_adam_preconditioner() -> None:
    layer, x, y = _orthogonal_case()
    lr, gamma = 1e-2, 0.1
    opt = NoiseCalibrated(torch.optim.Adam(layer.parameters(), lr=lr), layer, weight_decay=gamma, ema_decay=0.0)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(layer(x), y, reduction="sum").div(4).backward()
        if opt.state:
            denom = adam_denominator(opt.param_groups[0], opt.state[layer.weight])
            state = opt.state[layer.weight]
            v_hat = state["exp_avg_sq"] / (1 - 0.999 ** float(state["step"]))
            torch.testing.assert_close(denom, v_hat.sqrt() + 1e-8)
            rows = adam_denominator(opt.param_groups[0], state, rows=torch.tensor([2, 0]))
            torch.testing.assert_close(rows, denom[[2, 0]])
            w = layer.weight.detach().clone()
            grad = layer.weight.grad.clone()
            # per-sample gradients: disjoint columns of the batch gradient (one-hot inputs)
            per_sample = [grad * (x[b] != 0) for b in range(4)]
        opt.step()
    st = opt.balance_state[""]
    assert st.unit_noise == pytest.approx(lr**2 * sum(float(((p / denom) ** 2).sum()) for p in per_sample), rel=1e-9)
    assert st.drift == pytest.approx(-lr * float((w * grad / denom).sum()), rel=1e-9)
    assert st.decay == pytest.approx(lr * gamma * (2 - lr * gamma) * float((w**2).sum()), rel=1e-9)
    terms = opt.balance[""]
    assert terms.noise_share == pytest.approx(st.total_noise / st.decay)
    assert terms.lr == pytest.approx(math.sqrt(st.unit_noise / st.unit_noise_raw))


# ------------------------------------------------------------------ controller


def test_controller_pure_function() -> None:
    kw = dict(gain=0.5, max_noise=10.0)
    assert controller_step(math.log(4.0), decay=2.0, unit_noise=0.5, target_share=1.0, **kw) == pytest.approx(math.log(4.0))  # (1+3)·0.5/2 = 1
    up = controller_step(0.0, decay=2.0, unit_noise=0.5, target_share=1.0, **kw)
    assert 0 < up < math.log(4.0)
    assert controller_step(math.log(4.0), decay=2.0, unit_noise=4.0, target_share=1.0, **kw) < math.log(4.0)
    assert controller_step(0.0, decay=2.0, unit_noise=4.0, target_share=1.0, **kw) == 0.0  # SGD alone already exceeds τ
    assert controller_step(0.0, decay=99.0, unit_noise=1.0, target_share=1.0, gain=1.0, max_noise=10.0) == pytest.approx(math.log(99.0))
    # a target that needs σ > max_noise cannot be reached: the controller backs off toward σ = 0
    assert controller_step(math.log1p(100.0), decay=1e9, unit_noise=1.0, target_share=1.0, gain=1.0, max_noise=10.0) == 0.0
    assert controller_step(0.3, decay=0.0, unit_noise=1.0, target_share=1.0, **kw) == 0.3
    st = LayerBalanceState()
    st = update_balance_state(st, weight_sq_norm=4.0, drift=1.0, unit_noise=2.0, unit_noise_raw=8.0, sigma=1.0, decay_rate=0.1, batch_size=8, ema_decay=0.5)
    assert st.decay == pytest.approx(0.1 * 1.9 * 4.0) and st.total_noise == pytest.approx(4.0)
    st = update_balance_state(st, weight_sq_norm=2.0, drift=3.0, unit_noise=2.0, unit_noise_raw=8.0, sigma=0.0, decay_rate=0.1, batch_size=8, ema_decay=0.5)
    assert st.weight_sq_norm == pytest.approx(3.0) and st.drift == pytest.approx(2.0) and st.total_noise == pytest.approx(3.0)
    terms = balance_from_state(st)
    assert terms is not None and terms.lr == pytest.approx(0.5) and terms.noise_share == pytest.approx(st.total_noise / st.decay)
    assert balance_from_state(LayerBalanceState()) is None
    assert st.decay_time == pytest.approx(0.2)
    assert ramped_target(2.0, 0.25, 1.0) == pytest.approx(0.5) and ramped_target(2.0, 3.0, 1.0) == 2.0 and ramped_target(2.0, 0.0, 0.0) == 2.0


@pytest.mark.parametrize("target", [0.7, 1.0])
def test_auto_reaches_target_share(target: float) -> None:
    # a deep linear net on noisy labels: per-sample gradients never vanish, so every target is reachable
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 2))
    teacher = torch.randn(2, 6, generator=torch.Generator().manual_seed(5))
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, weight_decay=5e-3, noise="auto", target_share=target, target_ramp=0.0)
    g = torch.Generator().manual_seed(3)
    shares: dict[str, list[float]] = {n: [] for n in ("0", "1", "2")}
    for step in range(500):
        x = torch.randn(128, 6, generator=g)
        y = x @ teacher.T + 0.5 * torch.randn(128, 2, generator=g)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        if step >= 300:
            for n, terms in opt.balance.items():
                shares[n].append(terms.noise_share)
    for n, values in shares.items():
        st = opt.balance_state[n]
        if st.sigma > 0.05:  # noise was needed: on average the controller sits on the target
            assert sum(values) / len(values) == pytest.approx(target, rel=0.15), (n, st)
        else:  # SGD's own noise reaches the target
            assert st.unit_noise / st.decay > 0.85 * target, (n, st)
    assert any(opt.balance_state[n].sigma > 0.05 for n in shares)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(weight_decay=-0.1), ValueError, "`weight_decay`"),
        (dict(noise=-1.0), ValueError, "`noise`"),
        (dict(noise="fixed"), ValueError, "unknown mode 'fixed'"),
        (dict(noise="auto"), ValueError, "`weight_decay` > 0"),
        (dict(target_share=0.0), ValueError, "`target_share`"),
        (dict(noise="auto", weight_decay=0.1, track_balance=False), ValueError, "`track_balance`"),
        (dict(target_ramp=-1.0), ValueError, "`target_ramp`"),
        (dict(sketch=0), ValueError, "`sketch`"),
        (dict(gain=0.0), ValueError, "`gain`"),
        (dict(ema_decay=1.0), ValueError, "`ema_decay`"),
        (dict(decay="biases"), ValueError, "`decay`"),
        (dict(nonfinite="ignore"), ValueError, "`nonfinite`"),
        (dict(grad_scaler=1.0), TypeError, "`grad_scaler`"),
        (dict(layers="nope"), ValueError, "`layers`"),
    ],
)
def test_bad_hyperparameters(kwargs: dict[str, object], exc: type[Exception], match: str) -> None:
    model = _mlp()
    with pytest.raises(exc, match=match):
        NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1), model, **kwargs)  # type: ignore[arg-type]


def test_bad_optimizer_and_model() -> None:
    model = _mlp()
    with pytest.raises(TypeError, match="optimizer instance.*class SGD"):
        NoiseCalibrated(torch.optim.SGD, model)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`optimizer`"):
        NoiseCalibrated(model, model)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="LBFGS"):
        NoiseCalibrated(torch.optim.LBFGS(model.parameters()), model)
    with pytest.raises(ValueError, match=r"layer '2' \(weight, bias\) to be in `optimizer`"):
        NoiseCalibrated(torch.optim.SGD(model[0].parameters(), lr=0.1), model)
    with pytest.raises(ValueError, match="`model`"):
        NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1), noise=0.5)
    with pytest.raises(TypeError, match="`model`"):
        NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1), "model", noise=0.5)  # type: ignore[arg-type]
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="wrap the base once"):
        NoiseCalibrated(NoiseCalibrated(base), model)
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1), model)
    sd = opt.state_dict()
    sd["noise_calibrated"]["balance"]["ghost"] = LayerBalanceState().to_dict()
    with pytest.raises(ValueError, match="ghost"):
        opt.load_state_dict(sd)


def test_model_none_is_decay_only() -> None:
    model = _mlp()
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1), weight_decay=0.1)
    w0 = model[0].weight.detach().clone()
    model(torch.randn(4, 6)).sum().backward()
    g = model[0].weight.grad.clone()
    opt.step()
    torch.testing.assert_close(model[0].weight, w0 * (1 - 0.01) - 0.1 * g, rtol=0, atol=1e-7)
    assert opt.balance == {} and opt.noise_scale == {}


def test_data_parallel_noise_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import canonreg.optim as optim_module

    model = _mlp()
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1), model, noise=1.0, weight_decay=0.1)
    monkeypatch.setattr(optim_module, "_distributed", lambda: True)  # as under a >1-rank process group
    x, y = _batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(CanonRegError, match="data-parallel"):
        opt.step()
    opt.param_groups[0]["nc_noise"] = 0.0  # decay and balance only: fine
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


# ------------------------------------------------------------------ transposed weight layouts (GPT-2's Conv1D)


@pytest.mark.parametrize("base", ["sgd_momentum", "adam"])
def test_transposed_layout_follows_its_linear_twin(base: str) -> None:
    """A layer storing Wᵀ (transformers' Conv1D) gets the noise, decay and balance of its nn.Linear twin:
    the noise is mapped with taps.matrix_view (factored addmm into the transposed view, and the
    materialised path), Adam's preconditioned sums read W's rows, not the parameter's."""
    pytest.importorskip("transformers")

    batches = [(x.double(), y) for x, y in _batches(5, batch=8, d_in=48)]
    runs = []
    for model in conv1d_and_linear_twins(48, 64, 3):  # layer 0 (48 → 64) stays factored with 8 rows
        opt = NoiseCalibrated(UNDECAYED[base](list(model.parameters())), model, weight_decay=1e-2, noise=1.5, sketch=4, seed=2)
        _train(model, opt, batches)
        runs.append((model, opt))
    (conv, c_opt), (lin, l_opt) = runs
    for c in (0, 2):
        torch.testing.assert_close(conv[c].weight, lin[c].weight.T, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(conv[c].bias, lin[c].bias, rtol=1e-10, atol=1e-12)
    for name in ("0", "2"):
        for k in ("unit_noise", "drift", "weight_sq_norm", "signal"):
            assert getattr(c_opt.balance_state[name], k) == pytest.approx(getattr(l_opt.balance_state[name], k), rel=1e-8, abs=1e-14), (name, k)


def test_ema_renamed_ema_decay_old_name_still_works() -> None:
    # `ema` → `ema_decay` (issue 11): the old keyword gives the same optimizer with a FutureWarning naming both.
    def run(**kw: float) -> tuple[dict[str, Tensor], dict[str, object]]:
        model = _mlp()
        opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, weight_decay=1e-2, noise="auto", **kw)
        _train(model, opt, _batches(4))
        return {n: p.detach().clone() for n, p in model.named_parameters()}, {n: st.to_dict() for n, st in opt.balance_state.items()}

    new_params, new_balance = run(ema_decay=0.5)
    with pytest.warns(FutureWarning, match="`ema` is renamed `ema_decay`"):
        old_params, old_balance = run(ema=0.5)
    assert old_balance == new_balance
    assert all(torch.equal(old_params[n], new_params[n]) for n in new_params)
    _, default_balance = run()
    assert default_balance != new_balance  # 0.5 is not the default 0.95: the keyword reaches the EMAs
    model = _mlp()
    with pytest.raises(TypeError, match="both `ema` and its new name `ema_decay`"):
        NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1), model, ema=0.5, ema_decay=0.5)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="`ema_decay`"):
        NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1), model, ema=1.5)  # type: ignore[call-arg]
    st = LayerBalanceState()
    kw = dict(weight_sq_norm=4.0, drift=1.0, unit_noise=2.0, unit_noise_raw=8.0, sigma=1.0, decay_rate=0.1, batch_size=8)
    with pytest.warns(FutureWarning, match="`ema` is renamed `ema_decay`"):
        assert update_balance_state(st, ema=0.5, **kw) == update_balance_state(st, ema_decay=0.5, **kw)  # type: ignore[arg-type]


def test_pickle_from_before_the_rename_loads() -> None:
    # A wrapper pickled while its config said "ema" unpickles with that value as ema_decay.
    model = _mlp()
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1), model, weight_decay=1e-3, ema_decay=0.25).detach()
    state = opt.__getstate__()
    state["config"] = {("ema" if k == "ema_decay" else k): v for k, v in state["config"].items()}
    clone = NoiseCalibrated.__new__(NoiseCalibrated)
    clone.__setstate__(state)
    assert clone._config.ema_decay == 0.25 and not clone.attached
    clone.attach()
    _train(model, clone, _batches(2))  # the balance updates read ema_decay
    assert clone.balance_state["0"].count == 2
    clone.detach()


def test_config_is_typed_and_pickles_in_the_dict_layout() -> None:
    # The settings are a frozen dataclass; the pickled state keeps the plain dict of 13 names.
    model = _mlp()
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1), model, weight_decay=1e-3, gain=1, ramp_steps=7, seed=4).detach()
    cfg = opt._config
    assert isinstance(cfg, WrapperConfig) and (cfg.gain, cfg.ramp_steps, cfg.seed, cfg.sketch) == (1.0, 7, 4, 32)
    assert type(cfg.gain) is float  # normalised like the old dict's float(gain)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sketch = 4  # type: ignore[misc]
    stored = opt.__getstate__()["config"]
    assert type(stored) is dict and sorted(stored) == sorted(
        ["layers", "decay", "sketch", "gain", "ema_decay", "max_noise", "target_ramp", "ramp_steps", "track_balance",
         "grad_scaler", "nonfinite", "taps", "seed"]
    )  # fmt: skip
    assert stored["ramp_steps"] == 7 and stored["gain"] == 1.0
    with pytest.raises(ValueError, match=r"unknown keys \['warmup'\]"):
        WrapperConfig.from_dict({**stored, "warmup": 3})


def test_pickle_of_the_oldest_config_layout_loads_and_trains_as_before() -> None:
    # The oldest stored layout, written by hand: "ema" (not ema_decay) and no "ramp_steps" (the target
    # then ramped by decay time only). It must train exactly like a wrapper built with ramp_steps=0.
    batches = _batches(12)

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = _mlp()
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def reference(ramp_steps: int) -> tuple[nn.Module, NoiseCalibrated]:
        model, base = fresh()
        opt = NoiseCalibrated(
            base, model, weight_decay=5e-3, noise="auto", target_share=10.0, ramp_steps=ramp_steps, gain=1.0, ema_decay=0.8, sketch=8, seed=3
        )  # fmt: skip
        _train(model, opt, batches)
        return model, opt.detach()

    model, ref = reference(0)
    _, default_ramp = reference(200)
    assert default_ramp.noise_scale != ref.noise_scale  # decay time 1/(η_eff γ) = 400 steps: the two ramps differ
    model2, base2 = fresh()
    hyper = {"nc_weight_decay": 5e-3, "nc_noise": "auto", "nc_target_share": 10.0}
    for group in base2.param_groups:
        group.update(hyper)
    base2.defaults.update(hyper)
    old_config = {
        "layers": None, "decay": "matrices", "sketch": 8, "gain": 1.0, "ema": 0.8, "max_noise": 10.0, "target_ramp": 1.0,
        "track_balance": True, "grad_scaler": None, "nonfinite": "error", "taps": None, "seed": 3,
    }  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    state = {"optimizer": base2, "model": model2, "config": old_config, "rng_state": gen.get_state(),
             "balance": {n: LayerBalanceState() for n in ("0", "2", "4")}, "steps": 0, "attached": True}  # fmt: skip
    old = NoiseCalibrated.__new__(NoiseCalibrated)
    old.__setstate__(state)
    assert (old._config.ema_decay, old._config.ramp_steps) == (0.8, 0)
    _train(model2, old, batches)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    assert old.balance_state == ref.balance_state and old.noise_scale == ref.noise_scale
    assert any(s > 0 for s in old.noise_scale.values())  # the controller acted
    clone = pickle.loads(pickle.dumps(old))  # and it re-pickles in the current layout
    assert clone._config == old._config
    old.detach()
    clone.detach()


class _EncoderHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.encoder(x)))


def test_noise_is_redrawn_every_pass_when_the_loop_calls_submodules_only() -> None:
    """A loop that runs ``model.head(tanh(model.encoder(x)))`` never calls ``model``: the signs are still redrawn
    after each backward pass, so the noise has mean 0 and covariance σ² Σ_b ∇L_b ∇L_bᵀ (one draw was reused
    forever: a fixed push, |mean| / rms = 1)."""
    torch.manual_seed(0)
    model = _EncoderHead().double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    per_sample = _per_sample_grads(model, x, y)
    target = per_sample.T @ per_sample
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.0), model, noise=1.0, seed=0)
    params = list(model.parameters())

    def pass_() -> None:
        opt.zero_grad()
        _mean_loss(model.head(torch.tanh(model.encoder(x))), y).backward()

    pass_()
    clean = torch.cat([p.grad.reshape(-1) for p in params]).clone()
    samples = []
    for _ in range(600):
        pass_()
        opt.step()
        samples.append(torch.cat([p.grad.reshape(-1) for p in params]) - clean)
    xi = torch.stack(samples)
    assert float(xi.mean(0).norm() / xi.square().mean(0).sum().sqrt()) < 0.2
    assert _max_z(xi, target) < 5.0
