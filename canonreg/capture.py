"""The capture engine: per layer call, the rows of ``h_a``, ``h_b`` and ``dL/dh_b`` (theory §1).

One engine for everything in canonreg that listens to a model's layers (monitor, alignment loss,
noise wrapper). For every selected layer ``l`` and every ordinary training call of it, it hands the
owner one :class:`LayerCall` whose methods give

    input_rows()   (n, d_a)   rows of h_a                 (tap.input_rows)
    output_rows()  (n, d_b)   rows of h_b                 (tap.output_rows of the output)
    grad rows      (n, d_b)   rows of dL/dh_b, in backward (tap.output_rows of the output's gradient)

and, when the owner's ``on_call`` returns a :class:`Backward`, calls ``Backward.fn`` with the
gradient rows of that same call once autograd reaches the layer output. The same rules hold for
every owner:

* **Selection**: :func:`canonreg.layers.select_layers` (``layers=`` and ``taps=``; everything with
  parameters that is not measured is in :attr:`Capture.excluded` with its reason).
* **Sub-layers**: a tap may define ``sublayers(module) -> {sub: LayerTap}``; one call of the module
  then yields one :class:`LayerCall` per sub-layer, named ``"<module name>[<sub>]"`` (e.g.
  ``"attn.in_proj[q]"``), each with its own tap over the same module call (its ``output_rows`` is
  also applied to the gradient of the module's whole output, so it selects the sub-layer's part).
  A tap that also defines ``open_call`` (:class:`CallOpener`; ``nn.MultiheadAttention``'s) reads its
  sub-layers from inside the forward instead: the engine holds the tap's context during each ordinary
  call and delivers the inner calls the tap reports, each with its own per-call tap.
* **Lifecycle**: :meth:`Capture.attach` / :meth:`Capture.detach` (idempotent, both return the
  capture), ``with capture:`` (nesting-safe: only the block that attached detaches; hooks are removed
  on exceptions); one owner of a kind per model (:func:`canonreg.layers.claim_model`), a compiled
  model refused with an error naming ``torch.compile``. A capture whose owner is garbage-collected
  removes its hooks (the callbacks are held weakly when they are bound methods).
* **Copies**: every hook is an :class:`~canonreg.layers.OwnedHook`, so deep copies and pickles of the
  model carry none. The capture itself never pickles: an owner leaves it out of its state and builds
  a new one when it is loaded.
* **Which calls count**: grad-enabled calls of the module itself (not of a copy), outside
  ``torch.func`` transforms and ``functional_call`` substitutions
  (:func:`canonreg.layers.untraced_call`), with a tensor output that requires grad (or any tensor
  output with ``need_grad=False``). Under ``torch.compile`` (hooks attached before compiling) every
  hook runs eagerly behind one graph break.
* **Sample mask** (``mask=True``): inside :func:`canonreg.taps.masked` only the kept rows are
  returned, the same rows for ``h_a``, ``h_b`` and ``dL/dh_b``; a call keeping no row is not
  delivered (counted in :attr:`CallStats.masked_out`).
* **dtype**: rows are detached (unless asked otherwise) and float16/bfloat16 are upcast to float32
  (:func:`canonreg.layers.at_least_float32`).
* **Non-finite rows** (``nonfinite="error" | "warn" | "skip"``): a row method finding a NaN/inf
  raises :class:`CanonRegError` naming the layer, the call and the rows, or (warn/skip) drops the whole
  call: the owner's ``on_call`` is left where it asked for the rows and nothing of the call is
  delivered (so compute the rows before changing state). ``nonfinite=None`` leaves the check to the
  owner (no host sync).

Example:
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    >>> seen = []
    >>> def on_call(call):
    ...     name, h_a = call.name, call.input_rows()
    ...     return Backward(lambda g_b: seen.append((name, h_a.shape, g_b.shape)))
    >>> with Capture(model, owner_kind="example", on_call=on_call):
    ...     model(torch.randn(3, 4)).sum().backward()
    >>> seen
    [('2', torch.Size([3, 8]), torch.Size([3, 2])), ('0', torch.Size([3, 4]), torch.Size([3, 8]))]
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from .errors import CanonRegError, check_choice
from .layers import (
    HookSet,
    LayerSpec,
    OwnedHook,
    _display,
    at_least_float32,
    check_tap_layout,
    claim_model,
    eager_under_compile,
    release_model,
    select_layers,
    strip_inert_hooks,
    sublayer_name,
    untraced_call,
)
from .taps import LayerTap, active_mask, kept_rows, leading_shape, take_rows, tap_batch_size

__all__ = ["Backward", "CallOpener", "CallStats", "Capture", "LayerCall", "Policy", "Target", "handle_nonfinite", "sublayer_name"]

Policy = Literal["error", "warn", "skip"]


def handle_nonfinite(policy: Policy, message: str, *, hint: str, consequence: str, stacklevel: int = 3) -> None:
    """The one non-finite policy: raise (``"error"``), warn (``"warn"``) or do nothing (``"skip"``).

    ``"error"`` raises :class:`CanonRegError` with ``message + "; " + hint``; ``"warn"`` emits a
    ``RuntimeWarning`` with ``message + "; " + consequence``. The caller then drops what it names.
    """
    if policy == "error":
        raise CanonRegError(f"{message}; {hint}")
    if policy == "warn":
        warnings.warn(f"{message}; {consequence}", RuntimeWarning, stacklevel=stacklevel)


@dataclass(frozen=True)
class Target:
    """One measured (sub-)layer: its name, the module it lives in and the tap that reads its rows."""

    name: str
    layer: str
    module: nn.Module
    tap: LayerTap
    sub: str | None = None


@dataclass
class CallStats:
    """Per target: calls seen and why calls were not delivered (for owners' error messages)."""

    fired: int = 0  # ordinary grad-enabled calls of the module
    delivered: int = 0  # calls handed to ``on_call``
    untraced: int = 0  # inside torch.func transforms / with substituted parameters
    no_grad_output: int = 0  # output not a tensor requiring grad
    masked_out: int = 0  # every row masked out
    nonfinite: int = 0  # dropped by the non-finite policy (warn/skip)


class Backward(NamedTuple):
    """What an owner's ``on_call`` returns to receive the call's gradient rows.

    ``fn(rows)`` gets the ``(n, d_b)`` rows of ``dL/dh_b`` (detached, dtype rule, mask applied); with
    ``samples`` (indices along dim 0 of the output) only those batch elements' rows. ``fn`` must not
    hold the :class:`LayerCall` or its output: the hook sits on that output, and a tensor hook that
    refers back to its tensor is a reference cycle the garbage collector cannot see.
    """

    fn: Callable[[Tensor], None]
    samples: Tensor | None = None


class CallOpener(Protocol):
    """A tap whose sub-layers run inside the module's forward, out of reach of module hooks (e.g. attention).

    ``open_call(module, args, kwargs, deliver)`` returns a context the engine holds for one measured
    forward call; inside it the tap calls ``deliver(sub, tap, inputs, output)`` for each inner call of
    sub-layer ``sub`` (a key of its ``sublayers``), with ``tap`` reading that call's rows from
    ``inputs`` and ``output`` (the inner op's tensors; the gradient hook goes on ``output``).
    """

    def open_call(
        self, module: nn.Module, args: tuple[object, ...], kwargs: Mapping[str, Any],
        deliver: Callable[[str, LayerTap, tuple[object, ...], Tensor], None],
    ) -> contextlib.AbstractContextManager[object]: ...


class _Dropped(Exception):
    """Raised by a row method when the non-finite policy drops the call (caught by the engine's hook)."""


class LayerCall:
    """One call of a measured (sub-)layer, as the forward hook sees it; rows are computed on request.

    Attributes:
        name: the target's name (``"fc"``, or ``"attn.in_proj[q]"`` for a sub-layer).
        module, tap: the module that ran and the tap reading this target's rows.
        inputs, output: the module's positional inputs and its output (not copied).
        keep: indices of the rows the active sample mask keeps (None = all).
        index: 0-based number of this call among the target's delivered calls.
    """

    __slots__ = ("_capture", "index", "inputs", "keep", "module", "name", "output", "tap")

    def __init__(self, capture: Capture, target: Target, inputs: tuple[object, ...], output: Tensor, keep: Tensor | None, index: int) -> None:
        self._capture = capture
        self.name = target.name
        self.module = target.module
        self.tap = target.tap
        self.inputs = inputs
        self.output = output
        self.keep = keep
        self.index = index

    @property
    def batch_size(self) -> int:
        """Independent samples in this call (:func:`canonreg.taps.tap_batch_size`)."""
        return tap_batch_size(self.tap, self.module, self.inputs)

    def input_rows(self, samples: Tensor | None = None, *, detach: bool = True) -> Tensor:
        """``(n, d_a)`` rows of ``h_a``; with ``samples``, of those batch elements (dim 0 of the first input) only."""
        inputs = self.inputs
        if samples is not None and not _batch_major_rows(self.tap):
            rows = _sample_rows(self.tap.input_rows(self.module, inputs), self.batch_size, samples)
            return self._finish(rows, samples, detach, "activations (h_a)")
        if samples is not None:
            x = inputs[0] if inputs else None
            if not isinstance(x, Tensor):
                raise CanonRegError(f"Layer {_display(self.name)!r}: its first input is not a tensor, so samples cannot be selected")
            inputs = (x.index_select(0, samples), *inputs[1:])
        return self._finish(self.tap.input_rows(self.module, inputs), samples, detach, "activations (h_a)")

    def output_rows(self, samples: Tensor | None = None, *, detach: bool = True) -> Tensor:
        """``(n, d_b)`` rows of ``h_b``; ``samples`` as in :meth:`input_rows`."""
        if samples is not None and not _batch_major_rows(self.tap):
            rows = _sample_rows(self.tap.output_rows(self.module, self.output), self.batch_size, samples)
            return self._finish(rows, samples, detach, "activations (h_b)")
        out = self.output if samples is None else self.output.index_select(0, samples)
        return self._finish(self.tap.output_rows(self.module, out), samples, detach, "activations (h_b)")

    def grad_rows(self, grad: Tensor, samples: Tensor | None = None) -> Tensor:
        """``(n, d_b)`` rows of ``dL/dh_b`` from the gradient of the output; ``samples`` as in :meth:`input_rows`."""
        return _GradRows(self, samples)(grad)

    def _finish(self, rows: Tensor, samples: Tensor | None, detach: bool, what: str) -> Tensor:
        if detach:
            rows = rows.detach()
        batch = _batch_of(self.tap, self.module, self.inputs, self.output) if samples is not None else 0
        rows = at_least_float32(take_rows(rows, _keep(self.keep, rows.shape[0], samples, batch)))
        _check_finite(self._capture.nonfinite, self.name, self.index, what, rows)
        return rows


def _batch_major_rows(tap: LayerTap) -> bool:
    """Whether the batch is dim 0 of the tensors a call of ``tap`` sees (False: a tap with ``batch_leading = False``,
    whose rows are batch-major but whose tensors are not, e.g. the sequence-first tensors inside attention)."""
    return bool(getattr(tap, "batch_leading", True))


def _batch_of(tap: LayerTap, module: nn.Module, inputs: tuple[object, ...], output: Tensor) -> int:
    return int(output.shape[0]) if _batch_major_rows(tap) else tap_batch_size(tap, module, inputs)


def _sample_rows(rows: Tensor, batch: int, samples: Tensor) -> Tensor:
    """The batch-major ``rows`` of batch elements ``samples`` (each element's rows stay together)."""
    return rows.reshape(batch, -1, rows.shape[-1]).index_select(0, samples.to(rows.device)).reshape(-1, rows.shape[-1])


def _keep(keep: Tensor | None, n_rows: int, samples: Tensor | None, batch: int) -> Tensor | None:
    """The kept rows among ``n_rows`` rows of ``samples`` (of ``batch`` batch elements), or ``keep`` without samples."""
    if keep is None or samples is None:
        return keep
    full = torch.zeros(n_rows * batch // max(1, samples.numel()), dtype=torch.bool, device=keep.device)
    full[keep] = True
    return full.reshape(batch, -1).index_select(0, samples.to(full.device)).reshape(-1).nonzero().reshape(-1)


def _check_finite(policy: Policy | None, name: str, index: int, what: str, rows: Tensor) -> None:
    """Apply the non-finite policy to one call's rows; raises :class:`_Dropped` when warn/skip drop the call."""
    if policy is None or bool(torch.isfinite(rows).all()):
        return
    handle_nonfinite(
        policy,
        f"Non-finite {what} in layer {_display(name)!r}, call {index} (policy nonfinite={policy!r})",
        hint="pass nonfinite='skip' or 'warn' to drop such calls instead",
        consequence="the call is dropped",
        stacklevel=5,  # the owner's line that asked for the rows
    )
    raise _Dropped


class _GradRows:
    """The backward half of a call: its gradient rows. Holds no tensor of the forward pass (a tensor
    hook referring to its own tensor would be a reference cycle the collector cannot see)."""

    __slots__ = ("batch", "index", "keep", "module", "name", "policy", "samples", "tap")

    def __init__(self, call: LayerCall, samples: Tensor | None) -> None:
        self.name, self.index, self.module, self.tap, self.keep = call.name, call.index, call.module, call.tap, call.keep
        self.policy = call._capture.nonfinite
        self.samples = samples
        self.batch = _batch_of(call.tap, call.module, call.inputs, call.output) if samples is not None else 0

    def __call__(self, grad: Tensor) -> Tensor:
        if self.samples is not None and not _batch_major_rows(self.tap):
            rows = _sample_rows(self.tap.output_rows(self.module, grad.detach()).detach(), self.batch, self.samples)
        else:
            g = grad if self.samples is None else grad.index_select(0, self.samples)
            rows = self.tap.output_rows(self.module, g.detach()).detach()
        rows = at_least_float32(take_rows(rows, _keep(self.keep, rows.shape[0], self.samples, self.batch)))
        _check_finite(self.policy, self.name, self.index, "gradients (dL/dh_b)", rows)
        return rows


_HookKind = Literal["root", "forward", "open", "close"]


class _Hook(OwnedHook):
    """The engine's module hook: a weak reference to its capture (a dropped capture leaves a no-op).

    ``kind``: ``"root"`` (pre-hook of the model), ``"forward"`` (forward hook of a layer), or for a
    tap that opens its calls (:meth:`Capture._on_open`) ``"open"`` (pre-hook with kwargs) and
    ``"close"`` (forward hook that runs even when the forward raises).
    """

    __slots__ = ("_kind", "_layer", "_ref")

    def __init__(self, capture: Capture, layer: str, kind: _HookKind) -> None:
        self._ref = weakref.ref(capture)
        self._layer = layer
        self._kind = kind

    def __call__(self, module: nn.Module, inputs: tuple[object, ...], output: object = None) -> None:  # type: ignore[override]
        capture = self._ref()
        if capture is None:
            return
        if self._kind == "root":
            capture._on_root(module, inputs)
        elif self._kind == "forward":
            capture._on_forward(self._layer, module, inputs, output)
        elif self._kind == "open":
            capture._on_open(self._layer, module, inputs, output if isinstance(output, dict) else {})
        else:
            capture._on_close(self._layer)


def _weak_callable(fn: Callable[..., Any] | None) -> Callable[[], Callable[..., Any] | None]:
    """A getter of ``fn``: weak for bound methods (the owner is not kept alive by its hooks)."""
    if fn is None:
        return lambda: None
    if hasattr(fn, "__self__") and hasattr(fn, "__func__"):
        return weakref.WeakMethod(fn)  # type: ignore[arg-type]
    return lambda: fn


def _release(hooks: HookSet, kind: str, model: nn.Module, token: object) -> None:
    hooks.remove()
    release_model(kind, model, token)


def _targets(modules: Mapping[str, nn.Module], taps: Mapping[str, LayerTap]) -> dict[str, Target]:
    """One target per selected module, or one per sub-layer of a tap that defines ``sublayers``."""
    out: dict[str, Target] = {}
    for name, module in modules.items():
        tap = taps[name]
        subs = getattr(tap, "sublayers", None)
        if not callable(subs):
            out[name] = Target(name, name, module, tap)
            continue
        parts = subs(module)
        if not isinstance(parts, Mapping) or not parts:
            raise CanonRegError(f"Layer {_display(name)!r}: its tap's sublayers() must return a non-empty {{name: tap}}, but got {parts!r}")
        for sub, sub_tap in parts.items():
            full = sublayer_name(name, str(sub))
            out[full] = Target(full, name, module, sub_tap, str(sub))
    return out


class Capture:
    """Hooks on the selected layers of ``model`` that deliver each layer call's rows to an owner.

    Args:
        model: the model (hooks go on its submodules and, with ``on_root``, on the model itself).
        layers: which layers (:mod:`canonreg.layers`); ``taps``: extra ``{module type: tap}``.
        owner_kind: the claim kind (one attached capture of a kind per model), used in messages.
        on_call: ``(LayerCall) -> Backward | None``, once per delivered call, in the forward hook
            (under ``torch.no_grad``); return a :class:`Backward` to get that call's gradient rows.
        on_root: ``() -> None`` at every ordinary grad-enabled forward call of ``model`` itself
            (a new pass: owners clear per-pass state there).
        mask: apply the active :func:`canonreg.taps.masked` mask.
        nonfinite: the non-finite policy of the row methods, or None (no check).
        need_grad: deliver only calls whose output requires grad (False: any tensor output).
        on_masked_out: ``(name) -> None`` when a call of target ``name`` keeps no row under the mask
            (after counting it in :attr:`CallStats.masked_out`; it may raise to refuse such calls).

    Raises:
        TypeError, ValueError, CanonRegError: from :func:`~canonreg.layers.select_layers`, a bad
            ``nonfinite``; on :meth:`attach`, another attached owner of ``owner_kind`` or a compiled model.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec = None,
        *,
        owner_kind: str,
        on_call: Callable[[LayerCall], Backward | None],
        on_root: Callable[[], None] | None = None,
        taps: dict[type[nn.Module], LayerTap] | None = None,
        mask: bool = True,
        nonfinite: Policy | None = "error",
        need_grad: bool = True,
        on_masked_out: Callable[[str], None] | None = None,
    ) -> None:
        if nonfinite is not None:
            check_choice("nonfinite", nonfinite, ("error", "warn", "skip"))
        if not isinstance(owner_kind, str) or not owner_kind:
            raise TypeError(f"Expected `owner_kind` to be a non-empty string, but got {owner_kind!r}")
        if not callable(on_call):
            raise TypeError(f"Expected `on_call` to be callable, but got {type(on_call).__name__}")
        modules, layer_taps, excluded = select_layers(model, layers, taps)
        self.model = model
        self.modules: dict[str, nn.Module] = modules
        self.excluded: dict[str, str] = dict(excluded)
        self.targets: dict[str, Target] = _targets(modules, layer_taps)
        self.stats: dict[str, CallStats] = {n: CallStats() for n in self.targets}
        self.owner_kind = owner_kind
        self.mask = bool(mask)
        self.nonfinite: Policy | None = nonfinite
        self.need_grad = bool(need_grad)
        self._on_call = _weak_callable(on_call)
        self._on_root_fn = _weak_callable(on_root)
        self._on_masked_out = _weak_callable(on_masked_out)
        self._by_layer: dict[str, list[Target]] = {}
        for t in self.targets.values():
            self._by_layer.setdefault(t.layer, []).append(t)
        #: layers whose tap opens each call (``open_call``): their sub-layers' rows come from inside the forward
        self._openers: dict[str, CallOpener] = {n: tap for n, tap in layer_taps.items() if callable(getattr(tap, "open_call", None))}  # type: ignore[misc]
        self._open: dict[str, contextlib.AbstractContextManager[object]] = {}
        self._owners: tuple[nn.Module, ...] = ()  # the tree's parameter holders, listed at attach
        #: an owner's switch between forward passes: while True, layer calls are not looked at (nor counted);
        #: e.g. CRHMonitor(every=k) on its inactive steps
        self.paused = False
        self._hooks = HookSet()
        self._token = object()
        self._finalizer: weakref.finalize | None = None
        self._entered: list[bool] = []

    def exclude(self, name: str, reason: str) -> None:
        """Stop measuring target ``name`` (before :meth:`attach`), listing it in :attr:`excluded` with ``reason``.

        For owners' own rules (e.g. a frozen weight); a module loses its hook once it has no target left.
        """
        if self.attached:
            raise CanonRegError(f"Cannot exclude layer {_display(name)!r} while the capture is attached; detach it first")
        t = self.targets.pop(name, None)
        if t is None:
            raise ValueError(f"Expected `name` to be one of the captured layers {sorted(self.targets)}, but got {name!r}")
        del self.stats[name]
        self.excluded[name] = reason
        left = [x for x in self._by_layer[t.layer] if x.name != name]
        if left:
            self._by_layer[t.layer] = left
        else:
            del self._by_layer[t.layer], self.modules[t.layer]
            self._openers.pop(t.layer, None)

    # ------------------------------------------------------------------ lifecycle
    @property
    def attached(self) -> bool:
        return len(self._hooks) > 0

    def attach(self) -> Capture:
        """Install the hooks (idempotent); on any failure none stays installed."""
        if self.attached:
            return self
        claim_model(self.owner_kind, self.model, self._token)
        try:
            strip_inert_hooks(self.model)
            if self._on_root_fn() is not None:
                # the parameter holders of the tree, listed once: the root check runs on every forward call
                self._owners = tuple(m for m in self.model.modules() if m._parameters)
                self._hooks.add(self.model.register_forward_pre_hook(_Hook(self, "", "root")))
            for layer, module in self.modules.items():
                if layer in self._openers:
                    self._hooks.add(module.register_forward_pre_hook(_Hook(self, layer, "open"), with_kwargs=True))
                    self._hooks.add(module.register_forward_hook(_Hook(self, layer, "close"), always_call=True))
                else:
                    self._hooks.add(module.register_forward_hook(_Hook(self, layer, "forward")))
        except BaseException:
            _release(self._hooks, self.owner_kind, self.model, self._token)
            raise
        self._finalizer = weakref.finalize(self, _release, self._hooks, self.owner_kind, self.model, self._token)
        return self

    def detach(self) -> Capture:
        """Remove every hook and the claim (idempotent); the model is left as it was.

        Gradient hooks already placed on live autograd graphs (forward done, backward pending) still
        deliver that backward pass.
        """
        for layer in list(self._open):
            self._on_close(layer)
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        _release(self._hooks, self.owner_kind, self.model, self._token)
        return self

    def __enter__(self) -> Capture:
        attaching = not self.attached
        if attaching:
            self.attach()
        self._entered.append(attaching)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._entered.pop():
            self.detach()

    def __reduce_ex__(self, protocol: object) -> Any:  # pickle and copy.deepcopy both go through it
        raise TypeError(
            "A canonreg Capture holds hooks on a live model and is never pickled or copied: its owner leaves it out "
            "of its state and builds a new one when loaded"
        )

    # ------------------------------------------------------------------ the hooks
    def _on_root(self, module: nn.Module, inputs: tuple[object, ...]) -> None:
        if module is self.model and torch.is_grad_enabled() and untraced_call(module, inputs, owners=self._owners) is None:
            fn = self._on_root_fn()
            if fn is not None:
                fn()

    def _ordinary(
        self, layer: str, module: nn.Module, inputs: tuple[object, ...], output: object = None, *, recurse: bool = False
    ) -> tuple[list[Target], Callable[[LayerCall], Backward | None]] | None:
        """The targets of ``layer`` and the owner's ``on_call`` for a call that counts, else None
        (a call of a copy, without grad, or untraced: counted in :attr:`CallStats.untraced`)."""
        targets = self._by_layer[layer]
        if module is not targets[0].module or not torch.is_grad_enabled():
            return None
        if untraced_call(module, inputs, output, recurse=recurse) is not None:
            for t in targets:
                self.stats[t.name].untraced += 1
            return None
        on_call = self._on_call()
        return None if on_call is None else (targets, on_call)

    def _on_forward(self, layer: str, module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
        if self.paused:
            return
        ordinary = self._ordinary(layer, module, inputs, output)
        if ordinary is None:
            return
        targets, on_call = ordinary
        usable = isinstance(output, Tensor) and (output.requires_grad or not self.need_grad)
        for t in targets:
            st = self.stats[t.name]
            st.fired += 1
            if not usable:
                st.no_grad_output += 1
                continue
            assert isinstance(output, Tensor)
            self._deliver(t, st, on_call, inputs, output)

    def _on_open(self, layer: str, module: nn.Module, args: tuple[object, ...], kwargs: dict[str, Any]) -> None:
        """Pre-hook of a layer whose tap opens its calls: hold the tap's context for this forward call.

        Inside it the tap hands each inner call of a sub-layer to :meth:`_deliver_inner` (the same
        rules as :meth:`_on_forward`, per sub-layer); :meth:`_on_close` leaves it after the forward
        (also when the forward raises).
        """
        self._on_close(layer)  # defensive: a context left open by a forward that never closed
        if self.paused:
            return
        ordinary = self._ordinary(layer, module, (*args, *kwargs.values()), recurse=True)
        if ordinary is None:
            return
        targets, on_call = ordinary
        subs = {t.sub: t for t in targets}
        deliver = eager_under_compile(functools.partial(self._deliver_inner, subs, on_call))  # like every hook
        ctx = self._openers[layer].open_call(module, args, kwargs, deliver)
        ctx.__enter__()
        self._open[layer] = ctx

    def _on_close(self, layer: str) -> None:
        ctx = self._open.pop(layer, None)
        if ctx is not None:
            ctx.__exit__(None, None, None)

    def _deliver_inner(
        self, subs: dict[str | None, Target], on_call: Callable[[LayerCall], Backward | None], sub: str, tap: LayerTap,
        inputs: tuple[object, ...], output: Tensor,
    ) -> None:
        """One inner call of sub-layer ``sub`` (read with ``tap``, this call's tap) of an opened layer call."""
        t = subs.get(sub)
        if t is None:  # a sub-layer the owner excluded (before attach)
            return
        st = self.stats[t.name]
        st.fired += 1
        if not (output.requires_grad or not self.need_grad):
            st.no_grad_output += 1
            return
        self._deliver(Target(t.name, t.layer, t.module, tap, t.sub), st, on_call, inputs, output)

    def _deliver(self, t: Target, st: CallStats, on_call: Callable[[LayerCall], Backward | None], inputs: tuple[object, ...], output: Tensor) -> None:
        if st.delivered == 0:  # the first call: the tap's W against the rows it reads (every owner)
            with torch.no_grad():
                check_tap_layout(t.name, t.tap, t.module, inputs, output)
        keep = None
        if self.mask and active_mask() is not None:
            n_rows = t.tap.output_rows(t.module, output).shape[0]
            keep = kept_rows(_display(t.name), n_rows, output.device, lead=leading_shape(t.tap, t.module, inputs))
            if keep is not None and keep.numel() == 0:
                st.masked_out += 1
                refuse = self._on_masked_out()
                if refuse is not None:
                    refuse(t.name)
                return
        call = LayerCall(self, t, inputs, output, keep, st.delivered)
        try:
            with torch.no_grad():
                back = on_call(call)
        except _Dropped:
            st.nonfinite += 1
            return
        st.delivered += 1
        if back is not None and output.requires_grad:
            output.register_hook(_grad_hook(_GradRows(call, back.samples), back.fn, st))


def _grad_hook(rows_of: _GradRows, fn: Callable[[Tensor], None], stats: CallStats) -> Callable[[Tensor], None]:
    def hook(grad: Tensor) -> None:
        with torch.no_grad():
            try:
                rows = rows_of(grad)
            except _Dropped:
                stats.nonfinite += 1
                return
            fn(rows)

    return hook
