"""CRHMonitor: streaming measurement of the six CRH relations during ordinary training.

For every monitored layer ``h_b = W h_a + b`` the monitor accumulates, inside the user's own
forward and backward passes, float64 sums of the preprocessed rows (crh-spec §1–§3):

    S_xx(H_a) = Σ_i h̃_a h̃_aᵀ,  S_x(H_a) = Σ_i h̃_a,   and the same for G_b (and, when needed, H_b, G_a)

where ``h̃`` is the row after preprocessing (identity for ``raw``/``centered``, ``h/‖h‖`` for
``normalized``). In ``raw``/``centered`` mode the exact identities ``H_b = W H_a Wᵀ (+ bias terms)``
and ``G_a = Wᵀ G_b W`` replace two of the four accumulations; they use the weights at
``compute()`` time (exact when the weights did not change during the window; pass
``identities=False`` to accumulate ``H_b`` and ``G_a`` directly). Normalisation breaks the
identities, so ``normalized`` mode always accumulates all four.

Gradient scale: a hook sees ``dL/dh_b``; with a loss that is a mean over the batch this is
``(1/B) dℓ_i/dh_b``. ``grad_scale="batch"`` (default) multiplies by the batch size ``B`` (size of the
layer input's first dimension) to recover per-sample gradients; ``"none"`` is right for
sum-reduced losses; a float multiplies by that number (e.g. ``B·T`` for a token-mean loss). The
alignment scores are invariant to this scale; ``matrices()`` and the balance terms are not.

References: Ziyin, Chuang, Galanti & Poggio, arXiv:2410.03006 (CRH/PAH); Ziyin, Wang, Li & Wu,
arXiv:2402.07193 (noise equilibrium).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from . import functional as F
from .errors import CanonRegError, check_choice, check_positive, check_positive_int
from .layers import HookSet, LayerSpec, _display, all_reduce_flat, claim_model, release_model, select_layers
from .report import CRHReport, build_report
from .taps import LayerTap

__all__ = ["CRHMonitor"]

Policy = Literal["error", "warn", "skip"]
GradScale = Literal["batch", "none"]


@dataclass
class _LayerState:
    """Float64 running sums of one layer (all reduced by summation)."""

    sums: dict[str, Tensor] = field(default_factory=dict)
    skipped: int = 0
    fired: int = 0  # forward passes seen while active (used to explain missing layers)

    def add(self, key: str, value: Tensor) -> None:
        v = value.detach().to(torch.float64)
        if key in self.sums:
            self.sums[key] += v
        else:
            self.sums[key] = v.clone()


class CRHMonitor:
    """Measure the six CRH relations (and PAH exponents, ranks, balance terms) on any model.

    Args:
        model: the model to monitor (hooks go on its submodules; the model itself is never changed).
        layers: which layers (see :mod:`canonreg.layers`); default every Linear/Conv layer.
        preprocess: ``"raw" | "centered" | "normalized"`` (default, the paper's protocol).
        metric: ``"pearson"`` (default, the paper's score) or ``"cosine"``.
        every: collect on every ``every``-th grad-enabled forward call of ``model`` (1 = always).
        max_rows: keep at most this many randomly chosen rows per layer call (None = all rows).
        grad_scale: ``"batch" | "none" | float``, see the module docstring.
        identities: derive ``H_b``, ``G_a`` from the exact identities in raw/centered mode.
        track_balance: accumulate the per-sample products the balance terms need.
        nonfinite: ``"error" | "warn" | "skip"`` for non-finite activations or gradients.
        on_missing: ``"error" | "warn" | "skip"`` for requested layers that recorded no samples.
        taps: extra ``{module type: tap}`` for this monitor only.
        sync_dist: all-reduce across ``torch.distributed`` ranks in ``compute()`` (collective call).
        seed: seed of the row sub-sampling generator.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> monitor = CRHMonitor(model)
        >>> with monitor:
        ...     loss = model(torch.randn(32, 8)).square().mean()
        ...     loss.backward()
        >>> report = monitor.compute()
        >>> sorted(report.alignment["0"]) == sorted(canonreg.RELATIONS)  # doctest: +SKIP
        True
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec = None,
        *,
        preprocess: F.Preprocess = "normalized",
        metric: F.Metric = "pearson",
        every: int = 1,
        max_rows: int | None = None,
        grad_scale: GradScale | float = "batch",
        identities: bool = True,
        track_balance: bool = True,
        nonfinite: Policy = "error",
        on_missing: Policy = "error",
        taps: dict[type[nn.Module], LayerTap] | None = None,
        sync_dist: bool = True,
        seed: int = 0,
    ) -> None:
        check_choice("preprocess", preprocess, F.PREPROCESS_MODES)
        check_choice("metric", metric, ("pearson", "cosine"))
        check_positive_int("every", every)
        if max_rows is not None:
            check_positive_int("max_rows", max_rows)
        if isinstance(grad_scale, str):
            check_choice("grad_scale", grad_scale, ("batch", "none"))
        else:
            check_positive("grad_scale", grad_scale)
        check_choice("nonfinite", nonfinite, ("error", "warn", "skip"))
        check_choice("on_missing", on_missing, ("error", "warn", "skip"))
        self.model = model
        self.layers, self._taps, self.excluded = select_layers(model, layers, taps)
        self._requested_explicitly = layers is not None
        self.preprocess: F.Preprocess = preprocess
        self.metric: F.Metric = metric
        self.every = every
        self.max_rows = max_rows
        self.grad_scale = grad_scale
        self.identities = bool(identities)
        self.track_balance = bool(track_balance)
        self.nonfinite: Policy = nonfinite
        self.on_missing: Policy = on_missing
        self.sync_dist = bool(sync_dist)
        self._gen = torch.Generator().manual_seed(int(seed))
        self._hooks = HookSet()
        self._state: dict[str, _LayerState] = {n: _LayerState() for n in self.layers}
        self._calls = 0  # grad-enabled forward calls of the root model
        self._active = True

    # ------------------------------------------------------------------ lifecycle
    @property
    def attached(self) -> bool:
        return len(self._hooks) > 0

    @property
    def direct(self) -> bool:
        """Whether ``H_b`` and ``G_a`` are accumulated directly (else derived by identities)."""
        return self.preprocess == "normalized" or not self.identities

    def attach(self) -> "CRHMonitor":
        """Install the hooks (idempotent). Raises CanonRegError if another monitor holds the model."""
        if self.attached:
            return self
        claim_model("CRHMonitor", self.model, self)
        try:
            self._hooks.add(self.model.register_forward_pre_hook(self._root_pre_hook))
            for name, module in self.layers.items():
                self._hooks.add(module.register_forward_hook(self._make_forward_hook(name)))
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Remove every hook (idempotent); the model is left exactly as before ``attach``."""
        self._hooks.remove()
        release_model("CRHMonitor", self.model, self)

    def __enter__(self) -> "CRHMonitor":
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def reset(self) -> None:
        """Forget everything accumulated (hooks stay as they are)."""
        self._state = {n: _LayerState() for n in self.layers}
        self._calls = 0
        self._active = True

    def __getstate__(self) -> dict[str, object]:
        raise TypeError("CRHMonitor holds hooks on a live model and cannot be pickled; pickle its report instead")

    # ------------------------------------------------------------------ hooks
    def _root_pre_hook(self, module: nn.Module, args: object) -> None:
        if torch.is_grad_enabled():
            self._active = self._calls % self.every == 0
            self._calls += 1

    def _scale(self, inputs: tuple[object, ...]) -> float:
        if isinstance(self.grad_scale, str):
            if self.grad_scale == "none":
                return 1.0
            x = inputs[0]
            assert isinstance(x, Tensor)
            return float(x.shape[0]) if x.dim() > 1 else 1.0
        return float(self.grad_scale)

    def _check_finite(self, name: str, what: str, *tensors: Tensor) -> bool:
        if all(bool(torch.isfinite(t).all()) for t in tensors):
            return True
        msg = (
            f"Non-finite {what} in layer {_display(name)!r} at monitored call {self._calls} "
            f"(policy nonfinite={self.nonfinite!r})"
        )
        if self.nonfinite == "error":
            raise CanonRegError(msg + "; pass nonfinite='skip' or 'warn' to drop such steps instead")
        if self.nonfinite == "warn":
            warnings.warn(msg + "; the step is dropped for this layer", RuntimeWarning, stacklevel=3)
        self._state[name].skipped += 1
        return False

    def _make_forward_hook(self, name: str) -> Callable[..., None]:
        tap = self._taps[name]
        mode = self.preprocess

        def hook(module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
            if not self._active or not torch.is_grad_enabled():
                return
            if not isinstance(output, Tensor) or not output.requires_grad:
                return
            state = self._state[name]
            state.fired += 1
            with torch.no_grad():
                xa = tap.input_rows(module, inputs).detach()
                idx = None
                if self.max_rows is not None and xa.shape[0] > self.max_rows:
                    idx = torch.randperm(xa.shape[0], generator=self._gen)[: self.max_rows].to(xa.device)
                    xa = xa[idx]
                xa = _work_dtype(xa)
                ya = F.preprocess_rows(xa, mode)
                pending: dict[str, Tensor] = {"Ha_xx": ya.T @ ya, "Ha_x": ya.sum(0)}
                rows_b = None
                bias = tap.bias(module)
                if self.direct or self.track_balance:
                    hb = tap.output_rows(module, output).detach()
                    if idx is not None:
                        hb = hb[idx]
                    hb = _work_dtype(hb)
                    if self.direct:
                        yb = F.preprocess_rows(hb, mode)
                        pending["Hb_xx"] = yb.T @ yb
                        pending["Hb_x"] = yb.sum(0)
                    if self.track_balance:
                        # W h_a = h_b − b, copied now: an in-place op after the layer may overwrite h_b.
                        rows_b = hb - bias.detach().to(hb.dtype) if bias is not None else hb.clone()
                        pending["ha_norm2"] = (xa * xa).sum(1)
                if not self._check_finite(name, "activations", *(v for k, v in pending.items() if k.endswith("_xx"))):
                    return
            scale = self._scale(inputs)
            output.register_hook(self._make_grad_hook(name, module, tap, pending, idx, scale, rows_b))

        return hook

    def _make_grad_hook(
        self,
        name: str,
        module: nn.Module,
        tap: LayerTap,
        pending: dict[str, Tensor],
        idx: Tensor | None,
        scale: float,
        rows_b: Tensor | None,
    ) -> Callable[[Tensor], None]:
        mode = self.preprocess

        def grad_hook(grad: Tensor) -> None:
            with torch.no_grad():
                gb = tap.output_rows(module, grad.detach())
                if idx is not None:
                    gb = gb[idx]
                gb = _work_dtype(gb) * (-scale)  # g = −dℓ/dh, per sample
                yg = F.preprocess_rows(gb, mode)
                new: dict[str, Tensor] = {"Gb_xx": yg.T @ yg, "Gb_x": yg.sum(0)}
                if self.direct:
                    ga = gb @ _work_dtype(tap.weight(module).detach())
                    yga = F.preprocess_rows(ga, mode)
                    new["Ga_xx"] = yga.T @ yga
                    new["Ga_x"] = yga.sum(0)
                if not self._check_finite(name, "gradients", *(v for k, v in new.items() if k.endswith("_xx"))):
                    return
                state = self._state[name]
                n = gb.shape[0]
                for k, v in pending.items():
                    if k != "ha_norm2":
                        state.add(k, v)
                for k, v in new.items():
                    state.add(k, v)
                if self.track_balance and rows_b is not None:
                    g2 = (gb * gb).sum(1)
                    state.add("gnhn", (g2 * pending["ha_norm2"]).sum())
                    state.add("gh", (gb * rows_b).sum())
                state.add("n", torch.tensor(float(n), dtype=torch.float64, device=gb.device))
                state.add("steps", torch.tensor(1.0, dtype=torch.float64, device=gb.device))

        return grad_hook

    # ------------------------------------------------------------------ results
    def compute(
        self,
        *,
        lr: float | None = None,
        weight_decay: float | None = None,
        batch_size: int | None = None,
        exponents: bool = True,
        n_bootstrap: int = 200,
        eig_floor: float = 1e-6,
        seed: int = 0,
    ) -> CRHReport:
        """Reduce the accumulators (across ranks if distributed) and return a :class:`CRHReport`.

        Args:
            lr, weight_decay, batch_size: η, γ, S of the training step; when all three are given (and
                the monitor tracks balance) the report includes the balance terms of spec §5.
            exponents: fit PAH exponents for all six relations (4 eigendecompositions per layer).
            n_bootstrap: bootstrap resamples for the exponent intervals.
            eig_floor: relative eigenvalue floor of the exponent fits.
            seed: seed of the bootstrap.

        Raises:
            CanonRegError: before any backward pass reached a monitored layer, or (``on_missing="error"``)
                when a requested layer recorded no samples.
        """
        balance_args = (lr, weight_decay, batch_size)
        if any(a is not None for a in balance_args) and not all(a is not None for a in balance_args):
            raise ValueError("Expected `lr`, `weight_decay` and `batch_size` to be given together (or none of them)")
        if lr is not None:
            check_positive("lr", lr)
            if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
                raise ValueError(f"Expected `weight_decay` to be a non-negative float, but got {weight_decay!r}")
            check_positive_int("batch_size", batch_size)
            if not self.track_balance:
                raise CanonRegError("Balance terms need track_balance=True when the monitor is created")

        names = list(self.layers)
        keys = self._keys()
        flat = [self._state[n].sums.get(k, None) for n in names for k in keys]
        flat = [t if t is not None else self._zeros_like_key(n, k) for t, (n, k) in zip(flat, [(n, k) for n in names for k in keys])]
        if self.sync_dist:
            reduced = all_reduce_flat(flat)
        else:
            reduced = [t.detach().to(torch.float64).clone() for t in flat]
        it = iter(reduced)
        sums = {n: {k: next(it).cpu() for k in keys} for n in names}
        total = sum(float(s["n"]) for s in sums.values())
        if total == 0:
            raise CanonRegError(
                "compute() was called before any backward pass reached a monitored layer: attach the monitor "
                "(`with monitor:` or `monitor.attach()`), run forward *and* backward with gradients enabled, "
                "then call compute()"
            )
        missing = {n: self._missing_reason(n) for n in names if float(sums[n]["n"]) == 0}
        if missing:
            msg = "; ".join(f"{_display(n)!r}: {r}" for n, r in missing.items())
            if self.on_missing == "error":
                raise CanonRegError(f"Requested layers recorded no samples — {msg}. Use on_missing='skip' to drop them")
            if self.on_missing == "warn":
                warnings.warn(f"Layers recorded no samples and are left out of the report — {msg}", RuntimeWarning, stacklevel=2)
        weights = {}
        biases = {}
        for n in names:
            tap = self._taps[n]
            with torch.no_grad():
                weights[n] = tap.weight(self.layers[n]).detach().to("cpu", torch.float64)
                b = tap.bias(self.layers[n])
                biases[n] = None if b is None else b.detach().to("cpu", torch.float64)
        balance = None
        if lr is not None:
            balance = {"lr": float(lr), "weight_decay": float(weight_decay), "batch_size": int(batch_size)}  # type: ignore[arg-type]
        return build_report(
            sums={n: s for n, s in sums.items() if n not in missing},
            weights=weights,
            biases=biases,
            preprocess=self.preprocess,
            metric=self.metric,
            direct=self.direct,
            skipped={n: self._state[n].skipped for n in names},
            missing=missing,
            excluded=dict(self.excluded),
            balance=balance,
            exponents=exponents,
            n_bootstrap=n_bootstrap,
            eig_floor=eig_floor,
            seed=seed,
        )

    def _keys(self) -> list[str]:
        keys = ["n", "steps", "Ha_xx", "Ha_x", "Gb_xx", "Gb_x"]
        if self.direct:
            keys += ["Hb_xx", "Hb_x", "Ga_xx", "Ga_x"]
        if self.track_balance:
            keys += ["gnhn", "gh"]
        return keys

    def _zeros_like_key(self, name: str, key: str) -> Tensor:
        w = self._taps[name].weight(self.layers[name])
        d_b, d_a = w.shape
        shapes = {
            "Ha_xx": (d_a, d_a), "Ha_x": (d_a,), "Ga_xx": (d_a, d_a), "Ga_x": (d_a,),
            "Hb_xx": (d_b, d_b), "Hb_x": (d_b,), "Gb_xx": (d_b, d_b), "Gb_x": (d_b,),
        }
        return torch.zeros(shapes.get(key, ()), dtype=torch.float64, device=w.device)

    def _missing_reason(self, name: str) -> str:
        if name in self.excluded:
            return self.excluded[name]
        from .taps import functional_only_children

        functional = functional_only_children(self.model)
        if name in functional:
            return functional[name]
        if self._state[name].fired == 0:
            return "the layer never ran in a grad-enabled forward pass while the monitor was attached"
        return "the layer ran but no backward pass reached its output"


def _work_dtype(x: Tensor) -> Tensor:
    """Per-step products in at least float32 (half/bfloat16 models are upcast); sums are float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x

