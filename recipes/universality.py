"""Universality recipe: fit the two-point effective theory of representation learning to real networks.

The effective theory of van Rossem & Saxe ("When Representations Align: Universality in
Representation Learning Dynamics", arXiv:2402.09142, ICML 2024; theory §7) follows two inputs
``A``, ``B`` with targets ``y*_A``, ``y*_B`` through one hidden layer ``h(x)`` and the output ``ŷ(x)``:

    h = ‖h_B − h_A‖²,   y = ‖ŷ_B − ŷ_A‖²,   w = ⟨ŷ_B − ŷ_A − (y*_B − y*_A), ŷ_B − ŷ_A⟩

and, under gradient flow on the squared loss with an encoder and a decoder flexible enough to be
described by one effective rate each (``η_h`` encoder, ``η_y`` decoder),

    dh/dt = −η_h Δx² w
    dy/dt = −w (η_y h + η_h Δx² y / h)
    dw/dt = −½ η_y (3w − y + Δy*²) h − ½ η_h Δx² (y + w) w / h

with ``Δx² = ‖x_B − x_A‖²`` and ``Δy*² = ‖y*_B − y*_A‖²``. ``η_h`` only ever appears as
``k_h = η_h Δx²``, so ``(k_h, η_y)`` are the two identifiable rates; we report ``η_h = k_h / Δx²``.
The quantity ``C = y/h − η_y h / k_h`` is conserved, and since training ends at ``w = 0``,
``y = Δy*²`` the final representational distance is closed-form:

    h_∞ = ½ (A + √(A² + 4 ρ Δy*²)),   A = h_0 − ρ y_0 / h_0,   ρ = k_h / η_y = (η_h/η_y) Δx²

(rich regime, ``A ≈ 0``: ``h_∞ ≈ √ρ ‖Δy*‖``; lazy regime, large ``h_0``: ``h_∞ ≈ h_0``).

**Task: exactly the two-point setting of the theory.** The training set is the two points
``x_{A,B} = x̄ ∓ δ/2`` (``x̄ ~ N(0, I_d)``, ``‖δ‖ = input_distance``, so the points are near each
other) with targets ``y*_{A,B} = ∓ Δ/2`` (``‖Δ‖ = target_distance``, random direction), one draw per
seed. The loss is ``L = ½ Σ_{i∈{A,B}} ‖ŷ_i − y*_i‖²`` and the step is full-batch gradient descent.
To follow gradient flow, the step size is re-set every ``ntk_every`` steps to
``lr = lr_factor / λ_max(Θ)``, ``Θ = J Jᵀ`` the empirical neural tangent kernel of the ``2·d_out``
outputs (so every mode moves by at most ``lr_factor`` of its distance per step; also re-set whenever
the loss goes up, a sign that the kernel grew in between), and the flow time is ``t = Σ_k lr_k``.
The default ``lr_factor = 0.25`` with a refresh every 5 steps was checked against smaller steps
(``lr_factor = 0.1`` every 2 steps; seed 0): the final distance ``h_T`` moved by ≤ 0.1% for the residual
MLP and the lazy networks and by 3% for the rich CNN (8.92 vs 9.19); the rich deep MLP, whose kernel
grows fastest, ends ≈ 8% above the small-step limit (6.97 vs 6.43, where 0.05 every step agrees to
0.1%; 0.5 every 20 steps gives 9.85). Its numbers describe gradient descent at this step size; the
fit and the prediction always use the same discrete trajectory.

**Networks** (``canonreg.models``; every weight layer He-normal with gain ``√2 · scale``, biases 0):
a deep ``mlp`` (``depth`` Linear layers of ``width``), a residual MLP ``resmlp`` (``depth − 2``
blocks), and a 1-D CNN ``cnn1d`` (the conv stack of ``canonreg.models.CNN1d``: ``cnn_depth − 1`` conv
layers of ``channels``, kernel 5; the input is read as a length-``d_in`` signal) with a dense Linear
readout of the flattened feature map. The library model's global average pool is replaced because it
makes the two-point problem badly conditioned: at init the NTK's difference modes are ~0.005 of its
largest eigenvalue (vs ~0.05 with the dense readout and for the MLPs), so gradient descent at a stable
step needs thousands of steps to move the representation. ``h`` is the input of the middle weight layer (the post-ReLU representation that layer reads,
flattened: ``channels × d`` for the CNN). Regimes: ``rich`` (``scale = rich_scale`` < 1, small
initial weights) and ``lazy`` (``scale = lazy_scale`` > 1).

**Fit.** For each run, with the measured initial condition ``(h_0, y_0, w_0)``:

1. *Finite differences* (closed form, a starting point): the right-hand sides are linear in
   ``(k_h, η_y)``, so central differences ``dX/dt`` give a non-negative linear least-squares problem
   (each equation scaled by the spread of its derivative).
2. *Integrated trajectories* (reported): minimise ``Σ_{X∈{h,y,w}} Σ_j ((X̂(t_j) − X(t_j)) / max|X|)²``
   over ``log k_h, log η_y``, where ``X̂`` integrates the ODE (LSODA, rtol 1e-8) from the measured
   initial condition. We fit trajectories rather than derivatives because finite differences of a
   discrete-time, stiff trajectory (fast output mode, slow representation mode) amplify the error,
   while the theory's claims — the trajectories and their end point — are about integrated values.

Reported per (architecture, regime), mean ± 95% Student-t interval over seeds: the fitted rates,
``R²`` of each trajectory (``1 − SS_res/SS_tot``; uninformative for a nearly constant ``h`` in the lazy
regime, hence also the normalised RMSE), the conserved quantity's drift along the *measured*
trajectory with the fitted ratio (``range(C) / (range(y/h) + (η_y/k_h) range(h))``: 0 = conserved,
1 = the two terms do not compensate at all), the slope and ``R²`` of the line ``y/h = C + (η_y/k_h) h`` (conservation read off the data
without any fit in time), and the predicted ``h_∞`` against the measured final ``h_T``: from the full
fit, and — as a held-out test — from a fit on the early window only (until ``L ≤ early_loss · L_0``).

**The four arms.** The theory assumes deterministic gradient flow on the plain squared loss without
weight decay. ``AlignmentLoss`` changes the objective (and with two samples the moments it aligns
have rank ≤ 1); ``NoiseCalibrated`` injects SGD-shaped noise — for two samples, random per-sample
loss weights ``1 + σ ε_i`` (``σ = noise``; the default ``weight_decay = 0`` adds no decay, and the
noise vanishes as the two per-sample gradients do at interpolation). Neither is a case the theory
covers, so the comparison is not an ablation of the theory: we run the four arms of
:mod:`canonreg.experiment` on one cell (``arms_arch``, ``arms_regime``) with the same initialisation,
data, step-size rule and stopping rule per seed, and report what happens to the fit and to ``h_T``.

Run::

    python recipes/universality.py --quick --out /tmp/universality   # CI setting, < 1 minute
    python recipes/universality.py                                     # full: 3 nets × 2 regimes × 3 seeds + arms

Outputs in ``--out``: ``results.md``, ``results.json`` (resolved config, environment, per-run records,
summaries), ``trajectories.png`` (measured vs fitted h, y, w), ``h_inf.png`` (predicted vs measured
final distance) and ``conserved.png`` (``y/h`` against ``h``).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from _common import ARM_COLORS, STUDY_ARMS, check_arms, check_seeds, config_from_args, markdown_table, recipe_parser
from torch import Tensor, nn

from canonreg.experiment import ARMS, TrialConfig, make_arm, optimizer_step
from canonreg.layers import select_layers
from canonreg.models import CNN1d, ResidualMLP, mlp
from canonreg.stats import environment, fmt_ci, format_interval, mean_ci, mean_half_width, write_json

Arch = Literal["mlp", "resmlp", "cnn1d"]
Regime = Literal["rich", "lazy"]
ARCHS: tuple[str, ...] = ("mlp", "resmlp", "cnn1d")
REGIMES: tuple[str, ...] = ("rich", "lazy")


# ====================================================================== the effective theory
def two_point_rhs(state: Sequence[float] | np.ndarray, k_h: float, eta_y: float, dy2: float) -> tuple[Any, Any, Any]:
    """Right-hand side of the two-point system (van Rossem & Saxe, arXiv:2402.09142; theory §7).

        dh/dt = −k_h w,   dy/dt = −w (η_y h + k_h y/h),
        dw/dt = −½ η_y (3w − y + Δy*²) h − ½ k_h (y + w) w / h

    Args:
        state: ``(h, y, w)`` (floats or equally shaped arrays).
        k_h: encoder rate times the squared input distance, ``η_h Δx²``.
        eta_y: decoder rate ``η_y``.
        dy2: squared target distance ``Δy*²``.

    Returns:
        ``(dh/dt, dy/dt, dw/dt)`` (a tuple: the integrator calls this thousands of times per fit).
    """
    h, y, w = state
    return (
        -k_h * w,
        -w * (eta_y * h + k_h * y / h),
        -0.5 * eta_y * (3.0 * w - y + dy2) * h - 0.5 * k_h * (y + w) * w / h,
    )


def integrate_two_point(
    t: np.ndarray, state0: Sequence[float] | np.ndarray, k_h: float, eta_y: float, dy2: float, *, rtol: float = 1e-7
) -> np.ndarray:
    """``(h, y, w)`` at the times ``t`` (``t[0]`` is the initial time), shape ``(3, len(t))``.

    LSODA (switches to a stiff method when the output mode is much faster than the representation
    mode), ``rtol``. Returns NaNs when the integration fails (e.g. ``h`` reaching 0).
    """
    from scipy.integrate import solve_ivp

    sol = solve_ivp(
        lambda _t, s: two_point_rhs(s, k_h, eta_y, dy2),
        (float(t[0]), float(t[-1])),
        np.asarray(state0, dtype=np.float64),
        t_eval=t,
        method="LSODA",
        rtol=rtol,
        atol=1e-12,
    )
    if not sol.success or sol.y.shape[1] != len(t):
        return np.full((3, len(t)), np.nan)
    return sol.y


def conserved_quantity(h: np.ndarray, y: np.ndarray, k_h: float, eta_y: float) -> np.ndarray:
    """``C = y/h − η_y h / k_h``, constant along every solution of the two-point system."""
    return y / h - eta_y * h / k_h


def h_infinity(h0: float, y0: float, k_h: float, eta_y: float, dy2: float) -> float:
    """Final representational distance of the two-point system (theory §7).

        h_∞ = ½ (A + √(A² + 4 ρ Δy*²)),   A = h_0 − ρ y_0 / h_0,   ρ = k_h / η_y

    From ``C(0) = C(∞)`` with ``y_∞ = Δy*²`` (the end point ``w = 0`` with a fitted output).
    """
    rho = k_h / eta_y
    a = h0 - rho * y0 / h0
    return 0.5 * (a + math.sqrt(a * a + 4.0 * rho * dy2))


def r_squared(measured: np.ndarray, predicted: np.ndarray) -> float:
    """``1 − Σ(x − x̂)² / Σ(x − x̄)²`` (NaN when ``x`` is constant or the prediction is not finite)."""
    ss_tot = float(((measured - measured.mean()) ** 2).sum())
    if ss_tot == 0.0 or not np.all(np.isfinite(predicted)):
        return math.nan
    return 1.0 - float(((measured - predicted) ** 2).sum()) / ss_tot


def fit_rates_fd(t: np.ndarray, traj: np.ndarray, dy2: float) -> tuple[float, float]:
    """``(k_h, η_y)`` by non-negative least squares on central finite differences.

    Each right-hand side is linear in the rates, ``dX/dt = k_h a_X(h,y,w) + η_y b_X(h,y,w)``; rows of
    equation ``X`` are divided by the standard deviation of ``dX/dt`` so that the three carry equal weight.
    """
    from scipy.optimize import nnls

    h, y, w = traj
    d = np.gradient(traj, t, axis=1)
    design = [
        np.stack([-w, np.zeros_like(w)], 1),
        np.stack([-w * y / h, -w * h], 1),
        np.stack([-0.5 * (y + w) * w / h, -0.5 * (3.0 * w - y + dy2) * h], 1),
    ]
    rows, rhs = [], []
    for i in range(3):
        s = float(np.std(d[i])) or 1.0
        rows.append(design[i] / s)
        rhs.append(d[i] / s)
    coef, _ = nnls(np.concatenate(rows), np.concatenate(rhs))
    return float(coef[0]), float(coef[1])


@dataclass(frozen=True)
class RateFit:
    """Two effective rates fitted to one measured ``(h, y, w)`` trajectory.

    Attributes:
        k_h, eta_y: the fitted ``η_h Δx²`` and ``η_y`` (integrated-trajectory fit).
        k_h_fd, eta_y_fd: the finite-difference estimate the fit started from.
        r2: ``R²`` of ``h, y, w`` under the integrated ODE with the fitted rates.
        nrmse: root-mean-square residual of ``h, y, w`` divided by ``max|X|``.
        evaluations: ODE integrations the optimiser used.
    """

    k_h: float
    eta_y: float
    k_h_fd: float
    eta_y_fd: float
    r2: tuple[float, float, float]
    nrmse: tuple[float, float, float]
    evaluations: int


def fit_rates(t: np.ndarray, traj: np.ndarray, dy2: float, *, grid_decades: int = 2) -> RateFit:
    """Fit ``(k_h, η_y)`` of the two-point system to a measured trajectory (integrated least squares).

    Minimises ``Σ_X Σ_j ((X̂(t_j) − X(t_j)) / max|X|)²`` over ``(log k_h, log η_y)``, where ``X̂``
    integrates :func:`two_point_rhs` from the measured ``traj[:, 0]``. The objective is not convex
    (a rich-regime plateau makes it flat far from the answer), so the start is the best point of a
    ``(2·grid_decades + 1)²`` grid, one point per decade around the finite-difference estimate
    (:func:`fit_rates_fd`; a zero component is replaced by the other rate times ``h_0``), refined by
    scipy's trust-region reflective least squares.

    Args:
        t: ``(T,)`` increasing flow times.
        traj: ``(3, T)`` measured ``h, y, w``.
        dy2: ``Δy*²``.
        grid_decades: half-width of the start grid in decades.
    """
    from scipy.optimize import least_squares

    scale = np.abs(traj).max(1, keepdims=True)
    scale[scale == 0] = 1.0
    k_fd, e_fd = fit_rates_fd(t, traj, dy2)
    h0 = float(traj[0, 0])
    k_c = k_fd if k_fd > 0 else (e_fd * h0 if e_fd > 0 else 1.0 / (t[-1] - t[0]))
    e_c = e_fd if e_fd > 0 else k_c / h0
    evaluations = 0

    def residuals(p: np.ndarray) -> np.ndarray:
        nonlocal evaluations
        evaluations += 1
        sim = integrate_two_point(t, traj[:, 0], math.exp(p[0]), math.exp(p[1]), dy2)
        r = ((sim - traj) / scale).ravel()
        return np.where(np.isfinite(r), r, 10.0)  # a failed integration is a large, finite residual

    offsets = np.arange(-grid_decades, grid_decades + 1) * math.log(10.0)
    grid = [np.array([math.log(k_c) + a, math.log(e_c) + b]) for a in offsets for b in offsets]
    start = min(grid, key=lambda p: float(np.sum(residuals(p) ** 2)))
    sol = least_squares(residuals, start, method="trf", xtol=1e-10, ftol=1e-10, max_nfev=100)
    k_h, eta_y = (float(v) for v in np.exp(sol.x))
    sim = integrate_two_point(t, traj[:, 0], k_h, eta_y, dy2)
    r2 = tuple(r_squared(traj[i], sim[i]) for i in range(3))
    nrmse = tuple(float(np.sqrt(np.mean((sim[i] - traj[i]) ** 2)) / scale[i, 0]) for i in range(3))
    return RateFit(k_h, eta_y, k_fd, e_fd, r2, nrmse, evaluations)  # type: ignore[arg-type]


def conservation_drift(h: np.ndarray, y: np.ndarray, k_h: float, eta_y: float) -> float:
    """How far ``C = y/h − (η_y/k_h) h`` is from constant along a measured trajectory, in [0, 1].

        drift = range(C) / (range(y/h) + (η_y/k_h) range(h))

    0 when the two terms cancel exactly (conserved), 1 when they do not compensate at all.
    """
    c = conserved_quantity(h, y, k_h, eta_y)
    denom = float(np.ptp(y / h) + eta_y / k_h * np.ptp(h))
    return float(np.ptp(c)) / denom if denom > 0 else math.nan


# ====================================================================== config
@dataclass(frozen=True)
class UniversalityConfig:
    """The universality study (defaults: full mode, a few minutes on 2 CPU cores).

    Task: ``d_in`` inputs, ``d_out`` outputs, ``input_distance = ‖x_B − x_A‖``,
    ``target_distance = ‖y*_B − y*_A‖``. Networks: ``width`` (channels for the CNN), ``depth`` weight
    layers (``cnn_depth`` for the CNN). Regimes: per-layer init multipliers ``rich_scale`` and ``lazy_scale``. Optimisation:
    ``lr_factor`` (step = ``lr_factor / λ_max(NTK)``), NTK refresh every ``ntk_every`` steps, stop at
    ``L ≤ tol · L_0`` or ``max_steps``; ``fit_points`` trajectory samples per fit; ``early_loss``
    ends the held-out early window. Arms: run on ``arms_arch`` × ``arms_regime`` with the
    :class:`canonreg.experiment.TrialConfig` fields ``weight_decay`` (all arms), ``noise``,
    ``loss_weight``, ``relations``; ``arms = ("baseline",)`` skips the comparison.
    """

    archs: tuple[str, ...] = ARCHS
    regimes: tuple[str, ...] = REGIMES
    seeds: tuple[int, ...] = (0, 1, 2)
    d_in: int = 16
    d_out: int = 4
    input_distance: float = 2.0
    target_distance: float = 3.0
    width: int = 128
    channels: int = 16
    depth: int = 8
    cnn_depth: int = 5
    rich_scale: float = 0.5
    lazy_scale: float = 1.4
    lr_factor: float = 0.25
    ntk_every: int = 5
    tol: float = 1e-4
    max_steps: int = 1500
    fit_points: int = 200
    early_loss: float = 0.1
    arms: tuple[str, ...] = STUDY_ARMS
    arms_arch: str = "mlp"
    arms_regime: str = "rich"
    weight_decay: float = 0.0
    noise: float | str = 0.5
    loss_weight: float = 0.1
    relations: tuple[str, ...] = ("f-RWA", "b-RWA")
    threads: int = 1
    out: str = "results/universality"
    quick: bool = False

    def __post_init__(self) -> None:
        check_seeds(self.seeds)
        check_arms(self.arms)
        for name, allowed in (("archs", ARCHS), ("regimes", REGIMES)):
            v = getattr(self, name)
            if not v or any(a not in allowed for a in v) or len(set(v)) != len(v):
                raise ValueError(f"Expected `{name}` to be distinct names from {list(allowed)}, but got {list(v)!r}")
        if self.arms_arch not in ARCHS:
            raise ValueError(f"Expected `arms_arch` to be one of {list(ARCHS)}, but got {self.arms_arch!r}")
        if self.arms_regime not in REGIMES:
            raise ValueError(f"Expected `arms_regime` to be one of {list(REGIMES)}, but got {self.arms_regime!r}")
        for name in ("d_in", "d_out", "width", "channels", "ntk_every", "max_steps", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"Expected `{name}` to be a positive int, but got {getattr(self, name)!r}")
        for name in ("depth", "cnn_depth"):
            if getattr(self, name) < 3:
                raise ValueError(f"Expected `{name}` >= 3 (a hidden layer between encoder and decoder), but got {getattr(self, name)!r}")
        if self.fit_points < 10:
            raise ValueError(f"Expected `fit_points` >= 10, but got {self.fit_points!r}")
        for name in ("input_distance", "target_distance", "rich_scale", "lazy_scale", "lr_factor", "tol", "early_loss"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Expected `{name}` to be a positive float, but got {getattr(self, name)!r}")
        if not self.lr_factor < 2:
            raise ValueError(f"Expected `lr_factor` < 2 (gradient descent is unstable beyond), but got {self.lr_factor!r}")
        if not self.rich_scale < self.lazy_scale:
            raise ValueError(f"Expected `rich_scale` < `lazy_scale`, but got {self.rich_scale} and {self.lazy_scale}")


#: ``--quick``: one seed-set of two, small nets, short runs (the CI setting, < 1 minute).
QUICK: dict[str, Any] = {
    "seeds": (0, 1),
    "width": 48,
    "channels": 8,
    "depth": 5,
    "max_steps": 250,
    "tol": 1e-3,
    "fit_points": 60,
    "arms": ("baseline", "noise"),
    "out": "results/universality-quick",
}


# ====================================================================== data and models
def two_points(cfg: UniversalityConfig, seed: int) -> tuple[Tensor, Tensor]:
    """``x`` ``(2, d_in)`` and targets ``(2, d_out)`` (float64): ``x̄ ∓ δ/2`` and ``∓ Δ/2``."""
    g = torch.Generator().manual_seed(10_000 + seed)
    center = torch.randn(cfg.d_in, generator=g, dtype=torch.float64)
    delta = torch.randn(cfg.d_in, generator=g, dtype=torch.float64)
    delta = delta / delta.norm() * cfg.input_distance
    target = torch.randn(cfg.d_out, generator=g, dtype=torch.float64)
    target = target / target.norm() * cfg.target_distance
    x = torch.stack([center - delta / 2, center + delta / 2])
    y = torch.stack([-target / 2, target / 2])
    return x, y


def build_network(cfg: UniversalityConfig, arch: str, scale: float, seed: int) -> tuple[nn.Module, nn.Module]:
    """The network (float64) and the module whose input is the tracked representation ``h``.

    Every Linear/Conv1d weight is drawn from ``N(0, 2 scale² / fan_in)`` (He-normal times ``scale``),
    biases are 0; ``h`` is the input of the middle weight layer.
    """
    torch.manual_seed(seed)
    model: nn.Module
    if arch == "mlp":
        model = mlp(cfg.d_in, cfg.width, cfg.depth, cfg.d_out)
    elif arch == "resmlp":
        model = ResidualMLP(cfg.d_in, cfg.width, cfg.depth - 2, cfg.d_out)
    else:  # the conv stack of canonreg.models.CNN1d with a dense readout instead of its global pool
        convs = CNN1d(cfg.d_in, channels=cfg.channels, layers=cfg.cnn_depth - 1, d_out=cfg.d_out).features
        model = nn.Sequential(nn.Unflatten(1, (1, cfg.d_in)), *convs, nn.Flatten(), nn.Linear(cfg.channels * cfg.d_in, cfg.d_out))
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d)):
            nn.init.normal_(m.weight, 0.0, scale * math.sqrt(2.0 / m.weight[0].numel()))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    model = model.double()
    weight_layers = list(select_layers(model, None)[0].values())
    return model, weight_layers[len(weight_layers) // 2]


def ntk_lambda_max(model: nn.Module, x: Tensor, params: dict[str, Tensor] | None = None) -> float:
    """Largest eigenvalue of the empirical NTK ``Θ = J Jᵀ`` of all outputs on ``x`` (``J = ∂ŷ/∂θ``).

    Args:
        model: the network; pass a hook-free copy with ``params`` when the trained model carries
            hooks (an alignment loss) that must not see this extra forward pass.
        x: the inputs.
        params: parameter values to evaluate at (default: ``model``'s own).
    """
    from torch.func import functional_call, jacrev

    values = {k: v.detach() for k, v in (params if params is not None else dict(model.named_parameters())).items()}
    jac = jacrev(lambda p: functional_call(model, p, (x,)).reshape(-1))(values)
    j = torch.cat([v.reshape(v.shape[0], -1) for v in jac.values()], dim=1)
    return float(torch.linalg.eigvalsh(j @ j.T)[-1])


# ====================================================================== one run: the visible loop
def train_two_point(cfg: UniversalityConfig, arch: str, regime: str, seed: int, arm: str = "baseline") -> dict[str, Any]:
    """Train one network on the two points and return its measured trajectory and fits.

    The step of ``arm`` comes from :func:`canonreg.experiment.make_arm` (SGD without momentum;
    the baseline is plain gradient descent when ``weight_decay = 0``); its learning rate is re-set
    to ``lr_factor / λ_max(NTK)`` every ``ntk_every`` steps and whenever the loss went up.
    """
    scale = cfg.rich_scale if regime == "rich" else cfg.lazy_scale
    x, y_star = two_points(cfg, seed)
    model, layer = build_network(cfg, arch, scale, seed)
    shadow = copy.deepcopy(model)  # hook-free twin: the NTK's forward passes stay invisible to the arm's hooks
    captured: dict[str, Tensor] = {}
    handle = layer.register_forward_pre_hook(lambda _m, inputs: captured.__setitem__("h", inputs[0]))
    trial = TrialConfig(
        arm=arm, optimizer="sgd", lr=1.0, momentum=0.0, weight_decay=cfg.weight_decay, noise=cfg.noise,
        loss_weight=cfg.loss_weight, relations=cfg.relations, batch_size=2, steps=1, eval_every=1, seed=seed,
    )  # fmt: skip
    opt, align = make_arm(trial, model)
    dy_star = y_star[1] - y_star[0]
    dx2 = float((x[1] - x[0]).pow(2).sum())
    dy2 = float(dy_star.pow(2).sum())
    t, lr = 0.0, 0.0
    rows: list[tuple[float, float, float, float, float]] = []  # t, h, y, w, loss
    t0 = time.perf_counter()
    try:
        for step in range(cfg.max_steps + 1):
            if step % cfg.ntk_every == 0 or (len(rows) > 1 and rows[-1][4] > rows[-2][4]):  # the kernel grew: re-measure
                lr = cfg.lr_factor / ntk_lambda_max(shadow, x, dict(model.named_parameters()))
                for group in opt.param_groups:
                    group["lr"] = lr
            out = model(x)
            task = 0.5 * (out - y_star).pow(2).sum()
            with torch.no_grad():
                h = captured["h"].reshape(2, -1)
                dh, dy = h[1] - h[0], out[1] - out[0]
                rows.append((t, float(dh @ dh), float(dy @ dy), float((dy - dy_star) @ dy), float(task.detach())))
            if not math.isfinite(rows[-1][4]):
                raise FloatingPointError(f"Training diverged at step {step} ({arch}, {regime}, seed {seed}, arm {arm})")
            if rows[-1][4] <= cfg.tol * rows[0][4] or step == cfg.max_steps:
                break
            optimizer_step(opt, task, align)
            t += lr
    finally:
        handle.remove()
        if align is not None:
            align.detach()
    seconds = time.perf_counter() - t0

    rec = np.array(rows)
    idx = np.unique(np.linspace(0, len(rec) - 1, min(cfg.fit_points, len(rec))).round().astype(int))
    times, traj, loss_curve = rec[idx, 0], rec[idx, 1:4].T, rec[idx, 4]
    fit = fit_rates(times, traj, dy2)
    h0, y0, h_final = float(traj[0, 0]), float(traj[1, 0]), float(traj[0, -1])
    h_pred = h_infinity(h0, y0, fit.k_h, fit.eta_y, dy2)
    # held-out: fit only until the loss first reaches early_loss · L_0, predict the end point
    n_early = int(np.argmax(loss_curve <= cfg.early_loss * loss_curve[0])) + 1 if (loss_curve <= cfg.early_loss * loss_curve[0]).any() else len(idx)
    n_early = max(n_early, 10)
    early = fit_rates(times[:n_early], traj[:, :n_early], dy2)
    h_pred_early = h_infinity(h0, y0, early.k_h, early.eta_y, dy2)
    # conservation on the measured trajectory
    ratio = traj[1] / traj[0]
    drift = conservation_drift(traj[0], traj[1], fit.k_h, fit.eta_y)
    slope, intercept = np.polyfit(traj[0], ratio, 1)
    line_r2 = r_squared(ratio, intercept + slope * traj[0])
    return {
        "arch": arch, "regime": regime, "seed": seed, "arm": arm, "scale": scale,
        "dx2": dx2, "dy2": dy2, "steps": len(rows) - 1, "flow_time": t, "seconds": seconds,
        "converged": bool(rows[-1][4] <= cfg.tol * rows[0][4]), "final_loss": rows[-1][4],
        "h0": h0, "y0": y0, "w0": float(traj[2, 0]), "h_final": h_final,
        "k_h": fit.k_h, "eta_h": fit.k_h / dx2, "eta_y": fit.eta_y, "rate_ratio": fit.k_h / fit.eta_y / dx2,
        "k_h_fd": fit.k_h_fd, "eta_y_fd": fit.eta_y_fd,
        "r2_h": fit.r2[0], "r2_y": fit.r2[1], "r2_w": fit.r2[2],
        "nrmse_h": fit.nrmse[0], "nrmse_y": fit.nrmse[1], "nrmse_w": fit.nrmse[2],
        "h_inf_pred": h_pred, "h_inf_rel_err": (h_pred - h_final) / h_final,
        "early_points": n_early, "h_inf_pred_early": h_pred_early, "h_inf_rel_err_early": (h_pred_early - h_final) / h_final,
        "conserved_drift": drift, "line_slope": float(slope), "line_r2": line_r2,
        "line_slope_over_fit": float(slope) * fit.k_h / fit.eta_y,
        "trajectory": {"t": times.tolist(), "h": traj[0].tolist(), "y": traj[1].tolist(), "w": traj[2].tolist(), "loss": loss_curve.tolist()},
    }  # fmt: skip


# ====================================================================== study, tables, figures
def run(cfg: UniversalityConfig) -> dict[str, Any]:
    """Run every (architecture, regime, seed), then the arms cell; write tables, figures and JSON."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    runs: list[dict[str, Any]] = []
    for arch in cfg.archs:
        for regime in cfg.regimes:
            for seed in cfg.seeds:
                r = train_two_point(cfg, arch, regime, seed)
                runs.append(r)
                print(_progress(r), flush=True)
    arm_runs: list[dict[str, Any]] = []
    for arm in cfg.arms if len(cfg.arms) > 1 else ():
        for seed in cfg.seeds:
            done = [r for r in runs if (r["arch"], r["regime"], r["seed"]) == (cfg.arms_arch, cfg.arms_regime, seed)]
            if arm == "baseline" and done:
                r = done[0]  # the main study ran exactly this baseline
            else:
                r = train_two_point(cfg, cfg.arms_arch, cfg.arms_regime, seed, arm)
                print(_progress(r), flush=True)
            arm_runs.append(r)

    main_rows = summarise(runs, [("arch", a) for a in cfg.archs], cfg.regimes)
    tables = {"main": main_table(cfg, runs), "arms": arms_table(cfg, arm_runs) if arm_runs else ""}
    timing = {"wall_s": time.perf_counter() - t_start, "cpu_s": time.process_time() - cpu_start, "load_average": os.getloadavg()}
    text = _markdown(cfg, tables, timing)
    (out / "results.md").write_text(text)
    print(text)
    plot_trajectories(cfg, runs, out / "trajectories.png")
    plot_h_inf(cfg, runs, arm_runs, out / "h_inf.png")
    plot_conserved(cfg, runs, out / "conserved.png")
    result = {
        "config": asdict(cfg),
        "environment": environment(),
        "timing": timing,
        "summary": main_rows,
        "runs": runs,
        "arm_runs": arm_runs,
    }
    write_json(out / "results.json", result)
    return result


def _progress(r: dict[str, Any]) -> str:
    return (
        f"  {r['arch']:<7}{r['regime']:<5} seed={r['seed']} arm={r['arm']:<8} steps={r['steps']:>5} "
        f"R²(h,y,w)=({r['r2_h']:.3f},{r['r2_y']:.3f},{r['r2_w']:.3f})  h0={r['h0']:.3g} h_T={r['h_final']:.3g} "
        f"h_∞ pred={r['h_inf_pred']:.3g} (early {r['h_inf_pred_early']:.3g})  ({r['seconds']:.1f}s)"
    )


SUMMARY_KEYS: tuple[str, ...] = (
    "eta_h", "eta_y", "rate_ratio", "r2_h", "r2_y", "r2_w", "nrmse_h", "nrmse_y", "nrmse_w", "h0", "h_final",
    "h_inf_pred", "h_inf_rel_err", "h_inf_pred_early", "h_inf_rel_err_early", "conserved_drift", "line_r2",
    "line_slope_over_fit", "steps", "flow_time",
)  # fmt: skip


def summarise(runs: list[dict[str, Any]], groups: list[tuple[str, str]], regimes: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per (group, regime): every key of :data:`SUMMARY_KEYS` as ``[mean, 95% half-width]`` over seeds."""
    rows = []
    for key, value in groups:
        for regime in regimes:
            sel = [r for r in runs if r[key] == value and r["regime"] == regime]
            if not sel:
                continue
            row: dict[str, Any] = {key: value, "regime": regime, "seeds": len(sel), "converged": sum(r["converged"] for r in sel)}
            for k in SUMMARY_KEYS:
                row[k] = list(mean_half_width([r[k] for r in sel]))
            rows.append(row)
    return rows


def main_table(cfg: UniversalityConfig, runs: list[dict[str, Any]]) -> str:
    header = [
        "net", "regime", "η_h", "η_y", "R² h", "R² y", "R² w", "NRMSE h", "h_0", "h_T measured", "h_∞ predicted",
        "rel. err", "rel. err (early fit)", "C drift", "R² y/h~h", "slope / (η_y/k_h)", "converged",
    ]  # fmt: skip
    rows = []
    for arch in cfg.archs:
        for regime in cfg.regimes:
            sel = [r for r in runs if r["arch"] == arch and r["regime"] == regime]
            if not sel:
                continue
            rows.append([
                arch, regime, _fmt_g(sel, "eta_h"), _fmt_g(sel, "eta_y"), _col(sel, "r2_h"), _col(sel, "r2_y"), _col(sel, "r2_w"),
                _col(sel, "nrmse_h"), _fmt_g(sel, "h0"), _fmt_g(sel, "h_final"), _fmt_g(sel, "h_inf_pred"), _col(sel, "h_inf_rel_err"),
                _col(sel, "h_inf_rel_err_early"), _col(sel, "conserved_drift"), _col(sel, "line_r2"), _col(sel, "line_slope_over_fit", 2),
                f"{sum(r['converged'] for r in sel)}/{len(sel)}",
            ])  # fmt: skip
    return markdown_table(header, rows)


def arms_table(cfg: UniversalityConfig, arm_runs: list[dict[str, Any]]) -> str:
    header = ["arm", "R² h", "R² y", "R² w", "h_T measured", "h_∞ predicted", "rel. err", "C drift", "final loss", "steps"]
    rows = []
    for arm in cfg.arms:
        sel = [r for r in arm_runs if r["arm"] == arm]
        rows.append([
            arm, _col(sel, "r2_h"), _col(sel, "r2_y"), _col(sel, "r2_w"), _fmt_g(sel, "h_final"), _fmt_g(sel, "h_inf_pred"),
            _col(sel, "h_inf_rel_err"), _col(sel, "conserved_drift"), _fmt_g(sel, "final_loss"), _fmt_g(sel, "steps"),
        ])  # fmt: skip
    return markdown_table(header, rows)


def _col(sel: list[dict[str, Any]], key: str, digits: int = 3) -> str:
    """``mean ± half`` of ``key`` over the runs ``sel`` with fixed decimals."""
    return fmt_ci([r[key] for r in sel], digits)


def _fmt_g(sel: list[dict[str, Any]], key: str) -> str:
    """``mean ± half`` in 3 significant digits (for quantities spanning orders of magnitude)."""
    return format_interval(mean_ci([r[key] for r in sel]), 3, significant=True)


def _markdown(cfg: UniversalityConfig, tables: dict[str, str], timing: dict[str, Any]) -> str:
    parts = [
        "# Universality: the two-point effective theory (van Rossem & Saxe, arXiv:2402.09142)",
        "",
        (
            f"Two points (‖Δx‖ = {cfg.input_distance}, ‖Δy*‖ = {cfg.target_distance}, d_in = {cfg.d_in}, d_out = {cfg.d_out}), "
            f"squared loss, full-batch gradient descent at lr = {cfg.lr_factor}/λ_max(NTK) (flow time t = Σ lr). "
            f"Networks: mlp ({cfg.depth} Linear × {cfg.width}), resmlp ({cfg.depth - 2} residual blocks × {cfg.width}), "
            f"cnn1d ({cfg.cnn_depth - 1} conv × {cfg.channels} channels, flattened, Linear readout); h = input of the middle weight layer. "
            f"Init: He-normal × {cfg.rich_scale} (rich) / × {cfg.lazy_scale} (lazy). "
            f"Seeds {list(cfg.seeds)}; mean ± 95% Student-t interval."
        ),
        "",
        (
            "Rates (η_h, η_y) fitted by least squares on the integrated ODE; R² per trajectory; h_∞ predicted by the closed form "
            "from the fitted rates and the measured (h_0, y_0); 'early fit' uses only the trajectory until the loss falls to "
            f"{cfg.early_loss} of its initial value. C drift = range(C) / (range(y/h) + (η_y/k_h) range(h)) with C = y/h − η_y h/k_h along the measured "
            "trajectory (0 = conserved, 1 = no compensation). R² y/h~h: linearity of y/h in h, the conservation law read off the data without a fit in time; "
            "slope / (η_y/k_h): that line's slope over the ratio the time fit gives (1 = consistent). NRMSE = RMS residual / max|X| "
            "(R² h is uninformative where h barely moves, as in the lazy regime)."
        ),
        "",
        tables["main"],
    ]
    if tables["arms"]:
        parts += [
            "",
            (
                f"## The four arms ({cfg.arms_arch}, {cfg.arms_regime}; weight decay {cfg.weight_decay}, noise {cfg.noise}, "
                f"alignment loss weight {cfg.loss_weight} on {', '.join(cfg.relations)})"
            ),
            "",
            (
                "The theory assumes deterministic gradient flow on the squared loss without decay: the alignment loss changes the "
                "objective (and with two samples its moments have rank ≤ 1), NoiseCalibrated adds SGD-shaped noise (random per-sample "
                "loss weights) and, when weight decay > 0, decay. Neither case is covered by the theory. Same data, initialisation, "
                "step-size and stopping rule per seed; what happens to the fit:"
            ),
            "",
            tables["arms"],
        ]
    load = ", ".join(f"{v:.1f}" for v in timing["load_average"])
    parts += [
        "",
        (
            f"Wall time {timing['wall_s']:.0f} s, CPU time {timing['cpu_s']:.0f} s ({cfg.threads} thread; load average "
            f"{load} on {os.cpu_count()} CPUs at the end, i.e. a shared machine when above the CPU count)."
        ),
        "",
    ]
    return "\n".join(parts)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_trajectories(cfg: UniversalityConfig, runs: list[dict[str, Any]], path: Path) -> None:
    """Measured h, y, w (solid) and the fitted ODE (dashed), first seed of every (net, regime)."""
    plt = _plt()
    cells = [(a, g) for a in cfg.archs for g in cfg.regimes]
    fig, axes = plt.subplots(len(cfg.archs), len(cfg.regimes), figsize=(5 * len(cfg.regimes), 3 * len(cfg.archs)), squeeze=False)
    for ax, (arch, regime) in zip(axes.flat, cells):
        r = next(r for r in runs if r["arch"] == arch and r["regime"] == regime)
        tr = r["trajectory"]
        t = np.array(tr["t"])
        traj = np.array([tr["h"], tr["y"], tr["w"]])
        sim = integrate_two_point(t, traj[:, 0], r["k_h"], r["eta_y"], r["dy2"])
        for i, (name, color) in enumerate(zip(("h", "y", "w"), ("tab:blue", "tab:orange", "tab:green"))):
            ax.plot(t, traj[i], color=color, label=f"{name} measured")
            ax.plot(t, sim[i], color=color, ls="--", label=f"{name} theory")
        ax.axhline(r["h_inf_pred"], color="tab:blue", ls=":", lw=1, label="h_∞ predicted")
        ax.set_title(f"{arch}, {regime} (seed {r['seed']}): R² h {r['r2_h']:.2f}, y {r['r2_y']:.2f}, w {r['r2_w']:.2f}", fontsize=9)
        ax.set_xlabel("flow time t = Σ lr")
    axes.flat[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_h_inf(cfg: UniversalityConfig, runs: list[dict[str, Any]], arm_runs: list[dict[str, Any]], path: Path) -> None:
    """Predicted vs measured final representational distance (log-log), every run; arms on the right."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2 if arm_runs else 1, figsize=(10 if arm_runs else 5, 4.5), squeeze=False)
    ax = axes[0, 0]
    markers = {"mlp": "o", "resmlp": "s", "cnn1d": "^"}
    for r in runs:
        color = "tab:red" if r["regime"] == "rich" else "tab:blue"
        ax.scatter(r["h_final"], r["h_inf_pred"], marker=markers[r["arch"]], color=color, alpha=0.8)
        ax.scatter(r["h_final"], r["h_inf_pred_early"], marker=markers[r["arch"]], facecolors="none", edgecolors=color, alpha=0.8)
    vals = [v for r in runs for v in (r["h_final"], r["h_inf_pred"], r["h_inf_pred_early"]) if math.isfinite(v) and v > 0]
    lo, hi = min(vals) / 1.5, max(vals) * 1.5
    ax.plot([lo, hi], [lo, hi], color="k", lw=1)
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel="measured h_T", ylabel="predicted h_∞")
    for arch, m in markers.items():
        if arch in cfg.archs:
            ax.scatter([], [], marker=m, color="gray", label=arch)
    ax.scatter([], [], color="tab:red", label="rich")
    ax.scatter([], [], color="tab:blue", label="lazy")
    ax.scatter([], [], facecolors="none", edgecolors="gray", label="early-window fit")
    ax.legend(fontsize=7)
    ax.set_title("final representational distance ‖h_B − h_A‖²")
    if arm_runs:
        ax = axes[0, 1]
        for i, arm in enumerate(cfg.arms):
            sel = [r for r in arm_runs if r["arm"] == arm]
            ax.scatter([i] * len(sel), [r["h_final"] for r in sel], color=ARM_COLORS.get(arm, "k"), marker="o", label="measured h_T" if i == 0 else None)
            ax.scatter([i + 0.15] * len(sel), [r["h_inf_pred"] for r in sel], color=ARM_COLORS.get(arm, "k"), marker="x", label="predicted h_∞" if i == 0 else None)
        ax.set_xticks(range(len(cfg.arms)), cfg.arms)
        ax.set_ylabel("‖h_B − h_A‖²")
        ax.set_title(f"arms on {cfg.arms_arch}, {cfg.arms_regime}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_conserved(cfg: UniversalityConfig, runs: list[dict[str, Any]], path: Path) -> None:
    """``y/h`` against ``h`` along every measured trajectory (solid) and the line ``C + (η_y/k_h) h`` of
    the conservation law with the fitted rates through the initial point (dashed); one panel per cell."""
    plt = _plt()
    fig, axes = plt.subplots(len(cfg.regimes), len(cfg.archs), figsize=(4.2 * len(cfg.archs), 3.4 * len(cfg.regimes)), squeeze=False)
    colors = plt.get_cmap("tab10")
    for row, regime in enumerate(cfg.regimes):
        for col, arch in enumerate(cfg.archs):
            ax = axes[row, col]
            for i, r in enumerate(r for r in runs if r["arch"] == arch and r["regime"] == regime):
                h, y = np.array(r["trajectory"]["h"]), np.array(r["trajectory"]["y"])
                ax.plot(h, y / h, color=colors(i), label=f"seed {r['seed']}")
                hs = np.linspace(h.min(), h.max(), 20)
                ax.plot(hs, y[0] / h[0] + r["eta_y"] / r["k_h"] * (hs - h[0]), color=colors(i), ls="--", lw=1)
            ax.set(xlabel="h = ‖h_B − h_A‖²", ylabel="y / h", title=f"{arch}, {regime}")
            ax.title.set_fontsize(9)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("conservation law: y/h − (η_y/k_h) h constant (dashed: fitted rates)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> UniversalityConfig:
    p = recipe_parser(__doc__, arms=ARMS)
    p.add_argument("--archs", nargs="+", choices=ARCHS)
    p.add_argument("--regimes", nargs="+", choices=REGIMES)
    p.add_argument("--width", type=int)
    p.add_argument("--depth", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--threads", type=int)
    return config_from_args(UniversalityConfig, p, argv, QUICK)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
