"""Controller of ``NoiseCalibrated(noise="auto")``: no overshoot, no oscillation, a ramp that fits short
runs, back-off where noise cannot help, and balance terms that add up to the measured change of ‖W‖²
(issue 9, deliverable 2). Small synthetic models, seeded, a few seconds in all."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from canonreg.optim import NoiseCalibrated, controller_step, ramped_target

pytestmark = pytest.mark.usefixtures("single_thread")


def _deep_linear(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 2))


def _teacher_batch(g: torch.Generator, batch: int, label_noise: float) -> tuple[Tensor, Tensor]:
    teacher = torch.randn(2, 6, generator=torch.Generator().manual_seed(5))
    x = torch.randn(batch, 6, generator=g)
    return x, x @ teacher.T + label_noise * torch.randn(batch, 2, generator=g)


def _run(opt: NoiseCalibrated, model: nn.Module, steps: int, label_noise: Callable[[int], float], batch: int = 128) -> dict[str, list[tuple[float, float, float]]]:
    """Train; per step and layer record (realised share = total_noise/decay, σ, SGD's own share)."""
    g = torch.Generator().manual_seed(3)
    out: dict[str, list[tuple[float, float, float]]] = {}
    for step in range(steps):
        x, y = _teacher_batch(g, batch, label_noise(step))
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        for n, st in opt.balance_state.items():
            out.setdefault(n, []).append((st.total_noise / st.decay, st.sigma, st.unit_noise / st.decay))
    return out


def test_steady_state_share_within_30_percent_without_oscillation() -> None:
    # noisy labels: per-sample gradients never vanish, SGD's own share (≈0.3–0.6) sits below τ = 0.8
    tau = 0.8
    model = _deep_linear()
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, weight_decay=5e-3,
                          noise="auto", target_share=tau, target_ramp=1.0, ramp_steps=100)
    trace = _run(opt, model, 600, lambda t: 0.5)
    controlled = 0
    for n, rows in trace.items():
        after = rows[250:]
        for i in range(0, len(after), 50):  # 50-step windows
            win = after[i : i + 50]
            share, sigma, own = (statistics.fmean(r[k] for r in win) for k in range(3))
            if sigma < 0.1:  # the controller sits at σ ≈ 0: only because SGD's own share is (nearly) τ already
                assert own > 0.7 * tau, (n, i, own)
            else:  # it acts: the realised share is within ±30 % of τ
                controlled += 1
                assert abs(share / tau - 1) <= 0.3, (n, i, share)
        # no limit cycle: where σ acts, the per-step realised share rarely leaves the ±30 % band
        acting = [s for s, sig, _ in after if sig > 0.1]
        if acting:
            outside = sum(abs(s / tau - 1) > 0.3 for s in acting) / len(acting)
            assert outside < 0.1, (n, outside)  # 0.05 here; the old symmetric controller: 0.16
    assert controlled >= 4


def test_no_overshoot_when_sgd_noise_jumps() -> None:
    # SGD's own share is tiny (label noise 0.05) until step 300, then jumps ~×100 (label noise 0.5) to
    # just below τ. σ set for the quiet phase would give a realised share of many τ: the fast guard
    # must cut σ within a few steps, the realised (EMA) share peak stays below 2τ, and it is back within
    # ±30 % of τ after 60 steps.
    tau = 0.8
    model = _deep_linear()
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, weight_decay=5e-3,
                          noise="auto", target_share=tau, target_ramp=1.0, ramp_steps=100, max_noise=30.0)
    trace = _run(opt, model, 420, lambda t: 0.05 if t < 300 else 0.5)
    jumped = 0
    for n, rows in trace.items():
        before_sigma = statistics.fmean(s for _, s, _ in rows[250:300])
        if before_sigma < 1.0:
            continue
        jumped += 1
        peak = max(s for s, _, _ in rows[300:])
        assert peak < 2 * tau, (n, peak)
        late = rows[360:]
        own_late = statistics.fmean(o for _, _, o in late)
        if own_late < tau:  # the target is still reachable from above
            assert abs(statistics.fmean(s for s, _, _ in late) / tau - 1) <= 0.3, n
    assert jumped >= 1


def test_backs_off_where_noise_cannot_help() -> None:
    # noiseless teacher: at the decayed optimum the per-sample gradients are tiny, SGD's own share is far
    # below τ and the drift balances the decay; reaching τ would need σ beyond max_noise -> σ -> 0
    model = _deep_linear()
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, weight_decay=5e-3,
                          noise="auto", target_share=0.8, target_ramp=1.0, ramp_steps=100, max_noise=3.0)
    trace = _run(opt, model, 500, lambda t: 0.0)
    for n, rows in trace.items():
        own = statistics.fmean(o for _, _, o in rows[-50:])
        assert own * (1 + 3.0**2) < 0.8, (n, own)  # the target is out of reach: the case under test
        assert rows[-1][1] < 0.1, (n, rows[-1][1])  # backed off toward σ = 0 (not pinned at max_noise)


def test_ramp_fits_short_runs() -> None:
    # η_eff γ = 0.5 · 1e-3: one decay time is 2000 steps; ramp_steps = 100 still brings the full τ
    assert ramped_target(0.6, decay_time=100 * 5e-5, ramp=1.0, steps=100, ramp_steps=100) == pytest.approx(0.6)
    assert ramped_target(0.6, decay_time=50 * 5e-5, ramp=1.0, steps=50, ramp_steps=100) == pytest.approx(0.3)
    assert ramped_target(0.6, decay_time=0.5, ramp=1.0, steps=10, ramp_steps=0) == pytest.approx(0.3)  # decay time only
    model = _deep_linear()
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, weight_decay=1e-3,
                          noise="auto", target_share=0.8, ramp_steps=100)
    trace = _run(opt, model, 300, lambda t: 0.1)
    # within a run of 0.15 decay times the target is in full effect: where SGD's own share is below it,
    # σ acts and the realised share of the last 50 steps is within ±30 % of τ
    acted = [rows for rows in trace.values() if statistics.fmean(r[2] for r in rows[-50:]) < 0.6]
    assert acted
    for rows in acted:
        assert abs(statistics.fmean(r[0] for r in rows[-50:]) / 0.8 - 1) <= 0.3


def test_controller_step_rules() -> None:
    kw = dict(gain=0.5, max_noise=10.0)
    u0 = math.log(4.0)  # σ² = 3
    # fast guard: a jump of the fast noise estimate cuts u at once to log(c τ D / n₁ᶠ)
    cut = controller_step(u0, decay=2.0, unit_noise=0.5, target_share=1.0, unit_noise_fast=4.0, **kw)
    assert cut == pytest.approx(math.log(max(1.0, 1.2 * 1.0 * 2.0 / 4.0)))
    # weights expanding faster than 0.25 D: never raise σ; faster than D: back off toward 0
    assert controller_step(0.5, decay=2.0, unit_noise=0.1, target_share=1.0, growth=1.0, **kw) == pytest.approx(0.5)
    assert controller_step(0.5, decay=2.0, unit_noise=0.1, target_share=1.0, growth=3.0, **kw) == pytest.approx(0.25)
    # unreachable target (needs 1 + σ² > 1 + σ_max²): back off
    assert controller_step(u0, decay=1e4, unit_noise=1.0, target_share=1.0, **kw) == pytest.approx(u0 / 2)


def _weight_sq(model: nn.Module) -> dict[str, float]:
    return {n: float(m.weight.detach().double().square().sum()) for n, m in model.named_children() if isinstance(m, nn.Linear)}


def test_balance_terms_add_up_exactly_for_plain_sgd() -> None:
    # closed form: W⁺ = (1−r)W − η(g + σN) gives Δ‖W‖² = −decay + 2(1−r)drift + (1+σ²)n₁ + signal
    # + 2σ(η²⟨g,N⟩ − (1−r)η⟨W,N⟩); with σ = 0 the last term vanishes: exact per step
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    opt = NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1), model, weight_decay=0.05, ema_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        x, y = torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,), generator=g)
        before = _weight_sq(model)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        after = _weight_sq(model)
        for n, st in opt.balance_state.items():
            assert after[n] - before[n] == pytest.approx(st.net, rel=1e-9, abs=1e-14), n
            terms = opt.balance[n]  # per unit step size: η̄ (drift + noise + signal − decay) = Δ‖W‖²
            eta = terms.lr
            assert eta * (terms.drift + terms.noise + terms.signal - terms.decay) == pytest.approx(after[n] - before[n], rel=1e-7, abs=1e-13)
            assert terms.signal != 0.0  # the squared-mean-gradient term is measured, not dropped


@pytest.mark.parametrize("base", ["momentum", "adam"])
def test_balance_terms_add_up_on_average_with_momentum_and_adam(base: str) -> None:
    # with momentum / Adam a gradient kick acts over ~1/(1−β) steps, so the identity holds on average:
    # the summed terms match the measured change of ‖W‖² over 400 steps to 15 % of the summed decay (SGD +
    # momentum) or 40 % of the larger of decay and change (Adam: the drift uses the gradient, not Adam's first moment), where the old
    # accounting (second-order term η_eff²‖g‖²) over-counted it by 60 % – 900 %
    model = _deep_linear()
    inner = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if base == "momentum"
             else torch.optim.Adam(model.parameters(), lr=1e-2))
    opt = NoiseCalibrated(inner, model, weight_decay=5e-3, ema_decay=0.0)
    g = torch.Generator().manual_seed(3)
    start: dict[str, float] = {}
    sums: dict[str, list[float]] = {}
    for step in range(900):
        x, y = _teacher_batch(g, 128, 0.5)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        if step == 499:
            start = _weight_sq(model)
        elif step > 499:
            for n, st in opt.balance_state.items():
                acc = sums.setdefault(n, [0.0, 0.0])
                acc[0] += st.net
                acc[1] += st.decay
    end = _weight_sq(model)
    for n, (net, decay) in sums.items():
        measured = end[n] - start[n]
        scale = decay if base == "momentum" else max(decay, abs(measured))
        assert abs(net - measured) < (0.15 if base == "momentum" else 0.4) * scale, (n, net / decay, measured / decay)
