"""Post-training CRH measurement: the six relations of a trained model, task gradient only.

How CRH is judged (and the only α canonreg reports as an *effect*): after training, over the whole
training set, with the gradient of the **task loss alone**,

    H_a, H_b, G_a, G_b  from  one pass  x → f(x),  g_b = −∂ℓ_task(f(x_i), y_i)/∂h_b   over every sample,
    Z_a = WᵀW, Z_b = WWᵀ  from the final weights,

measured by a fresh :class:`~canonreg.CRHMonitor` (default: the paper's protocol, ``normalized`` +
``pearson``). A monitor that runs *during* training with a regulariser in the objective sees
``g = −∂(ℓ_task + λ ℓ_align)/∂h``: the regulariser's own gradient then pushes the G relations toward
whatever it targets and they "satisfy themselves". :func:`measure_crh` never sees such a gradient.

No optimizer step is taken and no parameter's ``.grad`` is touched (gradients are taken with
``torch.autograd.grad``); the model runs in eval mode (dropout off, batch-norm running statistics used,
not updated) and its mode is restored afterwards.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as CF
from .errors import CanonRegError, check_bool, check_choice, check_nonnegative_int, check_positive_int, renamed_arguments
from .layers import _CLAIMS, LayerSpec, world_size
from .monitor import CRHMonitor
from .report import CRHReport
from .taps import masked

__all__ = ["measure_crh", "min_alignment"]

LossFn = Callable[[Tensor, Tensor], Tensor]

#: Hook owners whose hooks would see the measurement passes and change their own state.
_INTERFERING = ("AlignmentLoss", "NoiseCalibrated")


@renamed_arguments(seed="bootstrap_seed")
def measure_crh(
    model: nn.Module,
    x: Tensor | Iterable[tuple[Tensor, Tensor]],
    y: Tensor | None = None,
    *,
    loss_fn: LossFn = F.cross_entropy,
    batch_size: int = 1024,
    layers: LayerSpec = None,
    preprocess: CF.Preprocess = "normalized",
    metric: CF.Metric = "pearson",
    grad_scale: str | float = "batch",
    exponents: bool = False,
    n_bootstrap: int = 0,
    bootstrap_seed: int = 0,
    ignore_index: int | None = None,
    on_missing: str | None = None,
    sync_dist: bool = True,
) -> CRHReport:
    """The six CRH relations of ``model`` on a whole data set, with the task loss's gradient only.

    For every selected layer ``h_b = W h_a + b``, over all samples ``(x_i, y_i)``:
    ``H = Cov(h̃)``, ``G = Cov(g̃)`` with ``g_b = −∂ℓ(f(x_i), y_i)/∂h_b``, ``g_a = Wᵀ g_b`` and ``h̃``
    the preprocessed row (see :class:`~canonreg.CRHMonitor`), ``Z_a = WᵀW``, ``Z_b = WWᵀ``; α per
    relation with ``metric``. One forward and one task-loss backward per chunk of ``batch_size``
    samples; nothing is updated.

    Args:
        model: the trained model. No :class:`~canonreg.AlignmentLoss` or
            :class:`~canonreg.NoiseCalibrated` may be attached to it (their hooks would see the
            measurement passes), nor another :class:`~canonreg.CRHMonitor`.
        x: the inputs (a tensor whose first dimension indexes samples), or an iterable of
            ``(inputs, targets)`` batches (then ``y`` must be None; ``batch_size`` is unused).
        y: the targets, aligned with ``x``.
        loss_fn: the task loss ``loss_fn(model(x), y)``, a scalar mean over the batch (default
            cross-entropy); for a sum-reduced loss pass ``grad_scale="none"``.
        batch_size: samples per pass (memory only: the result does not depend on it).
        layers, preprocess, metric, grad_scale: as for :class:`~canonreg.CRHMonitor`.
        exponents, n_bootstrap, bootstrap_seed: PAH exponent fits, as in :meth:`~canonreg.CRHMonitor.compute`
            (``bootstrap_seed`` was called ``seed``; the old name still works, with a FutureWarning).
        ignore_index: positions whose target equals it are no samples (token targets ``(batch, positions)``
            padded with e.g. ``-100``): each batch runs inside ``canonreg.taps.masked(y != ignore_index)``,
            so per-position layers keep the rows of real positions only (see :func:`canonreg.taps.masked`).
            ``loss_fn`` is then a mean over the batch's real positions (as ``F.cross_entropy(...,
            ignore_index=...)``); with ``grad_scale="batch"`` each batch's loss is multiplied by its number
            of real positions, so every row's ``g`` is its own position's ``−∂ℓ/∂h`` whatever the batch
            holds (the result does not depend on ``batch_size``). Batches without a real position are skipped.

        on_missing: ``"error" | "warn" | "skip"`` for selected layers that no gradient reaches (e.g. a frozen
            first layer: its output needs no grad); default ``"warn"`` (left out of the report with a warning
            naming them and why) when ``layers`` is None, ``"error"`` for layers you named.
        sync_dist: under ``torch.distributed`` (initialised, more than one process) the sums are reduced over
            the ranks, so **every rank must call** ``measure_crh`` with its own shard (an empty shard is
            fine) and each gets the report over all the data; ``False`` measures this process's data alone
            (e.g. the whole set on rank 0 only; a collective call there would wait for the other ranks).

    Returns:
        The :class:`~canonreg.CRHReport` over every sample.

    Raises:
        CanonRegError: an alignment loss or a noise wrapper is attached to ``model``; no data.
        ValueError / TypeError: a bad argument (named in the message).

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
        >>> report = measure_crh(model, x, y)
        >>> round(report.alignment["2"]["b-RWA"], 3)  # doctest: +SKIP

    Reference: Ziyin, Chuang, Galanti & Poggio, arXiv:2410.03006 (the measurement protocol).
    """
    _check_arguments(model, loss_fn, batch_size, preprocess, metric, exponents, n_bootstrap, ignore_index)
    if on_missing is not None:
        check_choice("on_missing", on_missing, ("error", "warn", "skip"))
    check_bool("sync_dist", sync_dist)
    collective = sync_dist and world_size() > 1
    batches = _batches(x, y, batch_size, allow_empty=collective)
    _check_no_interfering_owner(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise CanonRegError("measure_crh: no parameter of `model` requires grad, so no gradient reaches its layers")
    per_position = ignore_index is not None and grad_scale == "batch"  # g of each real position: loss × its count
    monitor = CRHMonitor(
        model, layers=layers, preprocess=preprocess, metric=metric, grad_scale="none" if per_position else grad_scale,  # type: ignore[arg-type]
        track_balance=False, on_missing=on_missing or ("warn" if layers is None else "error"),  # type: ignore[arg-type]
        sync_dist=sync_dist,
    )
    was_training = model.training
    try:
        model.eval()
        with monitor, torch.enable_grad():
            seen = _task_gradient_passes(model, batches, loss_fn, params, ignore_index, per_position)
        if seen == 0 and not collective:  # collective: compute() checks the samples of all ranks together
            raise CanonRegError("measure_crh: the data is empty")
        return monitor.compute(exponents=exponents, n_bootstrap=n_bootstrap, bootstrap_seed=bootstrap_seed)
    finally:
        model.train(was_training)


def _check_arguments(
    model: object, loss_fn: object, batch_size: int, preprocess: str, metric: str, exponents: bool, n_bootstrap: int, ignore_index: object
) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"Expected `loss_fn` to be callable as loss_fn(output, target), but got {loss_fn!r}")
    check_positive_int("batch_size", batch_size)
    check_choice("preprocess", preprocess, CF.PREPROCESS_MODES)
    check_choice("metric", metric, CF.METRICS)
    check_bool("exponents", exponents)
    check_nonnegative_int("n_bootstrap", n_bootstrap)
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        raise TypeError(f"Expected `ignore_index` to be an int (a padding target such as -100) or None, but got {ignore_index!r}")


def _check_no_interfering_owner(model: nn.Module) -> None:
    for kind in _INTERFERING:
        if _owner(kind, model):
            raise CanonRegError(
                f"measure_crh: a {kind} is attached to this model; its hooks would see the measurement passes "
                f"(and change its own state). Call its .detach() first and .attach() again afterwards"
            )


def _task_gradient_passes(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    loss_fn: LossFn,
    params: list[nn.Parameter],
    ignore_index: int | None,
    per_position: bool,
) -> int:
    """One forward and one task-loss ``autograd.grad`` per batch (the monitor's hooks record; ``.grad`` untouched); the samples seen.

    ``per_position``: the loss (a mean over the batch's real positions) is multiplied by their number.
    """
    seen = 0
    for xb, yb in batches:
        keep = None if ignore_index is None else yb != ignore_index
        kept = None if keep is None else int(keep.sum())
        if kept == 0:
            continue  # only padding: no row of this batch is a sample
        with masked(keep) if keep is not None else contextlib.nullcontext():
            loss = loss_fn(model(xb), yb)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"Expected `loss_fn` to return a scalar tensor, but got {_describe(loss)}")
        if not math.isfinite(float(loss.detach())):
            raise CanonRegError(f"measure_crh: the task loss is not finite ({float(loss.detach())}) on a batch")
        if per_position and kept is not None:
            loss = loss * kept
        torch.autograd.grad(loss, params, allow_unused=True)
        seen += int(xb.shape[0]) if xb.dim() > 0 else 1
    return seen


def min_alignment(report: CRHReport, layers: Sequence[str] | None = None, relations: Sequence[str] = CF.RELATIONS) -> float:
    """``min`` of α over ``layers`` (default: all in the report) and ``relations``; NaN if any is NaN.

    The one-number CRH criterion: every relation of every chosen layer holds at least this well.
    """
    for arg, value in (("layers", layers), ("relations", relations)):
        if isinstance(value, str) or (value is not None and not isinstance(value, Iterable)):
            raise TypeError(f"Expected `{arg}` to be a list of names (e.g. [{value!r}]), but got {_describe(value)}")
    names = report.layers if layers is None else list(layers)
    for n in names:
        if n not in report.alignment:
            raise ValueError(f"Expected `layers` to name layers of the report {report.layers}, but got {n!r}")
    relations = list(relations)
    for r in relations:
        if r not in CF.RELATIONS:
            raise ValueError(f"Expected `relations` from {list(CF.RELATIONS)}, but got {r!r}")
    vals = [float(report.alignment[n][r]) for n in names for r in relations]
    if not vals:
        raise ValueError("Expected at least one layer and one relation, but got none")
    return float("nan") if any(math.isnan(v) for v in vals) else min(vals)


# ---------------------------------------------------------------------- helpers
def _batches(x: object, y: object, batch_size: int, *, allow_empty: bool = False) -> Iterable[tuple[Tensor, Tensor]]:
    if isinstance(x, Tensor):
        if not isinstance(y, Tensor):
            raise TypeError(f"Expected `y` to be a tensor of targets aligned with `x`, but got {_describe(y)}")
        if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"Expected `x` and `y` with the same first (sample) dimension, but got shapes {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if x.shape[0] == 0:
            if allow_empty:  # this rank's shard of a collective measurement
                return []
            raise CanonRegError("measure_crh: the data is empty (x has 0 samples)")
        return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    if y is not None:
        raise TypeError("Expected `y=None` when `x` is an iterable of (inputs, targets) batches")
    if not isinstance(x, Iterable):
        raise TypeError(f"Expected `x` to be a tensor or an iterable of (inputs, targets) batches, but got {_describe(x)}")
    return _checked_pairs(x)


def _checked_pairs(batches: Iterable[object]) -> Iterable[tuple[Tensor, Tensor]]:
    for i, item in enumerate(batches):
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], Tensor)):
            raise TypeError(f"Expected batch {i} of `x` to be an (inputs, targets) pair of tensors, but got {_describe(item)}")
        yield item[0], item[1]


def _owner(kind: str, model: nn.Module) -> bool:
    table = _CLAIMS.get(kind)
    if not table:
        return False
    mods = {id(m) for m in model.modules()}
    return any(any(id(m) in mods for m in other.modules()) for other in list(table.keys()))


def _describe(v: object) -> str:
    if isinstance(v, Tensor):
        return f"a tensor of shape {tuple(v.shape)}"
    return f"{type(v).__name__} {v!r}"[:120]
