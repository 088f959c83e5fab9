"""NoiseCalibrated: SGD-shaped gradient noise balanced against decoupled weight decay, per layer.

The mechanism behind canonical representations is a balance, on every layer ``h_b = W h_a + b``,
between weight decay that contracts the weight Gram matrices and gradient noise that expands them
(theory §5; Ziyin, Wang, Li & Wu, arXiv:2402.07193; Ziyin, Chuang, Galanti & Poggio,
arXiv:2410.03006). Large batches and adaptive optimizers lose much of SGD's own noise. The wrapper
gives any ``torch.optim`` optimizer

* **structured noise** added to the gradient of every tapped layer before the base step,

      ξ_W = σ · sqrt(B/m) · Σ_{b∈R} ε_b Σ_t δ_{b,t} h_{a,b,t}ᵀ,     ξ_bias = σ · sqrt(B/m) · Σ_{b∈R} ε_b Σ_t δ_{b,t}

  with ``δ = ∂L/∂h_b`` the gradient that reaches the layer output (the loss as backpropagated),
  ``ε_b = ±1`` Rademacher signs, one per batch element ``b`` and shared by all layers and positions
  ``t`` of that element, and ``R`` a uniform random subset of ``m = min(sketch, B)`` of the ``B`` batch
  elements (shared by all layers). Given the batch, its covariance is exactly

      Cov[ξ] = σ² Σ_b vec(∇L_b) vec(∇L_b)ᵀ,          ∇L_b = sample b's term of the batch gradient,

  jointly over all tapped layers (with a per-layer ``σ_l``: ``σ_l σ_l'`` on the cross blocks). For a
  mean loss ``L = (1/S) Σ_b ℓ_b`` this is ``(σ²/S) E_b[vec ∇ℓ_b vec ∇ℓ_bᵀ]``: σ² times the per-sample
  gradient second moment that SGD's minibatch noise carries (theory §5's uncentred form), i.e. the
  noise of random per-sample loss weights ``1 + σ ε_b``. It is the same for any ``m``; the sketch only
  saves compute (one ``m``-row matmul per layer instead of the ``B``-row ones of the backward pass).
* **decoupled weight decay** ``W ← (1 − η_eff γ) W`` before the base step on the parameters chosen by
  ``decay`` (default: every parameter with ≥ 2 dims — weight matrices, conv kernels, embeddings —
  never biases or norm scales), with ``η_eff`` from :func:`effective_lr`.
* an **online balance** per layer (:class:`~canonreg.functional.BalanceTerms`) and, with
  ``noise="auto"``, a controller that sets ``σ_l`` per layer so that ``noise / decay`` reaches
  ``target_share``.

Scaling conventions: ``ξ`` is added to ``.grad``, so the base optimizer multiplies it by the learning
rate, accumulates it in momentum (long-run gain ``1/(1−β)``) and, for Adam, preconditions it — exactly
as it treats SGD's own noise. At fixed ``σ`` the injected covariance falls as ``1/S`` like SGD's own:
``σ²`` is the injected noise in units of SGD's noise at the current batch size, and the total noise
second moment is that of SGD at batch size ``≈ S / (1 + σ²)``.
"""

from __future__ import annotations

import functools
import math
import sys
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import errors
from .capture import Backward, Capture, LayerCall, Policy, handle_nonfinite
from .errors import CanonRegError, renamed_arguments
from .functional import BalanceTerms
from .layers import LayerSpec, _display, world_size
from .moments import _absmax
from .noise_control import (
    LayerBalanceState,
    balance_from_state,
    controller_step,
    noise_share,
    ramped_target,
    update_balance_state,
)
from .taps import LayerTap, matrix_view, read_weight, to_weight_layout, views_within

__all__ = [
    "DecayRule",
    "LayerBalanceState",
    "NoiseCalibrated",
    "adam_denominator",
    "balance_from_state",
    "controller_step",
    "effective_lr",
    "noise_factors",
    "noise_share",
    "per_sample_noise",
    "ramped_target",
    "update_balance_state",
]

DecayRule = Literal["matrices", "layers"] | Callable[[str, Tensor], bool]
NoiseMode = float | Literal["auto"]

#: Keys the wrapper adds to every param group (``setdefault``: a group that sets one keeps it).
GROUP_KEYS: tuple[str, ...] = ("nc_weight_decay", "nc_noise", "nc_target_share")

#: Default target noise share for ``noise="auto"``: accuracy-neutral on the MNIST-1D benchmark
#: (``benchmarks/optim_effect.py``), where τ = 1 — the share small-batch SGD reaches — cost 8 points (SGD)
#: and 13 points (Adam) of test accuracy at batch 512.
DEFAULT_TARGET_SHARE = 0.3


# ---------------------------------------------------------------------------------------------
# Pure functions: the noise and the step size (the balance EMAs and the controller: canonreg.noise_control).
# ---------------------------------------------------------------------------------------------


def per_sample_noise(delta: Tensor, inputs: Tensor, weights: Tensor, *, bias: bool = True) -> tuple[Tensor, Tensor | None]:
    """Weighted sum of per-row gradient contributions of one affine layer.

        N_W = Σ_r w_r δ_r h_rᵀ,     N_b = Σ_r w_r δ_r

    With ``w_r = sqrt(B/m) ε_b(r)`` (Rademacher sign of the row's batch element, sketch rescaling) this
    is the unit-σ noise of :class:`NoiseCalibrated`; with ``w_r = 1`` it is the layer's batch gradient.

    Args:
        delta: ``(n, d_b)`` output-gradient rows ``δ_r = ∂L/∂h_b``.
        inputs: ``(n, d_a)`` input rows ``h_r``.
        weights: ``(n,)`` row weights ``w_r``.
        bias: also return ``N_b``.

    Returns:
        ``(N_W, N_b)`` of shapes ``(d_b, d_a)`` and ``(d_b,)`` (``N_b`` is None when ``bias=False``).

    Example:
        >>> n_w, n_b = per_sample_noise(torch.randn(4, 2), torch.randn(4, 3), torch.ones(4))
        >>> n_w.shape, n_b.shape
        (torch.Size([2, 3]), torch.Size([2]))
    """
    a, n_b = noise_factors(delta, inputs, weights, bias=bias)
    return a.T @ inputs, n_b


def noise_factors(delta: Tensor, inputs: Tensor, weights: Tensor, *, bias: bool = True) -> tuple[Tensor, Tensor | None]:
    """The factored form of :func:`per_sample_noise`: ``A = w ⊙ δ`` (rows scaled) with ``N_W = Aᵀ H``.

    Returns ``(A, N_b)``: ``A`` of shape ``(n, d_b)``, ``N_b = Σ_r A_r`` (None when ``bias=False``).
    """
    if delta.dim() != 2 or inputs.dim() != 2 or weights.dim() != 1 or not (delta.shape[0] == inputs.shape[0] == weights.shape[0]):
        raise ValueError(
            "Expected `delta` (n, d_b), `inputs` (n, d_a) and `weights` (n,) with the same n, but got "
            f"{tuple(delta.shape)}, {tuple(inputs.shape)} and {tuple(weights.shape)}"
        )
    a = delta * weights.unsqueeze(1)
    return a, (a.sum(0) if bias else None)


def effective_lr(group: Mapping[str, Any]) -> float:
    """Long-run step size ``η_eff`` of a param group: what multiplies a persistent gradient.

        η_eff = lr · (1 − dampening) / (1 − β)      SGD-style groups with ``momentum = β > 0``
        η_eff = lr                                   everything else (plain SGD, Adam, AdamW, ...)

    Momentum β rescales η to η/(1−β) (theory §5); Adam's first moment is an average (gain 1), its
    per-coordinate scale is the preconditioner :func:`adam_denominator`. The decoupled decay uses
    ``η_eff``, so with SGD + momentum ``weight_decay=γ`` has the long-run strength of SGD's own coupled
    ``weight_decay=γ``, and with Adam it is AdamW's ``W ← (1 − lr γ) W``.
    """
    lr = float(group["lr"])
    momentum = group.get("momentum", 0.0)
    if "betas" not in group and isinstance(momentum, (int, float)) and momentum > 0:
        return lr * (1.0 - float(group.get("dampening", 0.0))) / (1.0 - float(momentum))
    return lr


def adam_denominator(group: Mapping[str, Any], state: Mapping[str, Any], rows: Tensor | None = None) -> Tensor | None:
    """Adam's per-coordinate denominator ``sqrt(v̂) + ε`` for one parameter, or None.

        v̂ = v / (1 − β₂^t)   (``max_exp_avg_sq`` with amsgrad),   update = −lr m̂ / (sqrt(v̂) + ε)

    so the preconditioned step size of a coordinate is ``P = lr / (sqrt(v̂) + ε)``. Returns None for
    groups without ``betas``/``eps`` or before the optimizer has state (first step): the caller then
    uses the scalar :func:`effective_lr`.

    Args:
        group, state: the parameter's param group and optimizer state.
        rows: only these rows of the parameter viewed as ``(d_b, -1)`` (None = all, in its shape).
    """
    if not _is_adam_group(group) or "exp_avg_sq" not in state or "step" not in state:
        return None
    v = state["max_exp_avg_sq"] if group.get("amsgrad", False) and "max_exp_avg_sq" in state else state["exp_avg_sq"]
    step = float(state["step"])
    if step < 1:
        return None
    if rows is not None:
        v = v.reshape(v.shape[0], -1).index_select(0, rows)
    bc2 = 1.0 - float(group["betas"][1]) ** step
    return (v / bc2).sqrt_().add_(float(group["eps"]))


def _step_sign(group: Mapping[str, Any]) -> float:
    """The sign of the base step along the gradient: −1 (descent), +1 for a ``maximize=True`` group (ascent)."""
    return 1.0 if group.get("maximize", False) else -1.0


def _is_adam_group(group: Mapping[str, Any]) -> bool:
    return "betas" in group and "eps" in group


# ---------------------------------------------------------------------------------------------
# The wrapper.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrapperConfig:
    """NoiseCalibrated's own settings (validated, with normalised types); the arguments of the same
    name in :class:`NoiseCalibrated` document each field. Param-group hyperparameters (``weight_decay``,
    ``noise``, ``target_share``) are not here: they live in the param groups (``GROUP_KEYS``).

    Pickled wrappers store it as a plain dict of these names (:meth:`as_dict`, :meth:`from_dict`), the
    layout the wrapper has always written.
    """

    layers: LayerSpec = None
    decay: DecayRule = "matrices"
    sketch: int | None = 32
    gain: float = 0.1
    ema_decay: float = 0.95
    max_noise: float = 10.0
    target_ramp: float = 1.0
    ramp_steps: int = 200
    track_balance: bool = True
    grad_scaler: torch.amp.GradScaler | None = None
    nonfinite: Policy = "error"
    taps: dict[type[nn.Module], LayerTap] | None = None
    seed: int = 0

    @classmethod
    def checked(cls, **values: Any) -> WrapperConfig:
        """Validate the raw arguments (each error naming its argument) and normalise their types."""
        _check_config(values)
        for k in ("gain", "ema_decay", "max_noise", "target_ramp"):
            values[k] = float(values[k])
        values.update(ramp_steps=int(values["ramp_steps"]), track_balance=bool(values["track_balance"]), seed=int(values["seed"]))
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """``{field: value}`` by reference (no copies: the grad scaler and taps stay the caller's objects)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> WrapperConfig:
        """Read a stored config dict, also of earlier versions: ``ema`` is ``ema_decay`` (renamed), and a
        config without ``ramp_steps`` (before it existed) ramps by decay time only (``ramp_steps=0``)."""
        values = dict(config)
        if "ema" in values:  # pickled before `ema` was renamed `ema_decay`
            values["ema_decay"] = values.pop("ema")
        values.setdefault("ramp_steps", 0)
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"Expected a stored NoiseCalibrated config with keys of {cls.__name__}, but it has unknown keys {unknown}")
        return cls(**values)


@dataclass
class _Layer:
    """Runtime record of one tapped layer: its parameters and this step's unit-noise accumulators."""

    name: str
    module: nn.Module
    tap: LayerTap
    weight: nn.Parameter
    bias: nn.Parameter | None
    group: dict[str, Any]
    noise_w: Tensor | None = None  # N_W (d_b, d_a) once materialised
    noise_b: Tensor | None = None
    # Before that, N_W = Σ aᵀ x over these (a = w ⊙ δ rows (k, d_b), x = input rows (k, d_a)); never
    # both. Kept factored while k (d_a + d_b) < d_a d_b, so ‖N‖², its sketch rows and the injection
    # never build a d_b × d_a temporary (the injection is one addmm into .grad).
    factors: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    samples: int = 0
    # the passes (draws) through the layer since the last step: a layer called twice, or two backward passes
    # through one graph, are one pass of one batch; more than one is gradient accumulation
    seen: set[int] = field(default_factory=set)
    # Keep N_W factored while that is cheaper (False: always materialise). Private: tests that compare
    # the two paths set it on each layer of a wrapper (``opt._layers[name].factored = False``).
    factored: bool = True

    def clear(self) -> None:
        self.noise_w = None
        self.noise_b = None
        self.factors = []
        self.samples = 0
        self.seen = set()

    @property
    def captured(self) -> bool:
        return self.noise_w is not None or bool(self.factors)

    @property
    def sliced(self) -> bool:
        """``W`` is part of its parameter (MHA's q, k, v: rows of ``in_proj_weight``)."""
        return read_weight(self.tap, self.module).numel() < self.weight.numel()

    def flat(self, t: Tensor) -> Tensor:
        """This layer's entries of ``t`` (shaped like the weight parameter), flattened: all of ``t`` unless sliced."""
        return self.matrix(t).reshape(-1) if self.sliced else t.reshape(-1)

    def bias_part(self, t: Tensor) -> Tensor:
        """This layer's entries of ``t`` (shaped like the bias parameter): a view (all of ``t`` unless sliced)."""
        b = self.tap.bias(self.module)
        assert b is not None and self.bias is not None
        if b.numel() == self.bias.numel():
            return t
        start = b.storage_offset() - self.bias.storage_offset()
        return t[start : start + b.numel()]

    def add_noise(self, a: Tensor, x: Tensor, n_b: Tensor | None) -> None:
        """``N_W += aᵀ x``, ``N_b += n_b``: factored while that is cheaper, else materialised."""
        self.factors.append((a, x))
        rows = sum(f[0].shape[0] for f in self.factors)
        if not (self.factored and self.noise_w is None and rows * (a.shape[1] + x.shape[1]) < a.shape[1] * x.shape[1]):
            self.materialize()
        if n_b is not None:
            self.noise_b = n_b if self.noise_b is None else self.noise_b.add_(n_b)

    def stacked(self) -> tuple[Tensor, Tensor]:
        """All factors as one pair ``(A, X)`` with ``N_W = Aᵀ X`` (while not materialised)."""
        if len(self.factors) == 1:
            return self.factors[0]
        return torch.cat([a for a, _ in self.factors]), torch.cat([x for _, x in self.factors])

    def materialize(self) -> Tensor | None:
        """Fold the factors into ``noise_w`` and return it."""
        if self.factors:
            a, x = self.stacked()
            n_w = a.T @ x
            self.noise_w = n_w if self.noise_w is None else self.noise_w.add_(n_w)
            self.factors = []
        return self.noise_w

    def scale_(self, c: float) -> None:
        """``N ← c N`` (GradScaler's unscale)."""
        if self.noise_w is not None:
            self.noise_w.mul_(c)
        for a, _ in self.factors:
            a.mul_(c)
        if self.noise_b is not None:
            self.noise_b.mul_(c)

    @property
    def plain(self) -> bool:
        """``W`` is the parameter itself or a row-major reshape of it (Linear, Conv): row ``i`` of the
        ``(d_b, d_a)`` matrix is the parameter's row ``i``. Not so for transposed layouts (GPT-2's Conv1D)."""
        wm = read_weight(self.tap, self.module)
        return wm.is_contiguous() and wm.shape[0] == self.weight.shape[0] and wm.data_ptr() == self.weight.data_ptr()

    def matrix(self, t: Tensor) -> Tensor:
        """``t`` (shaped like the weight parameter) in the ``(d_b, d_a)`` layout (:func:`~canonreg.taps.matrix_view`)."""
        return matrix_view(self.tap, self.module, t)

    def inject(self, grad: Tensor, sigma: float) -> None:
        """``grad += σ N_W`` with ``grad`` the weight parameter's gradient (any layout the tap maps;
        one addmm into the ``(d_b, d_a)`` view when factored)."""
        gm = self.matrix(grad)
        is_view = gm.untyped_storage().data_ptr() == grad.untyped_storage().data_ptr()
        if is_view and self.factors and grad.dtype == self.factors[0][0].dtype:
            a, x = self.stacked()
            gm.addmm_(a.T, x, alpha=sigma)
            return
        n_w = self.materialize()
        assert n_w is not None
        if is_view:
            gm.add_(n_w.to(grad.dtype), alpha=sigma)
        else:
            grad.add_(to_weight_layout(self.tap, self.module, n_w).to(grad.dtype), alpha=sigma)


def _called_by_grad_scaler(depth: int = 6) -> bool:
    """Whether an enabled ``torch.amp.GradScaler`` is stepping the optimizer (its ``_maybe_opt_step`` within
    ``depth`` frames; a disabled scaler calls ``step()`` directly). Reads code objects only: touching a
    frame's ``f_locals`` would keep the caller's locals alive."""
    frame = sys._getframe(1)
    for _ in range(depth):
        frame = frame.f_back  # type: ignore[assignment]
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name == "_maybe_opt_step" and code.co_filename.endswith("grad_scaler.py"):
            return True
    return False


def _set_group_hyperparameters(optimizer: Optimizer, hyper: Mapping[str, Any]) -> Callable[[], None]:
    """Write the wrapper's hyperparameters into ``optimizer.defaults`` and every param group; returns the undo.

    A group's own value wins where it differs from the previous default (set per group by the user); a value
    equal to it (left by an earlier wrap of the same optimizer) or missing takes the new one.
    """
    saved = [(d, {k: d[k] for k in hyper if k in d}) for d in [optimizer.defaults, *optimizer.param_groups]]
    for k, v in hyper.items():
        old = optimizer.defaults.get(k, _UNSET)
        optimizer.defaults[k] = v
        for group in optimizer.param_groups:
            if group.get(k, _UNSET) is _UNSET or (old is not _UNSET and group[k] == old):
                group[k] = v

    def restore() -> None:
        for d, before in saved:
            for k in hyper:
                if k in before:
                    d[k] = before[k]
                else:
                    d.pop(k, None)

    return restore


_UNSET = object()


def _noise_hook(
    ref: weakref.ref[NoiseCalibrated], layer: _Layer, rows: Tensor, weights: Tensor, batch: int, pass_id: int, delta: Tensor
) -> None:
    """A layer call's backward half (:meth:`NoiseCalibrated._on_grad`); then a redraw queued for the end of
    this backward pass. Holds the wrapper weakly (the autograd graph must not keep it alive)."""
    NoiseCalibrated._on_grad(layer, rows, weights, batch, pass_id, delta)
    owner = ref()
    if owner is not None:
        owner._queue_redraw()


def _layer_parameters(name: str, module: nn.Module, tap: LayerTap) -> tuple[nn.Parameter, nn.Parameter | None]:
    """The parameters behind ``tap.weight(module)`` and ``tap.bias(module)``: whole ones, reshaped or
    transposed views, or row slices (MHA's q, k, v in ``in_proj_weight``/``in_proj_bias``).

    Parameters of submodules count (MHA's ``out_proj.weight`` for the sub-layer ``attn[out]``).
    """
    own = list(module.parameters())

    def find(t: Tensor) -> nn.Parameter | None:
        return next((p for p in own if views_within(t, p)), None)

    weight = find(read_weight(tap, module))
    if weight is None:
        raise CanonRegError(
            f"Layer {_display(name)!r} ({type(module).__name__}): its tap's weight is not a parameter of the module "
            "or a view of one, so NoiseCalibrated cannot tell which parameter receives the noise. "
            "Exclude it with `layers=`."
        )
    b = tap.bias(module)
    bias = None if b is None else find(b)
    if b is not None and bias is None:
        raise CanonRegError(f"Layer {_display(name)!r}: its tap's bias is not a parameter of the module; exclude it with `layers=`")
    return weight, bias


def _has_memory(group: Mapping[str, Any]) -> bool:
    """The group's step is not the current gradient alone (SGD momentum > 0, or Adam-style)."""
    m = group.get("momentum", 0.0)
    return _is_adam_group(group) or (isinstance(m, (int, float)) and m > 0)


def _all_finite(layer: _Layer) -> Tensor:
    """A 0-dim bool tensor: the layer's weight and bias gradients are finite everywhere (no host sync).

    ``max |g| < inf`` per gradient: one reduction (which propagates NaN) and one comparison, instead of
    ``isfinite(g).all()``'s four passes over ``g``.
    """
    ok = _absmax(layer.weight.grad) < math.inf if layer.weight.grad is not None else torch.ones((), dtype=torch.bool)
    if layer.bias is not None and layer.bias.grad is not None:
        ok = ok & (_absmax(layer.bias.grad) < math.inf)
    return ok


def _output_rows(t: Tensor, d_b: int, rows: Tensor | None) -> Tensor:
    """The output rows ``rows`` (all when None) of a weight-shaped ``t`` viewed as ``(d_b, -1)``, flattened."""
    t = t.reshape(d_b, -1)
    return (t if rows is None else t.index_select(0, rows)).reshape(-1)


_DDP_REFUSAL = (
    "NoiseCalibrated does not support data-parallel training yet: each rank would add noise built from its own batch "
    "(and noise='auto' would steer each rank by its own balance), and the replicas would drift apart. Use noise=0 "
    "(decay and balance only)"
)


def _distributed() -> bool:
    """More than one ``torch.distributed`` process (a module function: tests patch it)."""
    return world_size() > 1


class NoiseCalibrated(Optimizer):
    """Wrap an optimizer: add SGD-shaped gradient noise and decoupled weight decay, balanced per layer.

    Each ``step()`` does, for every tapped layer ``l`` of ``model`` (default: every Linear/Conv layer)
    and every decaying parameter ``p``:

        ∇W_l ← ∇W_l + σ_l ξ̂_l                (ξ̂: unit structured noise, see the module docstring)
        p    ← (1 − η_eff γ) p                 (decoupled decay, η_eff = :func:`effective_lr`)
        base_optimizer.step()

    with ``Cov[σ ξ̂] = σ² Σ_b vec(∇L_b) vec(∇L_b)ᵀ`` — σ² times SGD's own noise covariance at this
    batch (theory §5; arXiv:2402.07193, arXiv:2410.03006). The noise is added to the gradient, so it is
    multiplied by the learning rate like the gradient, goes through momentum and is preconditioned by
    Adam. After ``step()`` the tapped layers' ``.grad`` hold the noised gradient the base step used.

    Symbol → argument: ``σ`` = ``noise`` (or per layer from the controller with ``"auto"``),
    ``γ`` = ``weight_decay``, ``τ`` = ``target_share``, ``m`` = ``sketch``, ``k`` = ``gain``.

    ``noise="auto"`` sets ``σ_l`` per layer so that the measured noise share
    ``noise / decay = (1 + σ_l²) n₁ / D`` (:func:`noise_share`; SGD's own noise counts as ``σ = 0``)
    reaches ``τ`` (:func:`controller_step`), with ``τ`` ramped in over the first ``target_ramp``
    decay times or ``ramp_steps`` steps, whichever ends first (:func:`ramped_target`). The controller
    raises σ slowly and cuts it at once when a fast estimate of the share overshoots; it backs off
    toward σ = 0 where noise cannot help: where the target would need ``σ > max_noise`` (SGD's own
    share is tiny, the drift balances the decay) or while ‖W‖² grows faster than the decay contracts
    it. ``τ = 1`` asks the noise alone to balance the decay of ``Tr WᵀW`` (SGD at batch 32 sits near
    there); since at stationarity decay ≈ drift + noise + signal, ``τ > 1`` needs a drift that shrinks
    the weights against the noise and is rarely reachable. The terms add up: :attr:`balance` reports
    decay, drift, noise and the squared-mean-gradient ``signal`` (measured from the step the base
    optimizer really took, so momentum and Adam are accounted for), and
    :attr:`LayerBalanceState.growth` the measured change of ‖W‖² they must match. What the rules do
    to the post-training α and accuracy on MNIST-1D is in ``benchmarks/optim_effect.py`` and its
    results. With Adam the share is measured in the preconditioned geometry and saturates in σ,
    since the injected noise also raises Adam's ``v̂``.

    Weight decay is applied once: a base param group with its own ``weight_decay > 0`` on parameters
    the wrapper decays too is refused (ValueError naming ``param_groups[i]['weight_decay']``); build
    the base with ``weight_decay=0`` (AdamW's default is 0.01) or give the wrapper ``weight_decay=0``.
    Gradient accumulation (several backward passes before ``step()``, each of ``loss / k``) is
    detected (``balance_state[l].micro_batches``) and handled: the noise and the balance are those of
    the whole accumulated batch.

    The wrapper is a real ``torch.optim.Optimizer`` around the *instance* it is given:
    ``param_groups``, ``state`` and ``defaults`` are the base optimizer's (by reference, also after
    ``load_state_dict``); its hyperparameters live in every param group as ``nc_weight_decay``,
    ``nc_noise`` and ``nc_target_share`` (per-group values set before wrapping win; a refused wrap leaves
    the optimizer untouched), so LR and
    other schedulers and ``add_param_group`` work. ``state_dict()`` is the base optimizer's plus a
    ``"noise_calibrated"`` entry (noise RNG state, per-layer EMAs and controller state), so
    save/restore continues a run exactly.

    Hooks: constructing the wrapper with a model installs forward hooks (owned; ``detach()`` removes
    them, ``attach()`` re-installs; both return the wrapper, as for the alignment loss). They coexist with a :class:`~canonreg.CRHMonitor` and an
    alignment loss on the same model; a second NoiseCalibrated on one model raises. Random signs and
    the sketch subset are drawn once per grad-enabled forward call of ``model`` (so micro-batches of a
    gradient-accumulation step get independent draws); the batch dimension of each layer input is
    dim 0. Pickling or deep-copying the wrapper copies the model with it (one pickle keeps the
    optimizer's parameters and the model's identical) and re-installs the hooks on the copy; the
    hooks themselves pickle to no-ops, so ``copy.deepcopy(model)`` or ``torch.save(model)`` while the
    wrapper is attached give an unhooked model.

    GradScaler: pass ``grad_scaler=scaler`` and call ``scaler.step(opt)``. The noise and the balance
    use the unscaled gradients (the captured ones are divided by ``scaler.get_scale()``); a step the
    scaler skips (inf/NaN) never reaches ``step()``, so it injects and decays nothing, and its captures
    are dropped by the next ``zero_grad()`` (or the next forward after ``set_to_none`` zeroing).

    Args:
        optimizer: the base optimizer instance (SGD, SGD + momentum, Adam, AdamW, ...).
        model: the model whose layers receive noise; needed for ``noise != 0`` and for ``balance``.
        weight_decay: γ ≥ 0 of the decoupled decay.
        noise: σ ≥ 0 (fixed, in units of SGD's own noise std) or ``"auto"``.
        target_share: τ > 0, the noise share ``"auto"`` aims at.
        target_ramp: the target ramps in linearly over this many decay times ``Σ_t η_eff γ``
            (:func:`ramped_target`; 0 = from the first step).
        ramp_steps: ... or over this many steps, whichever ends first (0 = by decay time only), so that
            the ramp fits runs shorter than one decay time ``1/(η_eff γ)``.
        layers: which layers of ``model`` get noise and balance (see :mod:`canonreg.layers`).
        decay: which parameters decay: ``"matrices"`` (every optimized parameter with ≥ 2 dims; as in
            nanoGPT), ``"layers"`` (only the weights of the tapped layers) or a predicate
            ``(name, param) -> bool`` (names from ``model.named_parameters()``, ``""`` without model).
        sketch: ``m``, batch elements per step used for the noise (None = all). Cost ``≈ m/(3B)`` of a
            layer's forward + backward matmuls. With Adam, also the number of random output rows on
            which the preconditioned balance sums are estimated (unbiased; exact for ``d_b ≤ m``).
        gain: controller gain ``k`` in (0, 1].
        ema_decay: decay β in [0, 1) of the balance measurements' moving averages ``x ← β x + (1 − β) x_t``
            (formerly ``ema``; the old name still works, with a FutureWarning).
        max_noise: upper bound of σ in ``"auto"`` mode.
        track_balance: measure the balance every step (three inner products per layer; with Adam two
            more on ``m`` rows). ``"auto"`` needs it. Modelled in the geometry of ``torch.optim.SGD``
            (momentum, dampening, Nesterov) and ``Adam``/``AdamW``; for other built-in preconditioned
            optimizers (RMSprop, Adagrad, Adamax, RAdam, NAdam, ...) it is not measured (a warning says so)
            and ``"auto"`` is refused. Optimizers from other packages are read by their groups (``betas``
            and ``eps``: Adam, else SGD).
        grad_scaler: the ``torch.amp.GradScaler`` used with this optimizer, if any.
        nonfinite: ``"error" | "warn" | "skip"`` for non-finite values. A non-finite *gradient* of a
            tapped layer (checked on the whole gradient, whatever the sketch) raises CanonRegError, or
            skips the whole step (no noise, decay or base step; counted in ``skipped_steps``) with a
            warning ("warn") or silently ("skip"). A non-finite noise sample with a finite gradient
            raises, or gets no noise for that layer in that step (the base step still runs).
        taps: extra ``{module type: tap}``.
        seed: seed of the noise generator.

    Raises:
        TypeError: ``optimizer`` is a class, not an optimizer, an LBFGS (re-evaluates closures) or a
            NoiseCalibrated.
        ValueError: a negative ``weight_decay``/``noise``, an unknown ``noise`` mode, ``noise`` without
            ``model``, ``"auto"`` without weight decay, model layers whose parameters the optimizer
            does not hold, or a base param group with its own ``weight_decay > 0`` on parameters the
            wrapper decays too (they would decay twice; AdamW's default is 0.01); ``noise="auto"`` with an
            optimizer whose geometry the balance does not model (see ``track_balance``).
        CanonRegError: ``noise`` other than 0 under ``torch.distributed`` with more than one process (here and
            at ``step()``): each rank's noise would come from its own batch; DDP gets ``noise=0`` (decay and
            balance) only.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
        >>> base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> opt = NoiseCalibrated(base, model, weight_decay=5e-4, noise="auto")
        >>> loss = model(torch.randn(64, 8)).square().mean()
        >>> loss.backward(); opt.step(); opt.zero_grad()
        >>> sorted(opt.balance)
        ['0', '2']
    """

    @renamed_arguments(ema="ema_decay")
    def __init__(
        self,
        optimizer: Optimizer,
        model: nn.Module | None = None,
        *,
        weight_decay: float = 0.0,
        noise: NoiseMode = 0.0,
        target_share: float = DEFAULT_TARGET_SHARE,
        target_ramp: float = 1.0,
        ramp_steps: int = 200,
        layers: LayerSpec = None,
        decay: DecayRule = "matrices",
        sketch: int | None = 32,
        gain: float = 0.1,
        ema_decay: float = 0.95,
        max_noise: float = 10.0,
        track_balance: bool = True,
        grad_scaler: torch.amp.GradScaler | None = None,
        nonfinite: Policy = "error",
        taps: dict[type[nn.Module], LayerTap] | None = None,
        seed: int = 0,
    ) -> None:
        _check_base_optimizer(optimizer)
        errors.check_nonnegative("weight_decay", weight_decay)
        _check_noise("noise", noise)
        errors.check_positive("target_share", target_share)
        self._config = WrapperConfig.checked(
            layers=layers, decay=decay, sketch=sketch, gain=gain, ema_decay=ema_decay, max_noise=max_noise,
            target_ramp=target_ramp, ramp_steps=ramp_steps, track_balance=track_balance, grad_scaler=grad_scaler,
            nonfinite=nonfinite, taps=taps, seed=seed,
        )  # fmt: skip
        if noise != 0 and _distributed():
            raise CanonRegError(_DDP_REFUSAL)
        unmodelled = _unmodelled_geometry(optimizer)
        if unmodelled is not None and noise == "auto":
            raise ValueError(
                f"Expected a fixed `noise` strength with {unmodelled}: noise='auto' acts on the measured balance, which "
                "canonreg measures in SGD's and Adam's geometry (torch.optim.SGD, Adam, AdamW); "
                f"{unmodelled}'s preconditioner is not modelled"
            )
        if unmodelled is not None and track_balance:
            warnings.warn(
                f"NoiseCalibrated: the balance terms are measured in SGD's and Adam's geometry; {unmodelled}'s "
                "preconditioner is not modelled, so they are not measured here (balance stays empty). The noise and "
                "the decay work as documented; pass track_balance=False to silence this",
                RuntimeWarning,
                stacklevel=3,  # the caller of NoiseCalibrated(...) (through errors.renamed_arguments)
            )
            track_balance = False
            self._config = replace(self._config, track_balance=False)
        if noise != 0 and model is None:
            raise ValueError(f"Expected `model` to be given with `noise`={noise!r}: the noise is built from the model's hooks")
        if noise == "auto" and not track_balance:
            raise ValueError("Expected `track_balance`=True with `noise`='auto': the controller acts on the measured balance")
        if noise == "auto" and weight_decay == 0:
            raise ValueError("Expected `weight_decay` > 0 with `noise`='auto': the controller balances noise against decay")
        if decay == "layers" and model is None:
            raise ValueError("Expected `model` to be given with `decay`='layers'")
        hyper = {"nc_weight_decay": float(weight_decay), "nc_noise": noise if noise == "auto" else float(noise), "nc_target_share": float(target_share)}
        restore = _set_group_hyperparameters(optimizer, hyper)
        try:
            self._setup(optimizer, model)
            self._check_groups()
            self._gen.manual_seed(int(seed))
            if model is not None:
                self.attach()
        except BaseException:
            restore()  # a refused wrap leaves the base optimizer as it was
            capture = getattr(self, "_capture", None)
            if capture is not None:
                capture.detach()
            raise

    # ------------------------------------------------------------------ construction helpers
    def _setup(self, optimizer: Optimizer, model: nn.Module | None) -> None:
        """Everything but hyperparameter validation (shared by ``__init__`` and unpickling)."""
        self.optimizer = optimizer
        self.model = model
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._warned_capturable_if_run_uncaptured = True
        self._patch_step_function()
        self._gen = torch.Generator()
        self._capture: Capture | None = None
        self._draws: dict[int, tuple[Tensor, Tensor | None]] = {}
        self._device_draws: dict[tuple[int, torch.device], tuple[Tensor, Tensor | None]] = {}
        self._redraw_queued = False
        self._pass = 0  # the current draw's number (counted once per layer in a step's batch)
        self._balance: dict[str, LayerBalanceState] = {}
        self._steps = 0
        self.skipped_steps = 0
        self._layers: dict[str, _Layer] = {}
        self.excluded: dict[str, str] = {}
        self._names: dict[int, str] = {}
        if model is not None:
            self._resolve_layers(model)
        self._balance = {n: LayerBalanceState() for n in self._layers}

    def _resolve_layers(self, model: nn.Module) -> None:
        # No sample mask: the noise mimics the per-sample gradients, which masked positions are part of.
        capture = Capture(
            model, self._config.layers, owner_kind="NoiseCalibrated", on_call=self._on_call, on_root=self._on_root_call,
            taps=self._config.taps, mask=False, nonfinite=None,
        )  # fmt: skip
        groups = self._param_groups_by_id()
        for name, target in list(capture.targets.items()):
            module = target.module
            weight, bias = _layer_parameters(name, module, target.tap)
            if not weight.requires_grad and id(weight) not in groups:
                capture.exclude(name, "its weight does not require grad (frozen) and is not in the optimizer")
                continue
            # a frozen layer whose parameters the optimizer holds is kept: inert while frozen (no capture,
            # no gradient), noise and balance from the step it is unfrozen (gradual unfreezing)
            missing = [what for what, p in (("weight", weight), ("bias", bias)) if p is not None and p.requires_grad and id(p) not in groups]
            if missing:
                raise ValueError(
                    f"Expected the parameters of `model` layer {_display(name)!r} ({', '.join(missing)}) to be in `optimizer`, "
                    "but they are not: build the optimizer from model.parameters(), or choose layers with `layers=`"
                )
            self._layers[name] = _Layer(name, module, target.tap, weight, bias, groups[id(weight)])
        self._capture = capture
        self.excluded = dict(capture.excluded)
        self._names = {id(p): n for n, p in model.named_parameters()}

    def _param_groups_by_id(self) -> dict[int, dict[str, Any]]:
        return {id(p): g for g in self.optimizer.param_groups for p in g["params"]}

    # ------------------------------------------------------------------ Optimizer plumbing (shared by reference)
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer; missing ``nc_*`` keys come from the wrapper's defaults."""
        for k in GROUP_KEYS:
            param_group.setdefault(k, self.defaults[k])
        self.optimizer.add_param_group(param_group)
        try:
            self._check_double_decay(len(self.param_groups) - 1, self.param_groups[-1])
        except ValueError:
            self.optimizer.param_groups.pop()
            raise

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The base optimizer's ``zero_grad``; also drops captured noise of a step that never came (skipped)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for layer in self._layers.values():
            layer.clear()

    def __repr__(self) -> str:
        inner = repr(self.optimizer).replace("\n", "\n  ")
        return f"NoiseCalibrated(\n  {inner},\n  layers={list(map(_display, self._layers))}\n)"

    # ------------------------------------------------------------------ hooks
    @property
    def attached(self) -> bool:
        return self._capture is not None and self._capture.attached

    def attach(self) -> NoiseCalibrated:
        """Install the hooks on ``model`` (idempotent; :class:`~canonreg.capture.Capture`). Raises CanonRegError if
        another NoiseCalibrated holds it. A dropped wrapper's hooks and claim go with it."""
        if self._capture is None:
            raise CanonRegError("This NoiseCalibrated has no model to attach to (it was built with model=None)")
        self._capture.attach()
        return self

    def detach(self) -> NoiseCalibrated:
        """Remove the hooks (idempotent) and return the wrapper; the model is left as it was. Steps with noise then raise."""
        if self._capture is not None:
            self._capture.detach()
        for layer in self._layers.values():
            layer.clear()
        return self

    def _sigma(self, name: str) -> float:
        mode = self._layers[name].group["nc_noise"]
        return self._balance[name].sigma if mode == "auto" else float(mode)

    def _on_root_call(self) -> None:
        if torch.is_grad_enabled():
            self._redraw()

    def _redraw(self) -> None:
        """Forget the draws: the next layer call draws fresh signs (and subset)."""
        self._redraw_queued = False
        self._pass += 1
        self._draws.clear()
        self._device_draws.clear()

    def _queue_redraw(self) -> None:
        """Redraw once the running backward pass ends (a loop that calls submodules, never ``model`` itself,
        still gets fresh signs per forward/backward pass)."""
        if not self._redraw_queued:
            self._redraw_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._redraw)  # type: ignore[attr-defined]

    def _draw(self, batch: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """Per-sample weights ``sqrt(B/m) ε_b`` of the sketch and its subset ``R`` (None = all samples).

        Drawn once per pass and batch size, shared by all layers: a pass begins at a grad-enabled call of
        ``model`` and ends with the backward pass that reaches its layers.
        """
        key = (batch, device)
        if key not in self._device_draws:
            if batch not in self._draws:
                signs = torch.randint(0, 2, (batch,), generator=self._gen).mul_(2).sub_(1).float()
                m = self._config.sketch
                idx = torch.randperm(batch, generator=self._gen)[:m] if m is not None and m < batch else None
                weights = signs if idx is None else signs[idx] * math.sqrt(batch / idx.shape[0])
                self._draws[batch] = (weights, idx)
            weights, idx = self._draws[batch]
            self._device_draws[key] = (weights.to(device), None if idx is None else idx.to(device))
        return self._device_draws[key]

    def _on_call(self, call: LayerCall) -> Backward | None:
        """Forward half of one layer call (:class:`~canonreg.capture.Capture`): the sketch's input rows and signs."""
        layer = self._layers[call.name]
        if not layer.weight.requires_grad:  # frozen now
            return None
        if not (self._config.track_balance or layer.group["nc_noise"] == "auto" or self._sigma(call.name) > 0):
            return None
        if layer.weight.grad is None:  # a new accumulation window: drop what a skipped step left behind
            layer.clear()
        batch = call.batch_size
        weights, idx = self._draw(batch, call.output.device)
        # idx only exists for batch > sketch >= 1: the rows of those batch elements (dim 0) only
        rows = call.input_rows(idx)
        picked = weights.shape[0]
        if rows.shape[0] != picked:  # several rows (positions) per sample share its weight
            if rows.shape[0] % picked:
                raise CanonRegError(
                    f"Layer {_display(call.name)!r}: {rows.shape[0]} input rows do not split into {picked} samples; "
                    "NoiseCalibrated needs sample-major rows (the batch as dim 0 of each layer input)"
                )
            weights = weights.repeat_interleave(rows.shape[0] // picked)
        hook = functools.partial(_noise_hook, weakref.ref(self), layer, rows, weights.to(rows.dtype), batch, self._pass)
        return Backward(hook, idx)

    @staticmethod
    def _on_grad(layer: _Layer, rows: Tensor, weights: Tensor, batch: int, pass_id: int, delta: Tensor) -> None:
        """Backward half: ``N += (w ⊙ δ)ᵀ h`` with ``δ`` the call's output-gradient rows; the batch counted once
        per pass (draw) however many calls and backward passes reach the layer within it."""
        a, n_b = noise_factors(delta, rows, weights, bias=layer.bias is not None)
        layer.add_noise(a, rows, n_b)
        if pass_id not in layer.seen:
            layer.seen.add(pass_id)
            layer.samples += batch

    # ------------------------------------------------------------------ step
    def _decays(self, p: Tensor) -> bool:
        rule = self._config.decay
        if rule == "matrices":
            return p.dim() >= 2
        if rule == "layers":
            return any(p is layer.weight for layer in self._layers.values())
        return bool(rule(self._names.get(id(p), ""), p))

    def _check_groups(self) -> None:
        for i, group in enumerate(self.param_groups):
            for k in GROUP_KEYS:
                group.setdefault(k, self.defaults[k])
            errors.check_nonnegative(f"param_groups[{i}]['nc_weight_decay']", group["nc_weight_decay"])
            _check_noise(f"param_groups[{i}]['nc_noise']", group["nc_noise"])
            if group["nc_noise"] == "auto" and not self._config.track_balance:
                raise ValueError(
                    f"Expected param_groups[{i}]['nc_noise'] to be a fixed strength: 'auto' acts on the measured balance, "
                    "which is not tracked (track_balance=False, or an optimizer whose geometry is not modelled)"
                )
            errors.check_positive(f"param_groups[{i}]['nc_target_share']", group["nc_target_share"])
            self._check_double_decay(i, group)

    def _check_double_decay(self, i: int, group: Mapping[str, Any]) -> None:
        """Refuse a group that the base optimizer decays *and* the wrapper decays (issue 10, item 2).

        Both would shrink the same weights every step — ``(1 − η_eff γ)`` here and the base's own
        ``weight_decay`` (coupled for SGD/Adam, ``(1 − lr λ)`` for AdamW, whose default is 0.01) — so the
        decay would silently be about twice the one asked for, and the balance would count only half.
        """
        own = group.get("weight_decay", 0.0)
        if not (isinstance(own, (int, float)) and own > 0 and float(group["nc_weight_decay"]) > 0):
            return
        if not any(self._decays(p) for p in group["params"]):
            return
        raise ValueError(
            f"Expected the base optimizer's param_groups[{i}]['weight_decay'] to be 0 when NoiseCalibrated decays the same "
            f"parameters (weight_decay={float(group['nc_weight_decay'])!r}), but got {own!r}: the weights would decay twice. "
            f"Build the base optimizer with weight_decay=0 (note torch.optim.AdamW's default is 0.01), or keep the base's "
            f"decay and pass weight_decay=0 to NoiseCalibrated"
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Inject the noise, apply the decoupled decay, run the base step, update balance and controller.

        ``closure`` (re-computing the loss with gradients) is evaluated once, before the noise.
        A step whose tapped gradients are not finite is skipped whole under ``nonfinite="warn"/"skip"``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_groups()
        if self._config.grad_scaler is None and self._layers and _called_by_grad_scaler():
            raise CanonRegError(
                "NoiseCalibrated.step() was called by a torch.amp.GradScaler it was not given: the gradients it captured "
                "in the backward pass carry the loss scale (the noise and the balance would be scaled by it). Pass the "
                "scaler when building the wrapper: NoiseCalibrated(..., grad_scaler=scaler)"
            )
        measured = self._measure_layers()
        if measured is None:  # a non-finite gradient: the step was skipped
            return loss
        active, values = measured
        self._inject_noise(active, values)
        self._decay_and_base_step()
        if self._config.track_balance:
            self._realised_update_terms(active, values)
        self._update_balance(active, values)
        for layer in self._layers.values():
            layer.clear()
        self._steps += 1
        return loss

    def _measure_layers(self) -> tuple[list[tuple[_Layer, float, Tensor]], list[list[float]]] | None:
        """Per tapped layer with a gradient: ``(layer, σ, measurement)`` and the measurements on the host.

        One host sync for all layers. The finiteness of every tapped layer's full gradient is checked here,
        on the gradient itself, never on the sketch's rows (issue 10, item 3); None when the step is skipped.
        """
        groups = self._param_groups_by_id()
        for layer in self._layers.values():  # groups are replaced by load_state_dict: refresh the references
            layer.group = groups.get(id(layer.weight), layer.group)
        scaler = self._config.grad_scaler
        inv_scale = 1.0 / float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        active: list[tuple[_Layer, float, Tensor]] = []
        for layer in self._layers.values():
            w, g = layer.weight, layer.weight.grad
            if g is None or id(w) not in groups:
                continue
            sigma = self._sigma(layer.name)
            if not layer.captured:
                if not bool(_all_finite(layer)):  # a host sync, only on this rare path
                    self._nonfinite_gradient([layer.name])
                    return None
                if sigma > 0 and bool(g.any()):  # a zero gradient (zero_grad(set_to_none=False), layer unused): no noise due
                    raise CanonRegError(
                        f"Layer {_display(layer.name)!r} has a gradient but NoiseCalibrated captured no forward/backward "
                        "through it this step: call the model it is attached to (`opt.attach()` after `detach()`), "
                        "with gradients enabled"
                    )
                continue
            if (sigma > 0 or layer.group["nc_noise"] == "auto") and _distributed():
                raise CanonRegError(_DDP_REFUSAL)
            if inv_scale != 1.0:
                layer.scale_(inv_scale)
            active.append((layer, sigma, self._measure(layer, g)))
        values = torch.stack([v.to("cpu", torch.float64) for _, _, v in active]).tolist() if active else []
        bad = [layer.name for (layer, _, _), v in zip(active, values) if v[-1] != 1.0]
        if bad:
            self._nonfinite_gradient(bad)
            return None
        return active, values

    def _inject_noise(self, active: list[tuple[_Layer, float, Tensor]], values: list[list[float]]) -> None:
        """``∇W ← ∇W + σ N`` (and the bias's share) in every measured layer with σ > 0 and a finite sample."""
        for (layer, sigma, _), (*_terms, n_raw, _g2, _ok) in zip(active, values):
            if not math.isfinite(n_raw):
                self._nonfinite(layer.name)
                continue
            if sigma > 0:
                assert layer.weight.grad is not None
                layer.inject(layer.weight.grad, sigma)
                if layer.bias is not None and layer.bias.grad is not None and layer.noise_b is not None:
                    layer.bias_part(layer.bias.grad).add_(layer.noise_b.to(layer.bias.grad.dtype), alpha=sigma)

    def _decay_and_base_step(self) -> None:
        """``p ← (1 − η_eff γ) p`` on the decaying parameters with a gradient, then the base optimizer's step."""
        for group in self.param_groups:
            gamma = float(group["nc_weight_decay"])
            if gamma == 0:
                continue
            rate = effective_lr(group) * gamma
            params = [p for p in group["params"] if p.grad is not None and self._decays(p)]
            if params:
                torch._foreach_mul_(params, 1.0 - rate)
        self.optimizer.step()

    def _realised_update_terms(self, active: list[tuple[_Layer, float, Tensor]], values: list[list[float]]) -> None:
        """Replace the signal term of momentum / Adam layers by the realised second-order term (one more host sync)."""
        post = [(i, self._update_sq(layer)) for i, (layer, _, _) in enumerate(active) if _has_memory(layer.group)]
        if not post:
            return
        got = torch.stack([t.to("cpu", torch.float64) for _, t in post]).tolist()
        for (i, _), (u2, coef) in zip(post, got):
            _w2, _d, n1_i, _nr, _g2, ok_i = values[i]
            sigma_i = active[i][1]
            values[i] = [_w2, _d, n1_i, _nr, u2 - coef * (1.0 + sigma_i * sigma_i) * n1_i + n1_i, ok_i]

    def _update_balance(self, active: list[tuple[_Layer, float, Tensor]], values: list[list[float]]) -> None:
        """Fold the step's measurements into each layer's EMAs; in ``"auto"`` mode, one controller update."""
        for (layer, sigma, _), (w2, drift, n1, n_raw, g2, _ok) in zip(active, values):
            if not (self._config.track_balance and all(map(math.isfinite, (w2, drift, n1, n_raw, g2)))):
                continue
            group = layer.group
            rate = effective_lr(group) * float(group["nc_weight_decay"]) if self._decays(layer.weight) else 0.0
            st = update_balance_state(
                self._balance[layer.name], weight_sq_norm=w2, drift=drift, unit_noise=n1, unit_noise_raw=n_raw,
                sigma=sigma, decay_rate=rate, batch_size=layer.samples, ema_decay=self._config.ema_decay, grad_sq=g2,
                micro_batches=len(layer.seen),
            )  # fmt: skip
            if group["nc_noise"] == "auto":
                st = replace(st, log1p_sigma2=self._controller(group, st))
            self._balance[layer.name] = st

    def _controller(self, group: Mapping[str, Any], st: LayerBalanceState) -> float:
        """The controller's new ``u = log(1 + σ²)`` for a layer in ``"auto"`` mode (:func:`controller_step`)."""
        target = ramped_target(
            float(group["nc_target_share"]), st.decay_time, self._config.target_ramp, st.count, self._config.ramp_steps
        )
        return controller_step(
            st.log1p_sigma2, decay=st.decay, unit_noise=st.unit_noise, target_share=target,
            gain=self._config.gain, max_noise=self._config.max_noise, unit_noise_fast=st.unit_noise_fast,
            growth=st.growth if st.count > 2 else 0.0,
        )  # fmt: skip

    def _measure(self, layer: _Layer, grad: Tensor) -> Tensor:
        """``[‖W‖², ⟨W, P⊙M⟩, ‖P⊙N‖², ‖N‖², ‖P⊙M‖², finite]`` of one layer (a tensor; no host sync).

        ``finite`` is 1.0 when the layer's whole weight (and bias) gradient is finite, else 0.0.
        """
        assert layer.captured
        ok = _all_finite(layer)
        w = layer.flat(layer.weight.detach())
        d_b = layer.noise_w.shape[0] if layer.noise_w is not None else layer.factors[0][0].shape[1]  # W's rows
        if layer.noise_w is None:
            # factored N = Aᵀ X: ‖N‖_F² = Σ (A Aᵀ) ⊙ (X Xᵀ) (k × k Grams; ≥ 0 by the Schur product theorem)
            fa, fx = layer.stacked()
            n_raw = ((fa @ fa.T) * (fx @ fx.T)).sum().clamp_min(0.0)

            def noise_rows(rows: Tensor | None) -> Tensor:
                return ((fa if rows is None else fa.index_select(1, rows)).T @ fx).reshape(-1)
        else:
            n_w = layer.noise_w
            n = n_w.reshape(-1)
            n_raw = torch.dot(n, n)

            def noise_rows(rows: Tensor | None) -> Tensor:
                return _output_rows(n_w, d_b, rows)
        ok = ok.to(n_raw.dtype)
        if not self._config.track_balance:
            zero = torch.zeros((), dtype=n_raw.dtype, device=n_raw.device)
            return torch.stack([zero, zero, zero, n_raw, zero, ok])
        w2 = torch.dot(w, w)
        if _is_adam_group(layer.group):
            terms = self._adam_terms(layer, grad, w, d_b, noise_rows, n_raw.dtype)
            if terms is None:  # no second moment yet (first step): no measurement
                nan = torch.full((), math.nan, dtype=n_raw.dtype, device=n_raw.device)
                return torch.stack([nan, nan, nan, n_raw, nan, ok])
            drift, n1, g2 = terms
        else:
            eta = effective_lr(layer.group)
            flat = layer.flat(grad)
            drift = torch.dot(w, flat) * (_step_sign(layer.group) * eta)
            n1 = n_raw * (eta * eta)
            g2 = torch.dot(flat, flat).to(n_raw.dtype) * (eta * eta)
        return torch.stack([w2.to(n_raw.dtype), drift.to(n_raw.dtype), n1, n_raw, g2, ok])

    def _adam_terms(
        self, layer: _Layer, grad: Tensor, w: Tensor, d_b: int, noise_rows: Callable[[Tensor | None], Tensor], dtype: torch.dtype
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(drift, ‖P⊙N‖², ‖P⊙M‖²)`` in Adam's geometry ``P = lr / (sqrt(v̂)+ε)``; None before Adam has state.

        Preconditioned sums ``Σ_jk (·)/d_jk`` over a random subset of ``m = sketch`` output rows, rescaled
        by ``d_b/m`` (unbiased; exact when ``d_b <= m``): the denominator costs several passes, a full one
        per step would not be cheap.
        """
        m = self._config.sketch or d_b
        rows = torch.randperm(d_b, generator=self._gen)[:m].to(w.device) if m < d_b else None
        plain = layer.plain
        state = self.state.get(layer.weight, {})
        # rows of W's (d_b, d_a) matrix: for a plain layout the parameter's own rows (only those of the
        # denominator are computed), else the full denominator mapped by the tap (e.g. Conv1D's transpose)
        denom = adam_denominator(layer.group, state, rows if plain else None)
        if denom is None:
            return None
        scale = d_b / m if rows is not None else 1.0
        lr = float(layer.group["lr"])
        if plain:
            d = denom.reshape(-1)
            w_rows, g_rows = _output_rows(w, d_b, rows), _output_rows(grad, d_b, rows)
        else:
            d = _output_rows(layer.matrix(denom), d_b, rows)
            w_rows = _output_rows(layer.matrix(layer.weight.detach()), d_b, rows)
            g_rows = _output_rows(layer.matrix(grad), d_b, rows)
        pg = g_rows / d
        drift = torch.dot(w_rows, pg) * (_step_sign(layer.group) * lr * scale)
        g2 = torch.dot(pg, pg).to(dtype) * (lr * lr * scale)
        nr = noise_rows(rows)
        q = nr / d.to(nr.dtype)
        n1 = torch.dot(q, q) * (lr * lr * scale)
        return drift, n1, g2

    def _update_sq(self, layer: _Layer) -> Tensor:
        """``[‖U‖², c]`` after a momentum / Adam base step: ``U`` the step the base optimizer just took
        (``W⁺ = (1 − r) W − U``; on ``sketch`` random rows for Adam) and ``c`` the factor by which its
        second moment carries the per-step gradient noise (white noise ``ξ``: ``E‖U_ξ‖² = c ‖P⊙ξ‖²``).

            heavy ball  U = lr b,  b ← β b + (1−d) ĝ:   c = (1−β)² / (1−β²)
            Nesterov    U = lr (ĝ + β b):                 c = (1−β)² ((1+β)² + β⁴/(1−β²))
            Adam        U = lr m̂ / (sqrt(v̂)+ε):          c = (1−β₁)/(1+β₁) · (1−β₁^{2t}) / (1−β₁^t)²

        (``P⊙ξ`` uses ``η_eff = lr(1−d)/(1−β)`` for the momentum groups, hence the ``(1−β)²``.)
        """
        group, st = layer.group, self.state.get(layer.weight, {})
        w = layer.weight
        dev = w.device
        if _is_adam_group(group):
            m = st.get("exp_avg")
            d_b = read_weight(layer.tap, layer.module).shape[0]  # rows of W's (d_b, d_a) matrix, as in _measure
            k = self._config.sketch or d_b
            rows = torch.randperm(d_b, generator=self._gen)[:k].to(dev) if k < d_b else None
            plain = layer.plain
            denom = adam_denominator(group, st, rows if plain else None)
            if m is None or denom is None:
                return torch.tensor([math.nan, 0.0], dtype=torch.float64, device=dev)
            b1, t = float(group["betas"][0]), float(st["step"])
            bc1 = 1.0 - b1**t
            if plain:
                q = _output_rows(m, d_b, rows) / bc1 / denom.reshape(-1)
            else:
                q = _output_rows(layer.matrix(m), d_b, rows) / bc1 / _output_rows(layer.matrix(denom), d_b, rows)
            scale = d_b / k if rows is not None else 1.0
            lr = float(group["lr"])
            coef = (1.0 - b1) / (1.0 + b1) * (1.0 - b1 ** (2 * t)) / (bc1 * bc1)
            u2 = torch.dot(q, q).to(torch.float64) * (lr * lr * scale)
        else:
            buf = st.get("momentum_buffer")
            if buf is None:
                return torch.tensor([math.nan, 0.0], dtype=torch.float64, device=dev)
            # Dampening d scales the buffer's mean and its noise by (1 − d) alike, so `coef` (the buffer's
            # noise relative to η_eff²·noise) does not depend on it; Nesterov requires d = 0.
            beta, lr = float(group["momentum"]), float(group["lr"])
            if group.get("nesterov", False) and w.grad is not None:
                u = layer.flat(w.grad + beta * buf)
                coef = (1.0 - beta) ** 2 * ((1.0 + beta) ** 2 + beta**4 / (1.0 - beta * beta))
            else:
                u = layer.flat(buf)
                coef = (1.0 - beta) ** 2 / (1.0 - beta * beta)
            u2 = torch.dot(u, u).to(torch.float64) * (lr * lr)
        return torch.stack([u2, torch.tensor(coef, dtype=torch.float64, device=dev)])

    def _nonfinite_gradient(self, names: list[str]) -> None:
        """A non-finite gradient in a tapped layer: raise ("error"), or skip the whole step ("warn"/"skip").

        Skipping means no noise, no decay and no base step (the base step would write NaN/inf into
        the weights), like a step GradScaler skips; counted in :attr:`skipped_steps`.
        """
        shown = ", ".join(repr(_display(n)) for n in names)
        handle_nonfinite(
            self._config.nonfinite,
            f"Non-finite gradient in layer(s) {shown} at step {self._steps} (policy nonfinite={self._config.nonfinite!r}): "
            "checked on the full gradient, not on the noise sketch",
            hint="check the loss and inputs, with AMP step through scaler.step(opt), or pass nonfinite='skip'",
            consequence="the whole step is skipped (no noise, decay or base step)",
            stacklevel=4,
        )
        self.skipped_steps += 1
        for layer in self._layers.values():
            layer.clear()

    def _nonfinite(self, name: str) -> None:
        handle_nonfinite(
            self._config.nonfinite,
            f"Non-finite noise sample in layer {_display(name)!r} at step {self._steps} (policy nonfinite={self._config.nonfinite!r})",
            hint="with AMP pass `grad_scaler=` and step through scaler.step(opt), or pass nonfinite='skip'",
            consequence="no noise for this layer in this step",
            stacklevel=4,
        )

    # ------------------------------------------------------------------ logging
    @property
    def balance(self) -> dict[str, BalanceTerms]:
        """Per layer: decay, drift, noise (SGD's own + injected), noise share (theory §5), per unit step size."""
        out = {}
        for name, st in self._balance.items():
            terms = balance_from_state(st)
            if terms is not None:
                out[name] = terms
        return out

    @property
    def noise_scale(self) -> dict[str, float]:
        """Current σ per tapped layer (the controller's in ``"auto"`` mode)."""
        return {name: self._sigma(name) for name in self._layers}

    @property
    def balance_state(self) -> dict[str, LayerBalanceState]:
        """The raw per-layer EMAs and controller states."""
        return dict(self._balance)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus ``"noise_calibrated"``: RNG state, EMAs, controller, step count."""
        sd = self.optimizer.state_dict()
        sd["noise_calibrated"] = {
            "version": 1,
            "rng_state": self._gen.get_state(),
            "steps": self._steps,
            "skipped_steps": self.skipped_steps,
            "balance": {n: st.to_dict() for n, st in self._balance.items()},
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the base optimizer (the groups stay shared) and restore the wrapper's own state.

        A base optimizer's plain state dict is accepted too (the wrapper's state then stays as it is).
        """
        if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
            got = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
            raise ValueError(f"Expected `state_dict` to be an optimizer state dict with 'state' and 'param_groups', but got {got}")
        sd = dict(state_dict)
        own = sd.pop("noise_calibrated", None)
        if own is not None:
            if not isinstance(own, Mapping) or not isinstance(own.get("balance"), Mapping):
                raise ValueError("Expected `state_dict['noise_calibrated']` to be NoiseCalibrated's own state (with 'balance'), but it is damaged")
            unknown = sorted(set(own["balance"]) - set(self._balance))
            if unknown:
                raise ValueError(
                    f"Expected `state_dict` to hold layers of this model {sorted(self._balance)}, but it has {unknown}"
                )
        restored = None if own is None else _own_state(own)  # all checked before anything is loaded
        self._check_state_shapes(sd)
        self.optimizer.load_state_dict(sd)
        self._check_groups()
        groups = self._param_groups_by_id()
        for layer in self._layers.values():
            layer.group = groups.get(id(layer.weight), layer.group)
            layer.clear()
        if restored is not None:
            rng, self._steps, self.skipped_steps, balance = restored
            self._gen.set_state(rng)
            self._balance.update(balance)

    def _check_state_shapes(self, sd: Mapping[str, Any]) -> None:
        """Refuse a base state dict saved for parameters of other shapes (issue 10, item 8).

        torch only compares the *number* of parameters per group; a momentum buffer or Adam moment of
        another shape would be accepted and fail (or broadcast) inside the next ``step()``.
        """
        groups = sd["param_groups"]
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            n = len(groups) if isinstance(groups, list) else type(groups).__name__
            raise ValueError(f"Expected `state_dict` to have {len(self.param_groups)} param groups like this optimizer, but it has {n}")
        names = {id(p): n for n, p in self.model.named_parameters()} if self.model is not None else {}
        state = sd["state"]
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            ids = saved.get("params", []) if isinstance(saved, Mapping) else []
            if len(ids) != len(group["params"]):
                raise ValueError(
                    f"Expected `state_dict` param group {gi} to have {len(group['params'])} parameters like this optimizer, "
                    f"but it has {len(ids)}: it was saved for another model"
                )
            for k, p in zip(ids, group["params"]):
                entry = state.get(k, {}) if isinstance(state, Mapping) else {}
                for key, value in entry.items() if isinstance(entry, Mapping) else ():
                    if isinstance(value, Tensor) and value.dim() > 0 and value.shape != p.shape:
                        where = names.get(id(p), f"param_groups[{gi}] parameter {group['params'].index(p)}")
                        raise ValueError(
                            f"Expected `state_dict` state {key!r} of parameter {where!r} to have this model's shape "
                            f"{tuple(p.shape)}, but it has {tuple(value.shape)}: the state dict was saved for a model of another shape"
                        )

    def __getstate__(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer,
            "model": self.model,
            "config": self._config.as_dict(),
            "rng_state": self._gen.get_state(),
            "balance": self._balance,
            "steps": self._steps,
            "attached": self.attached,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._config = WrapperConfig.from_dict(state["config"])
        self._setup(state["optimizer"], state["model"])
        self._gen.set_state(state["rng_state"])
        self._balance = dict(state["balance"])
        self._steps = state["steps"]
        if state["attached"]:
            self.attach()


def _own_state(own: Mapping[str, Any]) -> tuple[Tensor, int, int, dict[str, LayerBalanceState]]:
    """The wrapper's entry of a state dict, checked and parsed: ``(rng_state, steps, skipped_steps, balance)``.

    Raises ValueError naming what is damaged (before :meth:`NoiseCalibrated.load_state_dict` loads anything).
    """

    def damaged(what: str) -> ValueError:
        return ValueError(f"Expected `state_dict['noise_calibrated']` to be NoiseCalibrated's own state, but {what}")

    rng = own.get("rng_state")
    try:
        torch.Generator().set_state(rng)  # type: ignore[arg-type]
    except (TypeError, RuntimeError, ValueError):
        raise damaged(f"its 'rng_state' is not a generator state ({type(rng).__name__})") from None
    counts = []
    for key, default in (("steps", None), ("skipped_steps", 0)):
        v = own.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise damaged(f"its {key!r} is {v!r}, not a non-negative int")
        counts.append(v)
    fields = LayerBalanceState.__dataclass_fields__
    balance = {}
    for name, values in own["balance"].items():
        if not isinstance(values, Mapping):
            raise damaged(f"its balance of layer {name!r} is {type(values).__name__}, not a mapping")
        # fields added later (signal, growth, ...) keep their defaults when loading an older checkpoint
        kw = {k: values[k] for k in fields if k in values}
        try:
            kw["count"] = int(kw.get("count", 0))
            balance[name] = LayerBalanceState(**kw)
        except (TypeError, ValueError) as e:
            raise damaged(f"its balance of layer {name!r} is not readable ({e})") from None
    return rng, counts[0], counts[1], balance  # type: ignore[return-value]


#: Built-in optimizers whose preconditioner the balance does not model (their per-coordinate step sizes are not
#: SGD's ``η_eff`` nor Adam's ``lr/(sqrt(v̂)+ε)``); the noise and the decay work with them as with any optimizer.
_UNMODELLED_OPTIMIZERS = ("RMSprop", "Adagrad", "Adamax", "RAdam", "NAdam", "Adadelta", "Rprop", "ASGD", "SparseAdam", "Adafactor")


def _unmodelled_geometry(optimizer: Optimizer) -> str | None:
    """The name of a built-in optimizer whose geometry the balance does not model, else None (SGD, Adam, AdamW and
    their subclasses; optimizers from elsewhere are read by their groups: ``betas`` and ``eps`` as Adam, else SGD)."""
    if isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam)):
        return None
    for name in _UNMODELLED_OPTIMIZERS:
        cls = getattr(torch.optim, name, None)
        if isinstance(cls, type) and isinstance(optimizer, cls):
            return name
    return None


def _check_base_optimizer(optimizer: object) -> None:
    if isinstance(optimizer, type):
        raise TypeError(
            "Expected `optimizer` to be an optimizer instance, e.g. torch.optim.SGD(model.parameters(), lr=0.1), "
            f"but got the class {optimizer.__name__}"
        )
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"Expected `optimizer` to be a torch.optim.Optimizer instance, but got {type(optimizer).__name__}")
    if isinstance(optimizer, NoiseCalibrated):
        raise TypeError("Expected `optimizer` to be a base optimizer, but got a NoiseCalibrated (wrap the base once)")
    if isinstance(optimizer, torch.optim.LBFGS):
        raise TypeError("Expected `optimizer` to evaluate its closure once per step, but got LBFGS, which re-evaluates it")


def _check_config(c: Mapping[str, Any]) -> None:
    """The wrapper's own settings (raw :class:`WrapperConfig` values), each error naming its argument."""
    errors.check_nonnegative("target_ramp", c["target_ramp"])
    errors.check_bool("track_balance", c["track_balance"])
    errors.check_seed("seed", c["seed"])
    errors.check_nonnegative_int("ramp_steps", c["ramp_steps"])
    decay = c["decay"]
    if not (isinstance(decay, str) or callable(decay)):
        raise TypeError(f"Expected `decay` to be 'matrices', 'layers' or a predicate (name, param) -> bool, but got {decay!r}")
    if isinstance(decay, str):
        errors.check_choice("decay", decay, ("matrices", "layers"))
    if c["sketch"] is not None:
        errors.check_positive_int("sketch", c["sketch"])
    errors.check_fraction("gain", c["gain"])
    ema_decay = c["ema_decay"]
    if not (isinstance(ema_decay, (int, float)) and 0 <= ema_decay < 1):
        raise ValueError(f"Expected `ema_decay` to be a float in [0, 1), but got {ema_decay!r}")
    errors.check_positive("max_noise", c["max_noise"])
    errors.check_choice("nonfinite", c["nonfinite"], ("error", "warn", "skip"))
    scaler = c["grad_scaler"]
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"Expected `grad_scaler` to be a torch.amp.GradScaler, but got {type(scaler).__name__}")


def _check_noise(name: str, value: object) -> None:
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"Expected `{name}` to be a non-negative float or 'auto', but got the unknown mode {value!r}")
        return
    errors.check_nonnegative(name, value)
