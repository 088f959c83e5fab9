"""Best-effort detection of gradient accumulation from the weights' ``.grad`` (``CRHMonitor(accumulation=None)``).

With ``k`` micro-batches per optimizer step, each loss divided by ``k``, a backward hook sees

    dL/dh = (1/k) · (1/B) dℓ_i/dh

so the monitor's gradients are ``1/k`` of the per-sample ones unless ``accumulation=k`` is given. A
backward pass that adds into a ``.grad`` nobody touched since the previous backward finished (no
``zero_grad``, no optimizer write) is a micro-batch of an accumulated step; once such passes are followed
by an in-place update of the weights (an optimizer step), :class:`AccumulationCheck` warns once. Passes
that accumulate without any update (a measurement loop that never zeroes ``.grad``) are not flagged: each
is then an ordinary batch mean. Wrappers that rewrite ``.grad`` in place (DDP's all-reduce) hide it.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable

from torch import Tensor, nn

from .errors import CanonRegError
from .layers import HookSet, OwnedHook, _display
from .taps import LayerTap, weight_parameter

__all__ = ["AccumulationCheck", "weight_leaf"]


def weight_leaf(tap: LayerTap, module: nn.Module, name: str) -> Tensor | None:
    """The parameter behind layer ``name``'s ``W`` (None when it is computed or frozen: nothing to watch)."""
    try:
        p = weight_parameter(tap, module, _display(name))
    except CanonRegError:
        return None
    return p if p.requires_grad else None


class AccumulationCheck:
    """Watches weight parameters for accumulated backward passes followed by a weight update; warns once.

    Per layer ``name`` it remembers the ``.grad`` tensor and its version after each backward pass
    (post-accumulate hook). A later pass whose pre-hook finds that same ``.grad`` at that same version
    adds into an untouched gradient: the weights' version is then recorded, and :meth:`check` warns
    when the weights changed in place since (an optimizer step).

    The hooks go into the caller's :class:`canonreg.layers.HookSet` (removed with the owner's hooks) and
    hold this object weakly: a dropped owner leaves nothing active on the model.
    """

    def __init__(self) -> None:
        self._grad_marks: dict[str, tuple[weakref.ref[Tensor], int]] = {}  # layer: (its .grad, that version)
        self._accumulating: dict[str, tuple[weakref.ref[Tensor], int]] = {}  # layer: (weight, its version)
        self.warned = False

    def watch(self, hooks: HookSet, name: str, leaf: Tensor) -> None:
        """Hook layer ``name``'s weight parameter ``leaf``: a gradient pre-hook and a post-accumulate hook."""
        pre = functools.partial(_weak_call, weakref.WeakMethod(self._pre_hook), name, leaf)
        post = functools.partial(_weak_call, weakref.WeakMethod(self._post_hook), name, leaf)
        hooks.add(leaf.register_hook(OwnedHook(pre)))
        hooks.add(leaf.register_post_accumulate_grad_hook(OwnedHook(post)))

    def _pre_hook(self, name: str, param: Tensor, grad: Tensor) -> None:
        """Before a backward pass adds ``grad`` into ``param.grad``: did nobody touch ``.grad`` since the last one?"""
        self.check(name, param)
        old = param.grad
        mark = self._grad_marks.get(name)
        if old is None or mark is None or mark[0]() is not old or old._version != mark[1]:
            return
        # this pass adds into an untouched .grad: remember the weights' version at the first such pass
        self._accumulating.setdefault(name, (weakref.ref(param), param._version))

    def _post_hook(self, name: str, leaf: Tensor, param: Tensor) -> None:
        """After a backward pass accumulated into ``param.grad``: remember that tensor and its version."""
        # `param is leaf` guards against hooks that a deepcopy of the model carried along.
        if param is not leaf:
            return
        g = param.grad
        if g is not None:
            self._grad_marks[name] = (weakref.ref(g), g._version)

    def check(self, name: str, param: Tensor | None = None) -> None:
        """Warn (once) when accumulated backward passes were followed by an in-place weight update.

        Accumulated passes alone are also what a measurement loop without ``zero_grad`` produces (each
        pass a plain batch mean: nothing to correct); an optimizer step after them marks a training
        loop with gradient accumulation, whose micro-batch losses are usually divided by ``k``.
        """
        seen = self._accumulating.get(name)
        if seen is None or self.warned:
            return
        leaf = seen[0]() if param is None else param
        if leaf is None or leaf._version == seen[1]:
            return
        self.warned = True
        warnings.warn(
            f"CRHMonitor: backward passes added to the .grad of layer {_display(name)!r} without a reset in "
            "between, and the weights were then updated: gradient accumulation? If each micro-batch loss is "
            "divided by k, the recorded gradients — G_a, G_b and the balance terms, not the α — are 1/k of the "
            "per-sample ones: pass accumulation=k to CRHMonitor (or accumulation=1 if the passes are meant as "
            "they are; if gradients are never reset, call optimizer.zero_grad() before each step's backward)",
            RuntimeWarning,
            stacklevel=3,
        )


def _weak_call(method: weakref.WeakMethod[Callable[..., None]], *args: object) -> None:
    """Call ``method`` (held weakly) if its object is still alive."""
    fn = method()
    if fn is not None:
        fn(*args)
