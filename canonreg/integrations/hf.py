"""A ``transformers`` ``TrainerCallback`` that monitors CRH during ``Trainer.train``.

Install with ``pip install 'canonreg[hf]'`` (``transformers`` and ``accelerate``, which its
``Trainer`` needs). A :class:`~canonreg.CRHMonitor` on the trained model accumulates the moments
of the training batches (forward and backward of the loss the Trainer optimises); every
``every_n_steps`` optimizer steps (``state.global_step``) the callback computes α and hands
:func:`~canonreg.integrations.flat_metrics` to ``trainer.log``, the Trainer's own logging: the values
land in ``trainer.state.log_history`` and reach every ``report_to`` integration (TensorBoard,
W&B, MLflow… receive them through their ``on_log``). A callback cannot log by itself (callbacks
receive no Trainer), so it is bound to its Trainer: :meth:`CRHTrainerCallback.add_to` creates,
binds and registers it in one call.

Tokens are samples: every position of a ``(batch, seq, d)`` activation is a row, except padding:
the model's ``attention_mask`` keyword (``mask_key``) masks each training forward call
(:func:`canonreg.taps.mask_from_inputs`), so padded positions are no samples. Caveat: with gradient
checkpointing the recomputed forward passes are recorded again.

Example:
    >>> trainer = Trainer(model=model, args=TrainingArguments(..., report_to=["tensorboard"]), ...)  # doctest: +SKIP
    >>> crh = CRHTrainerCallback.add_to(trainer, every_n_steps=50)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..errors import CanonRegError, check_keywords, check_positive_int
from ..layers import LayerSpec
from ..monitor import CRHMonitor
from ..report import CRHReport
from ..taps import mask_from_inputs
from .flat import _PREFIX_OK, flat_metrics

try:
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - exercised when the extra is missing
    raise ImportError(
        "canonreg.integrations.hf needs transformers: pip install 'canonreg[hf]' (or pip install transformers accelerate)"
    ) from err

__all__ = ["CRHTrainerCallback"]


class CRHTrainerCallback(TrainerCallback):  # type: ignore[misc]
    """Monitor CRH every ``every_n_steps`` optimizer steps and log it through ``trainer.log``.

    Args:
        trainer: the ``transformers.Trainer`` to log through (or bind later with :meth:`bind`).
        every_n_steps: window length in optimizer steps; the monitor is reset after each window.
        layers: which layers (see :mod:`canonreg.layers`); default every measurable layer (GPT-2's
            ``Conv1D`` projections included; embeddings and norms are listed in ``monitor.excluded``).
        monitor_kwargs: extra :class:`~canonreg.CRHMonitor` options; ``accumulation`` defaults to
            ``args.gradient_accumulation_steps``.
        compute_kwargs: extra :meth:`~canonreg.CRHMonitor.compute` options (default ``exponents=False``).
        prefix: key prefix of the logged metrics.
        mask_key: the model's keyword argument whose 0/1 tensor marks real positions (default
            ``"attention_mask"``; calls without it are unmasked); None counts every position.

    Attributes:
        monitor: the live monitor while training (else None); last_report, last_metrics: the latest window.

    Raises:
        ValueError / TypeError: a bad option (named in the message).
        CanonRegError: training starts while the callback is bound to no Trainer.
    """

    def __init__(
        self,
        trainer: Any | None = None,
        *,
        every_n_steps: int = 100,
        layers: LayerSpec = None,
        monitor_kwargs: Mapping[str, Any] | None = None,
        compute_kwargs: Mapping[str, Any] | None = None,
        prefix: str = "crh",
        mask_key: str | None = "attention_mask",
    ) -> None:
        check_positive_int("every_n_steps", every_n_steps)
        if mask_key is not None and (not isinstance(mask_key, str) or not mask_key):
            raise TypeError(f"Expected `mask_key` to be a keyword-argument name or None, but got {mask_key!r}")
        self.mask_key = mask_key
        self._mask_handle: Any | None = None
        if not isinstance(prefix, str) or not _PREFIX_OK.match(prefix):
            raise ValueError(f"Expected `prefix` to be segments of [A-Za-z0-9_-] joined by '/' or '.', but got {prefix!r}")
        for name, value in (("monitor_kwargs", monitor_kwargs), ("compute_kwargs", compute_kwargs)):
            if value is not None and not isinstance(value, Mapping):
                raise TypeError(f"Expected `{name}` to be a mapping of keyword arguments or None, but got {value!r}")
        check_keywords("monitor_kwargs", monitor_kwargs, CRHMonitor.__init__, taken=("model", "layers"))
        check_keywords("compute_kwargs", compute_kwargs, CRHMonitor.compute)
        self.every_n_steps = every_n_steps
        self.layers = layers
        self.monitor_kwargs = dict(monitor_kwargs or {})
        self.compute_kwargs = {"exponents": False, **(compute_kwargs or {})}
        self.prefix = prefix
        self.monitor: CRHMonitor | None = None
        self.last_report: CRHReport | None = None
        self.last_metrics: dict[str, float] = {}
        self._trainer: Any | None = None
        if trainer is not None:
            self.bind(trainer)

    @classmethod
    def add_to(cls, trainer: Any, **kwargs: Any) -> CRHTrainerCallback:
        """Create the callback bound to ``trainer`` and register it (``trainer.add_callback``)."""
        cb = cls(trainer, **kwargs)
        trainer.add_callback(cb)
        return cb

    def bind(self, trainer: Any) -> CRHTrainerCallback:
        """Log through ``trainer.log`` (for a callback passed as ``Trainer(callbacks=[cb])``)."""
        if not callable(getattr(trainer, "log", None)) or not hasattr(trainer, "state"):
            raise TypeError(f"Expected `trainer` to be a transformers.Trainer, but got {type(trainer).__name__}")
        self._trainer = trainer
        train = getattr(trainer, "train", None)
        if callable(train):  # a failing run gets no on_train_end: remove the hooks on the way out
            trainer.train = functools.partial(_train_then_release, train, weakref.ref(self))
        return self

    def detach(self) -> None:
        """Remove the monitor's hooks (done automatically when training ends)."""
        if self.monitor is not None:
            self.monitor.detach()
            self.monitor = None
        if self._mask_handle is not None:
            self._mask_handle.remove()
            self._mask_handle = None

    # ------------------------------------------------------------------ TrainerCallback events
    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        if self._trainer is None:
            raise CanonRegError(
                "CRHTrainerCallback logs through trainer.log (so its metrics reach report_to) and is bound to no "
                "Trainer: create it with CRHTrainerCallback.add_to(trainer, ...) or call callback.bind(trainer)"
            )
        if not isinstance(model, nn.Module):
            raise CanonRegError(f"CRHTrainerCallback received no model at on_train_begin (got {type(model).__name__})")
        self.detach()
        # The Trainer scales each micro-batch loss to ~1/gradient_accumulation_steps: the monitor multiplies back.
        kwargs = {"accumulation": int(getattr(args, "gradient_accumulation_steps", 1) or 1), **self.monitor_kwargs}
        self.monitor = CRHMonitor(model, layers=self.layers, **kwargs).attach()
        if self.mask_key is not None:
            self._mask_handle = mask_from_inputs(model, self.mask_key)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is None or state.global_step % self.every_n_steps:
            return
        states = getattr(self.monitor, "_state", None)
        if isinstance(states, dict) and not any(getattr(s, "n", 1) > 0 for s in states.values()):
            return
        self.last_report = self.monitor.compute(**self.compute_kwargs)
        self.monitor.reset()
        self.last_metrics = flat_metrics(self.last_report, self.prefix)
        if self._trainer is not None:  # always bound: on_train_begin checks it
            self._trainer.log(dict(self.last_metrics))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.detach()


def _train_then_release(train: Any, ref: weakref.ref[CRHTrainerCallback], *args: Any, **kwargs: Any) -> Any:
    """``trainer.train(...)``; if it raises (or is interrupted), the callback's hooks are removed first."""
    try:
        return train(*args, **kwargs)
    except BaseException:
        cb = ref()
        if cb is not None:
            cb.detach()
        raise
