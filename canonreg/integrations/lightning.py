"""A Lightning ``Callback`` that measures CRH during and after ``Trainer.fit``.

Install with ``pip install 'canonreg[lightning]'``. Two measurements, either or both:

* **during training** (``every_n_steps=k``): a :class:`~canonreg.CRHMonitor` on the LightningModule
  accumulates the moments of the training batches (forward *and* backward: the gradient the
  optimizer sees, i.e. of the training loss including any regulariser); every ``k`` optimizer steps
  the callback computes α, logs :func:`~canonreg.integrations.flat_metrics` under ``prefix`` to every
  logger of the trainer at ``trainer.global_step`` and resets the window. Validation and other
  no-grad passes are not recorded.
* **after training** (``measure_at_end=loader``): :func:`~canonreg.measure_crh` over ``loader`` with
  the task loss's gradient only, the protocol canonreg reports as an effect; logged under
  ``final_prefix`` and kept in :attr:`CRHCallback.final_report`.

Metrics go to ``logger.log_metrics`` directly, so ``log_every_n_steps`` does not drop them. With an
``AlignmentLoss`` wired in (``align={...}``), add :func:`alignment_penalty` to the loss in
``training_step``. The callback attaches its hooks when training starts and removes them when it
ends or fails (also inside ``Tuner.lr_find``, whose inner fit starts and ends training like any
other), so checkpoints, ``deepcopy`` and pickling of the module never meet a canonreg hook.

Example:
    >>> from canonreg.integrations.lightning import CRHCallback
    >>> cb = CRHCallback(every_n_steps=50, measure_at_end=train_loader)  # doctest: +SKIP
    >>> L.Trainer(max_steps=1000, callbacks=[cb]).fit(module, train_loader)  # doctest: +SKIP
    >>> cb.final_report.table()  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import CanonRegError, check_keywords, check_positive_int
from ..layers import LayerSpec
from ..losses import AlignmentLoss
from ..measure import measure_crh
from ..monitor import CRHMonitor
from ..report import CRHReport
from ..taps import mask_from_inputs
from .flat import _PREFIX_OK, flat_metrics

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - exercised when the extra is missing
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef,assignment]
    except ImportError as err:
        raise ImportError(
            "canonreg.integrations.lightning needs Lightning: pip install 'canonreg[lightning]' "
            "(or pip install lightning)"
        ) from err

__all__ = ["CRHCallback", "alignment_penalty"]

Batch = Any
LoaderArg = Iterable[Batch] | Callable[["pl.Trainer", "pl.LightningModule"], Iterable[Batch]]


class CRHCallback(Callback):  # type: ignore[misc]
    """Monitor CRH every ``k`` optimizer steps and/or measure it once training ends.

    Logged values (``flat_metrics``): α per layer and relation, their mean and min, sample counts.

    Args:
        every_n_steps: window length in optimizer steps (``trainer.global_step``) of the training-time
            monitor, or None for no monitor. A window with no recorded sample is not logged.
        measure_at_end: batches for the post-training :func:`~canonreg.measure_crh` (an iterable, or a
            callable ``(trainer, module) -> iterable``, e.g. ``lambda t, m: t.datamodule.train_dataloader()``),
            or None. Skipped inside ``Tuner.lr_find`` / ``scale_batch_size``.
        loss_fn: the task loss ``loss_fn(module(x), y)`` for ``measure_at_end`` (mean over the batch).
        batch_to_xy: maps one batch to ``(x, y)`` for ``measure_at_end`` (default: the batch is ``(x, y)``
            or a sequence starting with them). Tensors are moved to the module's device.
        layers: which layers (see :mod:`canonreg.layers`); default every measurable layer.
        monitor_kwargs: extra :class:`~canonreg.CRHMonitor` options (``preprocess``, ``metric``…);
            ``accumulation`` defaults to the trainer's ``accumulate_grad_batches``.
        compute_kwargs: extra :meth:`~canonreg.CRHMonitor.compute` options (default ``exponents=False``).
        measure_kwargs: extra :func:`~canonreg.measure_crh` options.
        align: options of an :class:`~canonreg.AlignmentLoss` built on the module when fitting starts
            (e.g. ``{"relations": "all", "weight": 0.1}``), or None; add :func:`alignment_penalty`
            to the loss in ``training_step``. The training-time monitor then sees the total gradient.
        prefix, final_prefix: key prefixes of the two measurements.
        mask_key: a keyword argument of the module's ``forward`` whose 0/1 tensor marks real positions
            (e.g. ``"attention_mask"`` for ``self(ids, attention_mask=m)``): every training call of the module
            then runs as inside :func:`canonreg.taps.masked`, so padding is no sample for the monitor and the
            loss; None (default) counts every position. For ``measure_at_end`` pass
            ``measure_kwargs={"ignore_index": -100}``.

    Attributes:
        monitor, align: the live monitor / loss while training (else None).
        last_report, last_metrics: the latest training-time window; final_report, final_metrics: the
            post-training measurement.

    Raises:
        ValueError: a bad option (named in the message).
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None = 100,
        measure_at_end: LoaderArg | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        batch_to_xy: Callable[[Batch], tuple[Any, Tensor]] | None = None,
        layers: LayerSpec = None,
        monitor_kwargs: Mapping[str, Any] | None = None,
        compute_kwargs: Mapping[str, Any] | None = None,
        measure_kwargs: Mapping[str, Any] | None = None,
        align: Mapping[str, Any] | None = None,
        prefix: str = "crh",
        final_prefix: str = "crh_final",
        mask_key: str | None = None,
    ) -> None:
        super().__init__()
        if mask_key is not None and (not isinstance(mask_key, str) or not mask_key):
            raise TypeError(f"Expected `mask_key` to be a keyword-argument name or None, but got {mask_key!r}")
        self.mask_key = mask_key
        self._mask_handle: Any | None = None
        if every_n_steps is not None:
            check_positive_int("every_n_steps", every_n_steps)
        if every_n_steps is None and measure_at_end is None:
            raise ValueError("Expected `every_n_steps` or `measure_at_end` to be given, but both are None (nothing to measure)")
        if measure_at_end is not None and not (callable(measure_at_end) or isinstance(measure_at_end, Iterable)) or isinstance(measure_at_end, (str, bytes)):
            raise TypeError(
                "Expected `measure_at_end` to be an iterable of batches, a callable (trainer, module) -> iterable, or "
                f"None, but got {type(measure_at_end).__name__}"
            )
        if not callable(loss_fn):
            raise TypeError(f"Expected `loss_fn` to be callable, but got {loss_fn!r}")
        if batch_to_xy is not None and not callable(batch_to_xy):
            raise TypeError(f"Expected `batch_to_xy` to be callable or None, but got {batch_to_xy!r}")
        for name, value in (("prefix", prefix), ("final_prefix", final_prefix)):
            if not isinstance(value, str) or not _PREFIX_OK.match(value):
                raise ValueError(f"Expected `{name}` to be segments of [A-Za-z0-9_-] joined by '/' or '.', but got {value!r}")
        for key, kwargs in (("monitor_kwargs", monitor_kwargs), ("compute_kwargs", compute_kwargs),
                            ("measure_kwargs", measure_kwargs), ("align", align)):
            if kwargs is not None and not isinstance(kwargs, Mapping):
                raise TypeError(f"Expected `{key}` to be a mapping of keyword arguments or None, but got {kwargs!r}")
        check_keywords("monitor_kwargs", monitor_kwargs, CRHMonitor.__init__, taken=("model", "layers"))
        check_keywords("compute_kwargs", compute_kwargs, CRHMonitor.compute)
        check_keywords("measure_kwargs", measure_kwargs, measure_crh, taken=("model", "x", "y", "loss_fn", "layers"))
        check_keywords("align", align, AlignmentLoss.__init__, taken=("model",))
        self.every_n_steps = every_n_steps
        self.measure_at_end = measure_at_end
        self.loss_fn = loss_fn
        self.batch_to_xy = batch_to_xy
        self.layers = layers
        self.monitor_kwargs = dict(monitor_kwargs or {})
        self.compute_kwargs = {"exponents": False, **(compute_kwargs or {})}
        self.measure_kwargs = dict(measure_kwargs or {})
        self.align_kwargs = None if align is None else dict(align)
        self.prefix = prefix
        self.final_prefix = final_prefix
        self.monitor: CRHMonitor | None = None
        self.align: AlignmentLoss | None = None
        self.last_report: CRHReport | None = None
        self.last_metrics: dict[str, float] = {}
        self.final_report: CRHReport | None = None
        self.final_metrics: dict[str, float] = {}
        self._last_step = -1

    # ------------------------------------------------------------------ lifecycle
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()
        if self.align_kwargs is not None:
            self.align = AlignmentLoss(pl_module, **{"layers": self.layers, **self.align_kwargs})
        if self.every_n_steps is not None:
            # Lightning divides each micro-batch loss by accumulate_grad_batches: the monitor multiplies back.
            kwargs = {"accumulation": int(trainer.accumulate_grad_batches), **self.monitor_kwargs}
            self.monitor = CRHMonitor(pl_module, layers=self.layers, **kwargs).attach()
        if self.mask_key is not None:
            self._mask_handle = mask_from_inputs(pl_module, self.mask_key)
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.monitor is None or self.every_n_steps is None or step == self._last_step or step % self.every_n_steps:
            return
        self._last_step = step
        if not _has_samples(self.monitor):
            return
        self.last_report = self.monitor.compute(**self.compute_kwargs)
        self.monitor.reset()
        self.last_metrics = flat_metrics(self.last_report, self.prefix)
        _log(trainer, self.last_metrics)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()
        if self.measure_at_end is None or _tuning(trainer):
            return
        loader = self.measure_at_end
        if callable(loader) and not isinstance(loader, Iterable):
            loader = loader(trainer, pl_module)
        with torch.enable_grad():
            self.final_report = measure_crh(
                pl_module, self._pairs(loader, pl_module.device), loss_fn=self.loss_fn, layers=self.layers, **self.measure_kwargs
            )
        self.final_metrics = flat_metrics(self.final_report, self.final_prefix)
        _log(trainer, self.final_metrics)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", -1))

    # ------------------------------------------------------------------ helpers
    def _release(self) -> None:
        if self.monitor is not None:
            self.monitor.detach()
            self.monitor = None
        if self.align is not None:
            self.align.detach()
            self.align = None
        if self._mask_handle is not None:
            self._mask_handle.remove()
            self._mask_handle = None

    def _pairs(self, loader: Iterable[Batch], device: torch.device) -> Iterator[tuple[Any, Tensor]]:
        for i, batch in enumerate(loader):
            if self.batch_to_xy is not None:
                xy = self.batch_to_xy(batch)
            elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
                xy = (batch[0], batch[1])
            else:
                raise CanonRegError(
                    f"Batch {i} of `measure_at_end` is a {type(batch).__name__}, not an (x, y) pair; "
                    "pass `batch_to_xy=` mapping a batch to (inputs, targets)"
                )
            if not (isinstance(xy, tuple) and len(xy) == 2):
                raise CanonRegError(f"Expected `batch_to_xy` to return an (x, y) tuple, but got {type(xy).__name__}")
            x, y = (t.to(device) if isinstance(t, Tensor) else t for t in xy)
            yield x, y


def alignment_penalty(pl_module: pl.LightningModule, task_loss: Tensor) -> Tensor:
    """The wired :class:`~canonreg.AlignmentLoss` term for this step, or an exact 0 without one.

    Use in ``training_step``: ``return task + alignment_penalty(self, task)``. Finds the
    :class:`CRHCallback` with ``align=`` among ``self.trainer.callbacks``; outside ``fit`` (no trainer,
    no such callback, training not started) it returns ``task_loss * 0`` so the same code runs anywhere.
    """
    trainer = getattr(pl_module, "_trainer", None)
    for cb in getattr(trainer, "callbacks", None) or []:
        if isinstance(cb, CRHCallback) and cb.align is not None:
            return cb.align(task_loss)
    return task_loss * 0


def _log(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        logger.save()


def _has_samples(monitor: CRHMonitor) -> bool:
    """Whether any layer committed a sample since the last reset (compute() would raise otherwise)."""
    states = getattr(monitor, "_state", None)
    if not isinstance(states, dict):
        return True  # no introspection available: let compute() decide
    return any(getattr(s, "n", 1) > 0 for s in states.values())


def _tuning(trainer: pl.Trainer) -> bool:
    """Inside ``Tuner.lr_find`` / ``scale_batch_size`` (their callbacks sit in ``trainer.callbacks``)."""
    return any(type(cb).__name__ in ("_LRCallback", "BatchSizeFinder", "LearningRateFinder") for cb in getattr(trainer, "callbacks", ()))
