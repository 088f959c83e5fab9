"""The noise-share controller and the per-layer balance EMAs of :class:`canonreg.NoiseCalibrated` (pure functions).

Per tapped layer the wrapper measures, each step, the terms of the change of ``Tr WᵀW`` (theory §5):
decay ``D = η_eff γ (2 − η_eff γ) ‖W‖²``, drift, the unit noise ``n₁`` and the signal. Here

* :func:`noise_share` — ``noise / decay = (1 + σ²) n₁ / D``;
* :class:`LayerBalanceState`, :func:`update_balance_state` — their exponential moving averages;
* :func:`balance_from_state` — the theory's balance terms from them;
* :func:`ramped_target`, :func:`controller_step` — the target share in effect and the controller's
  update of ``u = log(1 + σ²)`` toward it (with the fast overshoot guard and the growth limit).

Everything is a function of floats and frozen dataclasses: no tensors, no state of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .errors import renamed_arguments
from .functional import BalanceTerms, balance_terms

__all__ = [
    "FAST_EMA",
    "GROWTH_LIMIT",
    "OVERSHOOT",
    "LayerBalanceState",
    "balance_from_state",
    "controller_step",
    "noise_share",
    "ramped_target",
    "update_balance_state",
]


def noise_share(sigma: float, unit_noise: float, decay: float) -> float:
    """Noise share ``noise / decay = (1 + σ²) n₁ / D`` (theory §5, trace form, per step).

    ``n₁ = E‖P ⊙ N‖²`` is the per-step diffusion of the unit (σ = 1) noise — equal to SGD's own noise
    term — and ``D = η_eff γ (2 − η_eff γ) ‖W‖²`` the per-step decay of ``Tr WᵀW``.
    """
    return (1.0 + sigma * sigma) * unit_noise / decay if decay > 0 else math.inf


#: Fast-EMA factor of the controller's overshoot guard (time constant ~5 steps).
FAST_EMA = 0.8

#: The fast guard cuts σ when the fast estimate of the share exceeds this multiple of the target.
OVERSHOOT = 1.2

#: ``growth_limit``: the controller never raises σ while ‖W‖² grows faster than this fraction of the
#: decay rate, and backs off toward σ = 0 while it grows faster than the decay itself (a runaway).
GROWTH_LIMIT = 0.25


def controller_step(
    log1p_sigma2: float,
    *,
    decay: float,
    unit_noise: float,
    target_share: float,
    gain: float,
    max_noise: float,
    unit_noise_fast: float | None = None,
    growth: float = 0.0,
    growth_limit: float = GROWTH_LIMIT,
) -> float:
    """One update of the noise controller in log space; returns the new ``u = log(1 + σ²)``.

        need = τ D / n₁                         (the 1 + σ² that makes (1+σ²) n₁ / D = τ)
        u*   = log max(1, need)                 if need ≤ 1 + σ_max²,  else 0   (unreachable: back off)
        u*   = min(u*, u)                       if Δ̄ > g D     (weights expanding: never raise σ)
        u*   = 0                                if Δ̄ > D       (expanding faster than decay contracts: back off)
        u    ← clip(u + k (u* − u), 0, log(1 + σ_max²))             (slow, first-order lag 1/k steps)
        u    ← min(u, log max(1, c τ D / n₁ᶠ))                      (fast: an overshoot is cut at once)

    ``D`` (decay), ``n₁`` (unit noise) and ``Δ̄`` (the measured per-step change of ``‖W‖²``) are EMAs
    (:func:`noise_share`), ``n₁ᶠ`` a fast EMA of ``n₁`` (:data:`FAST_EMA`), ``c`` = :data:`OVERSHOOT`
    (the fast estimate is noisy: cutting at ``τ`` itself would bias σ low), ``τ = target_share``,
    ``k = gain``, ``g = growth_limit``. The asymmetry (slow up, immediate down) is what keeps the
    realised share from overshooting when SGD's own noise jumps (the loss rises under the noise, so do
    the per-sample gradients: a positive feedback the lag of a symmetric controller turns into
    oscillation). The two back-off rules are where noise cannot help: SGD's own share is so small
    that the target needs ``σ > σ_max`` (the drift, not the noise, balances the decay; with Adam the
    preconditioned share also saturates in σ), or the injected noise is inflating the weights instead
    of balancing their decay. No decay (``D = 0``) or no noise measurement leaves ``u`` unchanged.
    """
    u_max = math.log1p(max_noise * max_noise)
    if not (decay > 0 and unit_noise > 0 and math.isfinite(decay) and math.isfinite(unit_noise)):
        return min(max(log1p_sigma2, 0.0), u_max)
    need = target_share * decay / unit_noise
    target = 0.0 if need > 1.0 + max_noise * max_noise else math.log(max(1.0, need))
    if math.isfinite(growth) and growth > growth_limit * decay:
        target = 0.0 if growth > decay else min(target, log1p_sigma2)
    u = log1p_sigma2 + gain * (target - log1p_sigma2)
    if unit_noise_fast is not None and unit_noise_fast > 0 and math.isfinite(unit_noise_fast):
        u = min(u, math.log(max(1.0, OVERSHOOT * target_share * decay / unit_noise_fast)))
    return min(max(u, 0.0), u_max)


@dataclass(frozen=True)
class LayerBalanceState:
    """EMA of one layer's per-step balance measurements, plus the controller state.

    All quantities are per optimizer step, for ``Tr WᵀW`` (theory §5), with ``P`` the per-coordinate
    step size (``η_eff`` for SGD-style groups, ``lr / (sqrt(v̂)+ε)`` for Adam), ``M = −∇_W L`` the clean
    batch gradient, ``N`` the unit-σ noise sketch and ``r = η_eff γ``. For plain SGD the step
    ``W⁺ = (1 − r) W + P ⊙ (M + σ N)`` gives exactly

        Δ‖W‖² = −decay + 2 (1 − r) drift + (1 + σ²) ‖P⊙N‖² + signal + 2σ⟨P⊙M, P⊙N⟩    (last term: mean 0)

    with ``signal = ‖P⊙M‖² − ‖P⊙N‖²`` (``≈ (1 − 1/S) η² ‖E M‖²``: the squared *mean* gradient, the
    second-order term the noise does not contain); with momentum or Adam it holds on average over the
    ``1/(1−β)`` steps a kick takes to act.

    Attributes:
        count: number of measurements.
        weight_sq_norm: ``‖W‖_F²``.
        decay: ``r (2 − r) ‖W‖²`` (contraction).
        drift: ``⟨W, P ⊙ M⟩`` (half the first-order change).
        unit_noise: ``‖P ⊙ N‖²`` — SGD's own noise term (``E = (η²/S) E[‖g_b‖²‖h_a‖²]`` for SGD).
        unit_noise_raw: ``‖N‖²`` (gives the noise-weighted step size ``η̄² = unit_noise/unit_noise_raw``).
        total_noise: ``(1 + σ²) ‖P ⊙ N‖²`` (SGD's own plus the injected noise).
        batch_size: samples per step ``S`` (summed over the micro-batches of an accumulation window).
        decay_rate: the last ``r = η_eff γ``.
        decay_time: ``Σ_t η_eff γ`` over the measured steps (the weights equilibrate over ~1 of it).
        log1p_sigma2: controller state ``u = log(1 + σ²)``.
        signal: ``‖P⊙M‖² − ‖P⊙N‖²`` (the squared-mean-gradient term; was missing before, issue 9).
        growth: the measured ``‖W_t‖² − ‖W_{t−1}‖²`` (what the terms above must add up to).
        last_weight_sq_norm: the last raw ``‖W‖²`` (NaN before the first step), for ``growth``.
        unit_noise_fast: fast EMA (:data:`FAST_EMA`) of ``unit_noise`` for the overshoot guard.
        micro_batches: backward passes per step (``> 1``: gradient accumulation, detected).
    """

    count: int = 0
    weight_sq_norm: float = 0.0
    decay: float = 0.0
    drift: float = 0.0
    unit_noise: float = 0.0
    unit_noise_raw: float = 0.0
    total_noise: float = 0.0
    batch_size: float = 0.0
    decay_rate: float = 0.0
    decay_time: float = 0.0
    log1p_sigma2: float = 0.0
    signal: float = 0.0
    growth: float = 0.0
    last_weight_sq_norm: float = math.nan
    unit_noise_fast: float = 0.0
    micro_batches: float = 1.0

    @property
    def sigma(self) -> float:
        """The controller's ``σ = sqrt(exp(u) − 1)``."""
        return math.sqrt(math.expm1(self.log1p_sigma2))

    @property
    def net(self) -> float:
        """``−decay + 2(1 − r) drift + total_noise + signal``: the predicted per-step change of ``‖W‖²``."""
        return -self.decay + 2.0 * (1.0 - self.decay_rate) * self.drift + self.total_noise + self.signal

    def to_dict(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in self.__dataclass_fields__}


@renamed_arguments(ema="ema_decay")
def update_balance_state(
    state: LayerBalanceState,
    *,
    weight_sq_norm: float,
    drift: float,
    unit_noise: float,
    unit_noise_raw: float,
    sigma: float,
    decay_rate: float,
    batch_size: int,
    ema_decay: float,
    grad_sq: float | None = None,
    micro_batches: int = 1,
) -> LayerBalanceState:
    """Fold one step's measurements into the EMAs: ``x ← β · x + (1 − β) · x_t``, ``β = ema_decay`` (first value as is).

    ``ema_decay`` was called ``ema`` (still accepted, with a FutureWarning).

    ``grad_sq = ‖P⊙M‖²`` gives ``signal = grad_sq − unit_noise`` (0 when not given); ``growth`` is the
    change of the raw ``weight_sq_norm`` since the previous call (its EMA starts at the second call).
    """
    decay = decay_rate * (2.0 - decay_rate) * weight_sq_norm
    new = {
        "weight_sq_norm": weight_sq_norm,
        "decay": decay,
        "drift": drift,
        "unit_noise": unit_noise,
        "unit_noise_raw": unit_noise_raw,
        "total_noise": (1.0 + sigma * sigma) * unit_noise,
        "batch_size": float(batch_size),
        "signal": 0.0 if grad_sq is None else grad_sq - unit_noise,
        "micro_batches": float(micro_batches),
    }
    beta = ema_decay if state.count > 0 else 0.0
    merged = {k: beta * getattr(state, k) + (1.0 - beta) * v for k, v in new.items()}
    fast = FAST_EMA if state.count > 0 else 0.0
    merged["unit_noise_fast"] = fast * state.unit_noise_fast + (1.0 - fast) * unit_noise
    if math.isfinite(state.last_weight_sq_norm):
        step = weight_sq_norm - state.last_weight_sq_norm
        merged["growth"] = (ema_decay * state.growth + (1.0 - ema_decay) * step) if state.count > 1 else step
    return replace(
        state, count=state.count + 1, decay_rate=decay_rate, decay_time=state.decay_time + decay_rate,
        last_weight_sq_norm=weight_sq_norm, **merged,
    )


def ramped_target(target_share: float, decay_time: float, ramp: float, steps: int = 0, ramp_steps: int = 0) -> float:
    """Target share in effect: ``τ · min(1, max(Σ_t η_eff γ / ramp, t / ramp_steps))``.

    ``τ`` itself when ``ramp = 0``; ``ramp_steps = 0`` ends the ramp by decay time only. Weights approach the noise equilibrium over
    ``~1/(η γ)`` steps (theory §5; arXiv:2402.07193); before that the drift dominates and SGD's own noise
    share is far below any stationary target, so holding ``τ`` from the first step would inject the
    largest noise exactly while the representation forms. With a small ``η γ`` one decay time can be
    longer than the whole run, so the ramp also ends after ``ramp_steps`` steps, whichever comes first.
    """
    if ramp <= 0:
        return target_share
    frac = decay_time / ramp
    if ramp_steps > 0:
        frac = max(frac, steps / ramp_steps)
    return target_share * min(1.0, frac)


def balance_from_state(state: LayerBalanceState) -> BalanceTerms | None:
    """The theory §5 balance terms (per unit step size) of a layer from its EMAs; None before data.

    Calls :func:`canonreg.functional.balance_terms` with the noise-weighted step size
    ``η̄ = sqrt(‖P⊙N‖² / ‖N‖²)`` (``η_eff`` for SGD-style groups) as ``lr`` and ``γ' = η_eff γ / η̄`` as
    ``weight_decay``, so that ``η̄ · decay``, ``η̄ · drift`` and ``η̄ · noise`` are the measured per-step
    changes of ``Tr WᵀW``. ``noise`` is the total (SGD's own + injected); ``noise_share = noise / decay``;
    ``signal`` is the squared-mean-gradient term ``‖P⊙M‖² − ‖P⊙N‖²`` (per unit step size), so that
    ``η̄ (drift + noise + signal − decay)`` is the per-step change of ``‖W‖²`` (:attr:`LayerBalanceState.net`).
    For Adam the decay and noise terms are exact in the preconditioned geometry (the preconditioned sums
    estimated without bias on ``sketch`` random rows of ``W``); the drift uses the gradient, not Adam's
    first moment (equal on average).
    """
    if state.count == 0 or state.unit_noise_raw <= 0 or state.unit_noise <= 0 or state.batch_size <= 0:
        return None
    eta = math.sqrt(state.unit_noise / state.unit_noise_raw)
    s = max(1, round(state.batch_size))
    return balance_terms(
        state.weight_sq_norm,
        state.drift / eta,
        s * state.total_noise / (eta * eta),
        lr=eta,
        weight_decay=state.decay_rate / eta,
        batch_size=s,
        mean_gradient_sq_norm=state.signal / (eta * eta * (1.0 - 1.0 / s)) if s > 1 else 0.0,
    )
