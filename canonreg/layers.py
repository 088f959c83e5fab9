"""Layer selection and owned, removable hook handles (shared by monitor, losses and optimizer).

``layers`` arguments accept, everywhere in canonreg:

* ``None``: every module with a tap (Linear, Conv1d, Conv2d, ``transformers`` Conv1D and
  registered types) whose configuration the tap supports. Everything else that holds parameters of
  its own is listed in ``excluded`` with the reason: children whose parent applies their weights
  functionally (``nn.MultiheadAttention.out_proj``), configurations a tap rejects (grouped
  convolutions), subclasses that override their parent's ``forward`` (timm's ``StdConv2d``), and
  modules without a tap (Embedding, LSTM/GRU, MHA ``in_proj``, Bilinear, Conv3d, ConvTranspose,
  norms, custom modules). Nothing with parameters is left out silently;
* a qualified name or a sequence of names from ``model.named_modules()``;
* a module type or a tuple of types (``isinstance``); matches without a usable tap (a subclass
  overriding ``forward``, a grouped convolution) are listed in ``excluded`` with the reason;
* a predicate ``(name, module) -> bool``.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import CanonRegError
from .taps import LayerTap, _resolve, functional_only_children, get_tap, read_weight, untapped_reason

__all__ = [
    "LayerSpec",
    "select_layers",
    "layer_roles",
    "check_layer_weight",
    "check_tap_layout",
    "read_weight",
    "world_size",
    "HookSet",
    "OwnedHook",
    "inert_hook",
    "strip_inert_hooks",
    "check_not_compiled",
    "untraced_call",
    "claim_model",
    "release_model",
    "all_reduce_flat",
    "eager_under_compile",
    "at_least_float32",
]

LayerSpec = None | str | Sequence[str] | type | tuple[type, ...] | Callable[[str, nn.Module], bool]


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """The dtype rule for per-step products of captured rows: half/bfloat16 are upcast to float32, other dtypes kept.

    (Accumulated sums are float64 whatever the model dtype.)
    """
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _display(name: str) -> str:
    return name if name else "<root>"


def sublayer_name(layer: str, sub: str) -> str:
    """The name of sub-layer ``sub`` of the module named ``layer``: ``"layer[sub]"``."""
    return f"{layer}[{sub}]"


def select_layers(
    model: nn.Module,
    layers: LayerSpec,
    taps: dict[type[nn.Module], LayerTap] | None = None,
) -> tuple[dict[str, nn.Module], dict[str, LayerTap], dict[str, str]]:
    """Resolve a ``layers`` argument to ``({name: module}, {name: tap}, {excluded name: reason})``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``layers`` has an unsupported type.
        ValueError: a name does not exist, or nothing matches (the message lists what exists).
        CanonRegError: a requested module has no tap or an unsupported configuration.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be an nn.Module, but got {type(model).__name__}")
    _check_taps(taps)
    sel = _Selection(model, taps)
    if layers is None:
        chosen = sel.every_usable()
    elif isinstance(layers, str) or (isinstance(layers, (list, tuple)) and all(isinstance(x, str) for x in layers)):
        chosen = sel.by_names([layers] if isinstance(layers, str) else [str(x) for x in layers])
    elif isinstance(layers, type) or (isinstance(layers, tuple) and layers and all(isinstance(t, type) for t in layers)):
        chosen = sel.by_types(layers if isinstance(layers, tuple) else (layers,))
    elif callable(layers):
        chosen = sel.by_predicate(layers)
    else:
        raise TypeError(
            "Expected `layers` to be None, a layer name, a sequence of names, a module type, a tuple of types "
            f"or a predicate (name, module) -> bool, but got {layers!r}"
        )
    if not chosen:
        raise ValueError(sel.nothing_matched())
    for child in [n for n in sel.excluded if n in sel.functional]:
        if child.rpartition(".")[0] in chosen:  # measured through its parent (MHA's out_proj as "<attn>[out]")
            del sel.excluded[child]
    return chosen, sel.taps_of(chosen), sel.excluded


def _check_taps(taps: object) -> None:
    if taps is None:
        return
    if not isinstance(taps, dict) or not all(isinstance(k, type) and issubclass(k, nn.Module) for k in taps):
        raise TypeError(f"Expected `taps` to be a dict {{nn.Module subclass: tap}}, but got {taps!r}")
    for k, tap in taps.items():
        for meth in ("check", "input_rows", "output_rows", "weight", "bias"):
            if not callable(getattr(tap, meth, None)):
                raise TypeError(f"Expected `taps[{k.__name__}]` to implement LayerTap (missing `{meth}`), but got {type(tap).__name__}")


class _Selection:
    """The modules of one model as :func:`select_layers` sees them, and the excluded ones with their reasons."""

    def __init__(self, model: nn.Module, taps: dict[type[nn.Module], LayerTap] | None) -> None:
        self.taps = taps
        self.named = dict(model.named_modules())
        self.tappable = {n: m for n, m in self.named.items() if get_tap(m, taps) is not None}
        self.functional = functional_only_children(model)
        self.excluded: dict[str, str] = {}

    def usable(self, n: str, m: nn.Module) -> bool:
        """For the filtering forms (None, types): False, with the reason in ``excluded``, if unusable."""
        if n in self.functional:
            self.excluded[n] = self.functional[n]
            return False
        tap = get_tap(m, self.taps)
        if tap is None:
            self.excluded[n] = untapped_reason(m, self.taps) or "no tap"
            return False
        try:
            tap.check(m, _display(n))
        except CanonRegError as err:
            self.excluded[n] = str(err)
            return False
        return True

    def every_usable(self) -> dict[str, nn.Module]:
        """``layers=None``: every usable module that has a tap or holds parameters of its own."""
        return {
            n: m
            for n, m in self.named.items()
            if (n in self.tappable or n in self.functional or any(True for _ in m.parameters(recurse=False))) and self.usable(n, m)
        }

    def _tappable_list(self) -> str:
        return f"Tappable layers: {sorted(map(_display, self.tappable))}"

    def by_names(self, names: list[str]) -> dict[str, nn.Module]:
        if not names:
            raise ValueError("Expected `layers` to name at least one layer, but got an empty sequence")
        for n in names:
            if n not in self.named:
                raise ValueError(
                    f"Expected `layers` to contain names from model.named_modules(), but {n!r} does not exist. {self._tappable_list()}"
                )
            if n in self.functional:
                raise CanonRegError(f"Layer {_display(n)!r} cannot be measured on its own: {self.functional[n]}")
            if n not in self.tappable:
                kind = type(self.named[n]).__name__
                raise CanonRegError(
                    f"Layer {n!r} ({kind}) has no tap: canonreg does not know its h_a, W and h_b "
                    f"({untapped_reason(self.named[n], self.taps)}). "
                    f"Register one with canonreg.register_tap({kind}, tap) or pass `taps=`. {self._tappable_list()}"
                )
        return {n: self.named[n] for n in names}

    def by_types(self, types: tuple[type, ...]) -> dict[str, nn.Module]:
        chosen = {}
        for n, m in self.named.items():
            if not any(isinstance(m, t) for t in types):
                continue
            # A subclass overriding `forward` is excluded with its reason; a type without any tap is an error.
            if n not in self.tappable and n not in self.functional and _resolve(m, self.taps)[2] is None:
                raise CanonRegError(
                    f"Layer {n!r} ({type(m).__name__}) matches `layers` but has no tap; "
                    f"register one with canonreg.register_tap({type(m).__name__}, tap)"
                )
            if self.usable(n, m):
                chosen[n] = m
        return chosen

    def by_predicate(self, predicate: Callable[[str, nn.Module], bool]) -> dict[str, nn.Module]:
        chosen = {}
        for n, m in self.named.items():
            if predicate(n, m):
                if n not in self.tappable:
                    raise CanonRegError(
                        f"Layer {n!r} ({type(m).__name__}) matches the `layers` predicate but has no tap; "
                        f"register one with canonreg.register_tap({type(m).__name__}, tap)"
                    )
                chosen[n] = m
        return chosen

    def nothing_matched(self) -> str:
        why = "".join(f"; excluded {_display(n)!r}: {r}" for n, r in list(self.excluded.items())[:10])
        return (
            f"Expected `layers` to match at least one tappable layer, but it matched none. {self._tappable_list()}; all modules: "
            f"{sorted((_display(n), type(m).__name__) for n, m in self.named.items())[:50]}{why}"
        )

    def taps_of(self, chosen: dict[str, nn.Module]) -> dict[str, LayerTap]:
        """Each chosen layer's tap, its configuration and weight checked."""
        out: dict[str, LayerTap] = {}
        for n, m in chosen.items():
            found = get_tap(m, self.taps)
            if found is None:  # unreachable: chosen ⊆ tappable
                raise CanonRegError(f"Layer {_display(n)!r} has no tap: {untapped_reason(m, self.taps)}")
            found.check(m, _display(n))
            subs = getattr(found, "sublayers", None)
            for sub_name, sub_tap in (subs(m).items() if callable(subs) else [(None, found)]):
                check_layer_weight(n if sub_name is None else sublayer_name(n, sub_name), m, sub_tap)
            out[n] = found
        return out


def check_layer_weight(name: str, module: nn.Module, tap: LayerTap, *, need_data: bool = False) -> None:
    """Raise :class:`CanonRegError` naming the layer when its ``W`` cannot be measured.

    Always: a weight that is not a 2-D tensor or has a zero dimension (``nn.Linear(4, 0)``: there is
    no ``h_a``/``h_b`` coordinate to measure). With ``need_data`` (at attach time): a weight on the
    ``meta`` device (no values; materialise the model first, e.g. ``model.to_empty(device=...)``
    followed by its initialisation).
    """
    kind = type(module).__name__
    if any(nn.parameter.is_lazy(p) for p in module.parameters(recurse=False)):
        raise CanonRegError(
            f"Layer {_display(name)!r} ({kind}) has uninitialised lazy parameters (their shapes are set by the first "
            "forward pass): run one forward pass of the model (e.g. on a sample batch), then attach"
        )
    w = read_weight(tap, module)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise CanonRegError(
            f"Layer {_display(name)!r} ({kind}): its tap's weight must be a 2-D (d_b, d_a) tensor, but got {shape}"
        )
    if w.numel() == 0:
        raise CanonRegError(
            f"Layer {_display(name)!r} ({kind}) has a zero-width weight of shape {tuple(w.shape)}: it has no "
            "coordinates to measure. Leave it out with `layers=`"
        )
    if need_data and w.is_meta:
        raise CanonRegError(
            f"Layer {_display(name)!r} ({kind}) has its weight on the meta device (shapes only, no values): "
            "materialise the model first (e.g. model.to_empty(device='cpu') and initialise it), then attach"
        )


def check_tap_layout(name: str, tap: LayerTap, module: nn.Module, inputs: tuple[object, ...], output: torch.Tensor) -> None:
    """A tap's ``W`` must be ``(d_b, d_a)`` for its rows (``h_b = W h_a + b``), checked against a call's rows (the
    capture engine does it at each layer's first delivered call): a user tap returning ``Wᵀ`` of a non-square layer is
    refused naming the layer, instead of a shape error inside a hook. (A square layer's ``Wᵀ`` has the right shape:
    no check on shapes can tell it apart.)"""
    w = read_weight(tap, module)
    d_a = tap.input_rows(module, inputs).shape[-1]
    d_b = tap.output_rows(module, output).shape[-1]
    if tuple(w.shape) != (d_b, d_a):
        raise CanonRegError(
            f"Layer {_display(name)!r} ({type(module).__name__}): its tap's weight has shape {tuple(w.shape)}, but its rows "
            f"are h_a of width {d_a} and h_b of width {d_b}: the tap must return W as (d_b, d_a) = ({d_b}, {d_a}) with "
            "h_b = W h_a + b (a transposed storage needs .T)"
        )


def _compiled_modules(model: nn.Module) -> list[str]:
    """Names of ``model`` and its submodules that ``torch.compile`` has wrapped or compiled in place."""
    out = []
    for n, m in model.named_modules():
        kind = type(m)
        if (kind.__name__ == "OptimizedModule" and kind.__module__.startswith("torch._dynamo")) or getattr(
            m, "_compiled_call_impl", None
        ) is not None:
            out.append(_display(n))
    return out


def check_not_compiled(model: nn.Module, owner: str) -> None:
    """Raise :class:`CanonRegError` when ``model`` (or a submodule) is already compiled with ``torch.compile``.

    Hooks added to a compiled module are not part of the code it already compiled (dynamo does not
    guard on them by default), so they would be silently ignored. Attaching *before* compiling works:
    the hooks are then traced, with graph breaks where they record.
    """
    compiled = _compiled_modules(model)
    if compiled:
        raise CanonRegError(
            f"{owner} got a model compiled with torch.compile (compiled: {compiled[:5]}): hooks added after "
            "compiling are ignored by the compiled code. Create and attach the "
            f"{owner} on the original module first, then compile it (`{owner}(model)`, then "
            "`model = torch.compile(model)`), or pass the uncompiled module (`compiled._orig_mod`) and call "
            "that one for the measured passes"
        )


def _wrapped(x: object) -> bool:
    if torch.compiler.is_compiling():  # dynamo traces fake tensors, never functorch wrappers (and no graph break)
        return False
    return isinstance(x, torch.Tensor) and bool(torch._C._functorch.is_functorch_wrapped_tensor(x))


def untraced_call(
    module: nn.Module,
    inputs: tuple[object, ...],
    output: object = None,
    *,
    recurse: bool = False,
    owners: tuple[nn.Module, ...] | None = None,
) -> str | None:
    """Why a call of ``module`` must not be recorded by canonreg's hooks, or None for an ordinary call.

    The rule (monitor, loss and noise wrapper alike): a call is skipped when

    * an input or the output is a functorch-wrapped tensor: the call runs inside a ``torch.func``
      transform (``vmap``, ``grad``, ``jacrev``, ``jvp`` …), whose passes are not training samples;
    * a parameter of the module (of every submodule with ``recurse``) is not an ``nn.Parameter``:
      ``torch.func.functional_call`` substituted it, and the module's own weights (which the
      measurement and the identities use) are not the ones that ran.

    ``owners``: the modules whose parameters stand for the tree (those of ``module.modules()`` that hold
    any, listed once by the caller): the same check without walking the tree on every call.
    """
    if _wrapped(output) or any(_wrapped(x) for x in inputs):
        return "a call inside a torch.func transform (vmap/grad/jvp)"
    if owners is not None:
        params: Iterable[object] = (p for m in owners for p in m._parameters.values())
    else:
        params = module.parameters() if recurse else module._parameters.values()
    if any(p is not None and not isinstance(p, nn.Parameter) for p in params):
        return "a call with substituted parameters (torch.func.functional_call)"
    return None


def inert_hook(*args: object, **kwargs: object) -> None:
    """What every canonreg hook becomes in a deep copy or a pickle of a model: a no-op that removes itself.

    Called as a module hook (first argument a module), it removes every inert hook of that module and
    of its submodules (:func:`strip_inert_hooks`), so a copy is left with no canonreg hook after its
    first forward call; it returns None, so it never changes an input or an output.
    """
    if args and isinstance(args[0], nn.Module):
        strip_inert_hooks(args[0])


def _make_inert() -> Callable[..., None]:
    """Unpickling target of :class:`OwnedHook` (a pickled model needs canonreg importable to load)."""
    return inert_hook


def eager_under_compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` that, called while ``torch.compile`` traces, runs eagerly behind one graph break.

    Outside tracing it is ``fn`` plus one ``torch.compiler.is_compiling()`` check; ``torch._dynamo``
    is imported only once something is compiled.
    """

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        if torch.compiler.is_compiling():
            return torch.compiler.disable(fn)(*args)
        return fn(*args)

    return call


class OwnedHook:
    """A hook installed by canonreg (monitor, loss, noise wrapper) that never travels with a copy of the model.

    ``copy.deepcopy(model)`` and ``pickle``/``torch.save`` of a model turn each ``OwnedHook`` into
    :func:`inert_hook`: the copy is a plain model (never measured, shaped or noised by the original's
    owner; EMA/SWA copies, checkpoints, spawned workers) and its inert entries disappear at its first
    forward call or when canonreg attaches to it; the original keeps its hooks and is not touched.
    Parameters' own tensor hooks are never copied by torch (``Parameter.__deepcopy__`` and
    ``__reduce_ex__`` drop them).


    Under ``torch.compile`` (a model hooked before it was compiled) every ``OwnedHook`` call, and the
    ``__call__`` of every subclass, runs eagerly (:func:`eager_under_compile`): dynamo breaks the graph
    once at each hooked call instead of tracing into the hook's bookkeeping (host syncs, hook
    registrations), which broke it many times (3-Linear MLP, ``torch._dynamo.explain``: monitor 25 → 2,
    AlignmentLoss 8 → 2; ``tests/test_graph_breaks.py``).
    """

    __slots__ = ("fn",)
    #: torch's marker for tensor hooks that are not meant to be serialised (no warning when pickled).
    __torch_unserializable__ = True

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__call__")
        if own is not None:
            cls.__call__ = eager_under_compile(own)  # type: ignore[method-assign]

    def __call__(self, *args: Any) -> Any:
        if torch.compiler.is_compiling():
            return torch.compiler.disable(self.fn)(*args)
        return self.fn(*args)

    def __deepcopy__(self, memo: dict[int, object]) -> Callable[..., None]:
        return inert_hook

    def __reduce__(self) -> tuple[Callable[[], Callable[..., None]], tuple[()]]:
        return (_make_inert, ())


_HOOK_TABLES = (
    ("_forward_hooks", ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")),
    ("_forward_pre_hooks", ("_forward_pre_hooks_with_kwargs",)),
    ("_backward_hooks", ()),
    ("_backward_pre_hooks", ()),
)


def strip_inert_hooks(model: nn.Module) -> int:
    """Remove the :func:`inert_hook` entries that copies of ``model`` carry; returns how many were removed.

    Runs on its own at a copy's first forward call and whenever canonreg attaches to a model.
    """
    removed = 0
    for m in model.modules():
        for table_name, extras in _HOOK_TABLES:
            table = getattr(m, table_name, None)
            if not table:
                continue
            for key in [k for k, v in table.items() if v is inert_hook]:
                del table[key]
                removed += 1
                for extra in extras:
                    getattr(m, extra, {}).pop(key, None)
    return removed


class HookSet:
    """Owns hook handles; ``remove()`` is idempotent and leaves the modules as they were."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def add(self, handle: RemovableHandle) -> None:
        self._handles.append(handle)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)


_CLAIMS: dict[str, weakref.WeakKeyDictionary[nn.Module, Any]] = {}


def claim_model(kind: str, model: nn.Module, owner: Any) -> None:
    """Record that ``owner`` (a monitor, a loss…) has hooks on ``model``; one owner per kind.

    Raises:
        CanonRegError: another live owner of the same kind is attached to ``model`` or to one of
        its submodules / parents sharing layers; ``model`` is already compiled (:func:`check_not_compiled`).
    """
    check_not_compiled(model, kind)
    table = _CLAIMS.setdefault(kind, weakref.WeakKeyDictionary())
    for other_model, other in list(table.items()):
        if other is owner:
            continue
        mods = set(map(id, model.modules()))
        if any(id(m) in mods for m in other_model.modules()):
            raise CanonRegError(
                f"A {kind} is already attached to this model (or to a module it shares); "
                f"detach it first (`.detach()` or leave its `with` block)"
            )
    table[model] = owner


def release_model(kind: str, model: nn.Module, owner: Any) -> None:
    table = _CLAIMS.get(kind)
    if table is not None and table.get(model) is owner:
        del table[model]


def world_size() -> int:
    """The number of ``torch.distributed`` processes (1 without an initialised process group)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_flat(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum ``tensors`` across ranks with one all-reduce of a flat float64 buffer (copies; inputs untouched).

    Without an initialised process group, returns float64 copies.
    """
    import torch.distributed as dist

    if not tensors:
        return []
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    if world_size() > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, i = [], 0
    for t in tensors:
        k = t.numel()
        out.append(flat[i : i + k].reshape(t.shape))
        i += k
    return out


def layer_roles(names: Sequence[str]) -> dict[str, str]:
    """The role of each selected layer, in registration order (how CRH results are grouped).

    ``"first"``: the first layer, whose input is the data (its ``H_a`` is the data's moment, which
    training cannot change); ``"head"``: the last layer; ``"inner"``: every layer in between, whose
    input and output are both learned. A single layer is ``"first"``.
    """
    roles = {n: "inner" for n in names}
    if names:
        roles[names[0]] = "first"
        roles[names[-1]] = "head" if len(names) > 1 else "first"
    return roles
