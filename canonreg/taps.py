"""Layer taps: how a module exposes ``h_a`` rows, ``h_b``/``g_b`` rows and its matrix ``W``.

A tap turns one call of a module into per-sample rows (theory §1):

* ``nn.Linear``: every position of any leading dimensions is a sample; ``h_a`` is the input row,
  ``h_b`` the output row, ``W`` the weight.
* ``nn.Conv1d`` / ``nn.Conv2d``: every output position is a sample; ``h_a`` is the unfolded input
  patch (``C_in·k`` or ``C_in·kh·kw``) *including* the padding the layer applies, ``W`` the weight
  reshaped to ``(C_out, C_in·k…)``, ``h_b``/``g_b`` the ``C_out`` vectors. Then
  ``h_b = W h_a + b`` holds exactly per position. Grouped and depthwise convolutions fail ``check``
  (each group is its own map, so the only single ``W`` is block-diagonal; per-group layers are not
  built in); under ``layers=None`` they are listed in ``excluded`` with the reason.
* ``transformers.pytorch_utils.Conv1D`` (GPT-2 and relatives; ``y = x @ weight + bias`` with
  ``weight`` stored ``(d_a, d_b)``): rows as for ``nn.Linear``, ``W = weight.T``. Resolved by the
  class's module and name, so canonreg never imports ``transformers``.
* ``nn.MultiheadAttention``: four sub-layers ``attn[q]``, ``attn[k]``, ``attn[v]`` (row blocks of
  ``in_proj_weight``) and ``attn[out]`` (``out_proj``), read from the ``F.linear`` calls inside the
  functional attention (:mod:`canonreg.attention`).
* ``nn.Embedding`` (opt-in, :class:`EmbeddingTap`): ``h_a = onehot(index)``, ``W = weight.T``; for
  small vocabularies (its moments are ``num_embeddings``-sized), so not registered by default.

**Exact types.** A subclass of a tapped type that defines its own ``forward`` (or, for convolutions,
``_conv_forward``) may apply a different weight than ``.weight`` (timm's ``StdConv2d`` standardises
it, ``Conv2dSame`` pads dynamically), so it does not inherit its parent's tap: it has no tap until
one is registered for it, and ``layers=None`` lists it in ``excluded`` with that reason. Subclasses
that keep the parent's ``forward`` (``nn.LazyLinear``, parametrized modules, MHA's ``out_proj``)
use the parent's tap.

**Weight layout** (shared by the monitor, the losses and the noise wrapper). ``tap.weight(module)``
is ``W`` as a ``(d_b, d_a)`` view of a parameter of the module. Anything else shaped like that
parameter (its gradient, a noise draw, optimizer state) maps to and from the ``(d_b, d_a)`` layout
with :func:`matrix_view` and :func:`to_weight_layout`; a tap may define these as methods
``matrix_view(module, t)`` / ``to_weight_layout(module, m)``, and without them canonreg derives
both from the strides of ``tap.weight(module)`` relative to the parameter (exact for any view:
reshape, transpose, slice of a whole parameter), so a user tap returning ``module.w.T`` is handled
correctly by the noise wrapper too.

Register a tap for a custom module type with :func:`register_tap` (globally) or pass
``taps={MyModule: MyTap()}`` to a monitor or loss (locally). A tap may also define
``batch_size(module, inputs) -> int`` (how many independent samples one call holds, used by
``grad_scale="batch"``); without it the first dimension of the first input counts (1 for 1-D inputs).

Example (a tap for a hypothetical ``Dense`` module computing ``x @ self.w.T``)::

    class DenseTap:
        def check(self, module, name): return None
        def input_rows(self, module, inputs): return inputs[0].reshape(-1, inputs[0].shape[-1])
        def output_rows(self, module, output): return output.reshape(-1, output.shape[-1])
        def weight(self, module): return module.w
        def bias(self, module): return None

    canonreg.register_tap(Dense, DenseTap())
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import MultiheadAttentionTap
from .errors import CanonRegError

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

__all__ = [
    "LayerTap",
    "LinearTap",
    "ConvTap",
    "TransposedLinearTap",
    "EmbeddingTap",
    "register_tap",
    "get_tap",
    "default_taps",
    "tap_batch_size",
    "read_weight",
    "weight_matrix",
    "weight_parameter",
    "matrix_view",
    "to_weight_layout",
    "untapped_reason",
    "masked",
    "active_mask",
    "kept_rows",
    "take_rows",
    "mask_from_inputs",
]


@runtime_checkable
class LayerTap(Protocol):
    """Protocol of a layer tap. All methods must be differentiable (the losses backprop through them)."""

    def check(self, module: nn.Module, name: str) -> None:
        """Raise :class:`CanonRegError` naming ``name`` if this module's configuration is unsupported."""

    def input_rows(self, module: nn.Module, inputs: tuple[object, ...]) -> Tensor:
        """``(n, d_a)`` rows of ``h_a`` from the module's positional forward inputs."""

    def output_rows(self, module: nn.Module, output: Tensor) -> Tensor:
        """``(n, d_b)`` rows from the module output (also applied to the output's gradient)."""

    def weight(self, module: nn.Module) -> Tensor:
        """``W`` as a ``(d_b, d_a)`` matrix (a differentiable view of the parameter)."""

    def bias(self, module: nn.Module) -> Tensor | None:
        """``b`` of shape ``(d_b,)``, or None."""


class LinearTap:
    """Tap for ``nn.Linear`` (and subclasses): rows are all leading positions."""

    def check(self, module: nn.Module, name: str) -> None:
        return None

    def input_rows(self, module: nn.Module, inputs: tuple[object, ...]) -> Tensor:
        x = _first_tensor(module, inputs)
        return x.reshape(-1, x.shape[-1])

    def batch_size(self, module: nn.Module, inputs: tuple[object, ...]) -> int:
        """First dimension of the input (1 for an unbatched 1-D input)."""
        x = _first_tensor(module, inputs)
        return int(x.shape[0]) if x.dim() > 1 else 1

    def output_rows(self, module: nn.Module, output: Tensor) -> Tensor:
        return output.reshape(-1, output.shape[-1])

    def weight(self, module: nn.Module) -> Tensor:
        return module.weight  # type: ignore[return-value]

    def bias(self, module: nn.Module) -> Tensor | None:
        return module.bias  # type: ignore[return-value]

    def matrix_view(self, module: nn.Module, t: Tensor) -> Tensor:
        """``t`` (shaped like ``weight``) in the ``(d_b, d_a)`` layout: ``t`` itself."""
        return _expect_shape(t, module.weight, "t")  # type: ignore[arg-type]

    def to_weight_layout(self, module: nn.Module, m: Tensor) -> Tensor:
        """A ``(d_b, d_a)`` matrix in ``weight``'s layout: ``m`` itself."""
        return _expect_shape(m, module.weight, "m")  # type: ignore[arg-type]


class TransposedLinearTap(LinearTap):
    """Tap for layers computing ``y = x @ weight + bias`` with ``weight`` stored ``(d_a, d_b)``.

    ``W = weightᵀ`` (a view), so ``h_b = W h_a + b`` per row as for ``nn.Linear``. Used for
    ``transformers.pytorch_utils.Conv1D`` (GPT-2's attention and MLP projections).
    """

    def weight(self, module: nn.Module) -> Tensor:
        return module.weight.T  # type: ignore[union-attr,return-value]

    def matrix_view(self, module: nn.Module, t: Tensor) -> Tensor:
        """``t`` (shaped like ``weight``, ``(d_a, d_b)``) as ``(d_b, d_a)``: ``tᵀ`` (a view)."""
        return _expect_shape(t, module.weight, "t").T  # type: ignore[arg-type]

    def to_weight_layout(self, module: nn.Module, m: Tensor) -> Tensor:
        """A ``(d_b, d_a)`` matrix in ``weight``'s ``(d_a, d_b)`` layout: ``mᵀ`` (a view)."""
        return _expect_shape(m, self.weight(module), "m").T


class EmbeddingTap:
    """Opt-in tap for ``nn.Embedding``: a lookup is ``h_b = W h_a`` with ``h_a = onehot(index)``.

    ``W = weightᵀ`` (``(embedding_dim, num_embeddings)``, a view), no bias; every looked-up position
    is a sample (padding positions included). ``H_a``, ``G_a`` and ``Z_a`` are
    ``num_embeddings × num_embeddings`` and the rows are dense one-hot vectors, so this is for small
    vocabularies only; it is not registered by default (``layers=None`` lists embeddings as excluded).
    Use it with ``taps={nn.Embedding: EmbeddingTap()}``.
    """

    def check(self, module: nn.Module, name: str) -> None:
        if not isinstance(module, nn.Embedding):
            raise CanonRegError(f"Layer {name!r} ({type(module).__name__}) was given EmbeddingTap, which supports nn.Embedding only")

    def input_rows(self, module: nn.Module, inputs: tuple[object, ...]) -> Tensor:
        idx = _first_tensor(module, inputs)
        return F.one_hot(idx.reshape(-1), module.num_embeddings).to(module.weight.dtype)  # type: ignore[arg-type, union-attr]

    def batch_size(self, module: nn.Module, inputs: tuple[object, ...]) -> int:
        """First dimension of the index tensor (a 1-D index tensor is a batch of single lookups)."""
        idx = _first_tensor(module, inputs)
        return int(idx.shape[0]) if idx.dim() >= 1 else 1

    def output_rows(self, module: nn.Module, output: Tensor) -> Tensor:
        return output.reshape(-1, output.shape[-1])

    def weight(self, module: nn.Module) -> Tensor:
        return module.weight.T  # type: ignore[union-attr,return-value]

    def bias(self, module: nn.Module) -> Tensor | None:
        return None

    def matrix_view(self, module: nn.Module, t: Tensor) -> Tensor:
        """``t`` (shaped like ``weight``, ``(num_embeddings, dim)``) as ``(dim, num_embeddings)``: ``tᵀ``."""
        return _expect_shape(t, module.weight, "t").T  # type: ignore[arg-type]

    def to_weight_layout(self, module: nn.Module, m: Tensor) -> Tensor:
        """A ``(dim, num_embeddings)`` matrix in ``weight``'s layout: ``mᵀ``."""
        return _expect_shape(m, self.weight(module), "m").T


class ConvTap:
    """Tap for ``nn.Conv1d`` / ``nn.Conv2d`` (every output position is a sample)."""

    def check(self, module: nn.Module, name: str) -> None:
        conv = _as_conv(module, name)
        if conv.groups != 1:
            raise CanonRegError(
                f"Layer '{name}' is a grouped convolution (groups={conv.groups}); canonreg taps support "
                "groups=1 only: each group maps its own C_in/groups input channels to its own C_out/groups outputs, "
                "so the layer has no single W with h_b = W h_a + b over its rows but a block-diagonal one, and "
                "per-group layers are not built in. Exclude it with `layers=` or register a custom tap."
            )

    def _geometry(self, conv: nn.Conv1d | nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        if isinstance(conv, nn.Conv1d):
            return (conv.kernel_size[0], 1), (conv.stride[0], 1), (conv.dilation[0], 1)
        return tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation)  # type: ignore[return-value]

    def batch_size(self, module: nn.Module, inputs: tuple[object, ...]) -> int:
        """Batch dimension of the input (1 for an unbatched ``(C, L)`` / ``(C, H, W)`` input)."""
        conv = _as_conv(module, type(module).__name__)
        x = _first_tensor(module, inputs)
        return 1 if x.dim() == (2 if isinstance(conv, nn.Conv1d) else 3) else int(x.shape[0])

    def input_rows(self, module: nn.Module, inputs: tuple[object, ...]) -> Tensor:
        conv = _as_conv(module, type(module).__name__)
        x = _first_tensor(module, inputs)
        unbatched = x.dim() == (2 if isinstance(conv, nn.Conv1d) else 3)
        if unbatched:
            x = x.unsqueeze(0)
        # Apply exactly the padding the layer applies (numeric, 'same', or a non-zero padding mode),
        # then unfold without padding: the patch includes the padded values.
        pad = conv._reversed_padding_repeated_twice
        if any(p != 0 for p in pad):
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, pad, mode=mode)
        if isinstance(conv, nn.Conv1d):
            x = x.unsqueeze(-1)
        k, s, d = self._geometry(conv)
        cols = F.unfold(x, kernel_size=k, dilation=d, stride=s)  # (B, C_in*k, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

    def output_rows(self, module: nn.Module, output: Tensor) -> Tensor:
        spatial = _as_conv(module, type(module).__name__).weight.dim() - 2
        if output.dim() == spatial + 1:  # unbatched input
            output = output.unsqueeze(0)
        return output.flatten(2).transpose(1, 2).reshape(-1, output.shape[1])

    def weight(self, module: nn.Module) -> Tensor:
        w = _as_conv(module, type(module).__name__).weight
        return w.reshape(w.shape[0], -1)

    def bias(self, module: nn.Module) -> Tensor | None:
        return module.bias  # type: ignore[return-value]

    def matrix_view(self, module: nn.Module, t: Tensor) -> Tensor:
        """``t`` (shaped like ``weight``, ``(C_out, C_in, k…)``) as ``(C_out, C_in·k…)`` (a view when contiguous)."""
        w = _as_conv(module, type(module).__name__).weight
        return _expect_shape(t, w, "t").reshape(w.shape[0], -1)

    def to_weight_layout(self, module: nn.Module, m: Tensor) -> Tensor:
        """A ``(C_out, C_in·k…)`` matrix reshaped to ``weight``'s ``(C_out, C_in, k…)``."""
        w = _as_conv(module, type(module).__name__).weight
        return _expect_shape(m, self.weight(module), "m").reshape(w.shape)


def _expect_shape(t: Tensor, like: Tensor, what: str) -> Tensor:
    if not isinstance(t, Tensor) or tuple(t.shape) != tuple(like.shape):
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"Expected `{what}` to be a tensor of shape {tuple(like.shape)}, but got {got}")
    return t


def _first_tensor(module: nn.Module, inputs: tuple[object, ...]) -> Tensor:
    x = inputs[0] if inputs else None
    if not isinstance(x, Tensor):
        raise CanonRegError(
            f"Layer of type {type(module).__name__} received a non-tensor first input ({type(x).__name__}); "
            "cannot tap it"
        )
    return x


def _as_conv(module: nn.Module, name: str) -> nn.Conv1d | nn.Conv2d:
    if not isinstance(module, (nn.Conv1d, nn.Conv2d)):
        raise CanonRegError(
            f"Layer {name!r} ({type(module).__name__}) was given ConvTap, which supports nn.Conv1d and nn.Conv2d only"
        )
    return module


def tap_batch_size(tap: LayerTap, module: nn.Module, inputs: tuple[object, ...]) -> int:
    """Samples in one call: ``tap.batch_size`` when the tap defines it, else the first input's first dim."""
    fn = getattr(tap, "batch_size", None)
    if callable(fn):
        return int(fn(module, inputs))
    x = _first_tensor(module, inputs)
    return int(x.shape[0]) if x.dim() > 1 else 1


_REGISTRY: dict[type[nn.Module], LayerTap] = {
    nn.Linear: LinearTap(),
    nn.Conv1d: ConvTap(),
    nn.Conv2d: ConvTap(),
    nn.MultiheadAttention: MultiheadAttentionTap(),  # type: ignore[dict-item]  # sub-layers q, k, v, out
}


def register_tap(module_type: type[nn.Module], tap: LayerTap) -> None:
    """Register ``tap`` for ``module_type`` (and its subclasses without a tap of their own).

    Example:
        >>> class Scale(nn.Module): ...
        >>> register_tap(Scale, MyScaleTap())  # doctest: +SKIP
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"Expected `module_type` to be an nn.Module subclass, but got {module_type!r}")
    if isinstance(tap, type):
        raise TypeError(f"Expected `tap` to be a LayerTap instance, e.g. {tap.__name__}(), but got the class {tap.__name__}")
    for meth in ("check", "input_rows", "output_rows", "weight", "bias"):
        if not callable(getattr(tap, meth, None)):
            raise TypeError(f"Expected `tap` to implement LayerTap (missing `{meth}`), but got {type(tap).__name__}")
    _REGISTRY[module_type] = tap


#: Taps for classes of optional libraries, keyed by ``(cls.__module__, cls.__qualname__)``: matched
#: by name so that canonreg never imports the library; an instance can only exist once it is imported.
_BY_NAME: dict[tuple[str, str], LayerTap] = {
    ("transformers.pytorch_utils", "Conv1D"): TransposedLinearTap(),
    ("transformers.modeling_utils", "Conv1D"): TransposedLinearTap(),  # transformers < 4.20
}

#: Methods whose override means a subclass may apply another weight than its parent's tap assumes.
_FORWARD_METHODS = ("forward", "_conv_forward")


def default_taps() -> dict[type[nn.Module], LayerTap]:
    """A copy of the global tap registry (with ``transformers``' Conv1D once ``transformers`` is imported)."""
    out = dict(_REGISTRY)
    for (mod, qualname), tap in _BY_NAME.items():
        cls = getattr(sys.modules.get(mod), qualname, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module) and (cls.__module__, cls.__qualname__) == (mod, qualname):
            out.setdefault(cls, tap)
    return out


def _lookup(cls: type, table: dict[type[nn.Module], LayerTap]) -> LayerTap | None:
    if cls in table:
        return table[cls]  # type: ignore[index]
    return _BY_NAME.get((cls.__module__, cls.__qualname__))


def _resolve(module: nn.Module, taps: dict[type[nn.Module], LayerTap] | None) -> tuple[LayerTap | None, type | None, type | None]:
    """``(tap, class it was registered for, overriding class)`` walking ``type(module).__mro__``.

    The walk stops at the first class with a tap; if a class before it defines its own ``forward``
    (or ``_conv_forward``), the tap is refused and that class returned as the override.
    """
    table = _REGISTRY if taps is None else {**_REGISTRY, **taps}
    override: type | None = None
    for cls in type(module).__mro__:
        tap = _lookup(cls, table)
        if tap is not None:
            return (None, cls, override) if override is not None else (tap, cls, None)
        if override is None and any(m in vars(cls) for m in _FORWARD_METHODS):
            override = cls
    return None, None, None


def get_tap(module: nn.Module, taps: dict[type[nn.Module], LayerTap] | None = None) -> LayerTap | None:
    """The tap for ``module``: its exact type's, else the nearest registered base class's (MRO order).

    A base class's tap is used only if no class between it and ``type(module)`` defines its own
    ``forward`` (or ``_conv_forward``): such a subclass may apply another weight (see
    :func:`untapped_reason`) and has no tap until one is registered for it.
    """
    return _resolve(module, taps)[0]


def untapped_reason(module: nn.Module, taps: dict[type[nn.Module], LayerTap] | None = None) -> str | None:
    """Why ``module`` has no tap (None when it has one), for ``excluded`` lists and error messages."""
    tap, base, override = _resolve(module, taps)
    if tap is not None:
        return None
    name = type(module).__name__
    hint = f"register a tap for it with canonreg.register_tap({name}, tap) to measure it"
    if base is not None and override is not None:
        return (
            f"{name} subclasses {base.__module__}.{base.__qualname__} but {override.__qualname__} defines its own "
            f"`forward`/`_conv_forward`, so the weight it applies may differ from `.weight` (e.g. timm's "
            f"StdConv2d standardises it); canonreg does not take it as its parent: {hint}"
        )
    for types, why in _UNTAPPED:
        if isinstance(module, types):
            return f"{name}: {why}; {hint}"
    return (
        f"{name} has parameters but no tap (canonreg measures layers h_b = W h_a + b with a tap: Linear, "
        f"Conv1d, Conv2d, transformers Conv1D and registered types); {hint}"
    )


#: Reasons for common parameterised modules without a tap (checked in order).
_UNTAPPED: tuple[tuple[type | tuple[type, ...], str], ...] = (
    ((nn.Embedding,), "a lookup table (h_a one-hot, num_embeddings-sized moments); its tap is opt-in for small "
     "vocabularies: taps={nn.Embedding: canonreg.taps.EmbeddingTap()}"),
    ((nn.EmbeddingBag,), "a lookup table with pooling; no built-in tap"),
    ((nn.RNNBase,), "recurrent weights are applied inside a fused kernel over all time steps, so hooks see "
     "only whole sequences; no built-in tap"),
    ((nn.Bilinear,), "a bilinear form x1ᵀ A x2, not h_b = W h_a + b; no built-in tap"),
    ((nn.modules.conv._ConvTransposeNd,), "transposed convolution; no built-in tap"),
    ((nn.Conv3d,), "3-D convolution; no built-in tap"),
    ((nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", nn.LayerNorm)),  # RMSNorm: torch>=2.4
     "a normalisation layer: elementwise scale and shift, no weight matrix W"),
    ((nn.PReLU,), "a learnable activation (elementwise), no weight matrix W"),
)


def views_within(t: Tensor, p: Tensor) -> bool:
    """Whether ``t`` views elements of ``p`` only: the same storage object (not just address: meta tensors
    all sit at 0) and every element of ``t`` inside ``p``'s span (``p`` itself, a reshape, transpose or slice)."""
    if t.untyped_storage()._cdata != p.untyped_storage()._cdata or t.numel() > p.numel():
        return False
    lo = t.storage_offset() - p.storage_offset()
    return 0 <= lo and lo + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) < p.numel()


def _owning_parameter(name: str, module: nn.Module, w: Tensor) -> nn.Parameter:
    """The parameter of ``module`` (or of a submodule) whose storage ``w`` views: a whole parameter, a
    reshape or transpose of one, or a slice of one (MHA's q, k, v: row blocks of ``in_proj_weight``)."""
    for p in module.parameters():
        if views_within(w, p):
            return p
    raise CanonRegError(
        f"Layer {name!r} ({type(module).__name__}): its tap's weight is not a parameter of the module or a view "
        "of one (reshape, transpose, slice), so its layout in the parameter is unknown"
    )


def read_weight(tap: LayerTap, module: nn.Module) -> torch.Tensor:
    """``tap.weight(module)`` without a parametrization's training-mode side effects.

    A parametrized weight is recomputed at every read; ``spectral_norm`` also runs a power-iteration step
    (updating its ``_u``/``_v`` buffers) at each read in training mode, so a hook that reads ``W`` would
    change training. Read here, the parametrizations run in eval mode: the value the layer's own forward
    pass used (the buffers it left), differentiable as in training, and no buffer touched.
    """
    if not nn.utils.parametrize.is_parametrized(module):
        return tap.weight(module)
    plist = module.parametrizations
    assert isinstance(plist, nn.Module)
    modes = [(m, m.training) for m in plist.modules()]
    plist.train(False)
    try:
        return tap.weight(module)
    finally:
        for m, mode in modes:
            m.training = mode


def weight_matrix(module: nn.Module, taps: dict[type[nn.Module], LayerTap] | None = None) -> Tensor:
    """``W`` of ``module`` as a differentiable ``(d_b, d_a)`` view (``h_b = W h_a + b``).

    Raises:
        CanonRegError: ``module`` has no tap (the message says why).
    """
    tap = get_tap(module, taps)
    if tap is None:
        raise CanonRegError(f"{untapped_reason(module, taps)}")
    return read_weight(tap, module)


def weight_parameter(tap: LayerTap, module: nn.Module, name: str = "") -> nn.Parameter:
    """The parameter of ``module`` (its own, not a child's) behind ``tap.weight(module)``.

    Raises:
        CanonRegError: the tap's weight is no whole parameter or view of one (e.g. computed).
    """
    return _owning_parameter(name or type(module).__name__, module, read_weight(tap, module))


def _weight_and_parameter(tap: LayerTap, module: nn.Module) -> tuple[Tensor, nn.Parameter]:
    """``W`` as the tap gives it and the parameter whose storage it views (for stride-derived layouts)."""
    w = read_weight(tap, module)
    return w, _owning_parameter(type(module).__name__, module, w)


def matrix_view(tap: LayerTap, module: nn.Module, t: Tensor) -> Tensor:
    """``t``, shaped like the weight parameter, in the tap's ``(d_b, d_a)`` layout of ``W``.

    ``matrix_view(tap, m, p) is tap.weight(m)`` elementwise for the parameter ``p`` itself; apply it
    to ``p.grad``, a noise draw or optimizer state to read or write them as ``(d_b, d_a)`` matrices
    (GPT-2's Conv1D: ``tᵀ``; a convolution: ``t.reshape(C_out, -1)``). When ``t`` has the
    parameter's strides the result is a view, so in-place updates (``addmm_``, ``add_``) reach ``t``.
    Uses the tap's ``matrix_view`` method when it defines one, else the strides of
    ``tap.weight(module)`` relative to its parameter.
    """
    own = getattr(tap, "matrix_view", None)
    if callable(own):
        return own(module, t)  # type: ignore[no-any-return]
    w, p = _weight_and_parameter(tap, module)
    _expect_shape(t, p, "t")
    if t.stride() != p.stride():
        t = torch.empty_strided(p.shape, p.stride(), dtype=t.dtype, device=t.device).copy_(t)
    return t.as_strided(w.shape, w.stride(), t.storage_offset() + w.storage_offset() - p.storage_offset())


def to_weight_layout(tap: LayerTap, module: nn.Module, m: Tensor) -> Tensor:
    """The inverse of :func:`matrix_view`: a ``(d_b, d_a)`` matrix as a tensor of the weight parameter's shape.

    ``to_weight_layout(tap, mod, tap.weight(mod))`` equals the parameter (zero outside ``W`` when ``W``
    is a slice of it, as MHA's q, k, v are of ``in_proj_weight``); the noise wrapper adds
    ``to_weight_layout(tap, mod, N)`` to ``p.grad``. Uses the tap's ``to_weight_layout`` method
    when it defines one, else the strides of ``tap.weight(module)`` relative to its parameter.
    """
    own = getattr(tap, "to_weight_layout", None)
    if callable(own):
        return own(module, m)  # type: ignore[no-any-return]
    w, p = _weight_and_parameter(tap, module)
    _expect_shape(m, w, "m")
    out = torch.empty_strided(p.shape, p.stride(), dtype=m.dtype, device=m.device)
    if w.numel() < p.numel():  # W is a slice of the parameter (MHA's q, k, v): zeros elsewhere
        out.zero_()
    out.as_strided(w.shape, w.stride(), out.storage_offset() + w.storage_offset() - p.storage_offset()).copy_(m)
    return out


def functional_only_children(model: nn.Module) -> dict[str, str]:
    """Qualified names of tappable modules whose weights their parent applies functionally.

    ``nn.MultiheadAttention`` applies ``out_proj.weight`` inside ``F.multi_head_attention_forward``,
    so hooks on ``out_proj`` never fire. Returns ``{name: reason}``.
    """
    out: dict[str, str] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            child = f"{name}.out_proj" if name else "out_proj"
            out[child] = (
                "nn.MultiheadAttention applies out_proj's weights functionally "
                "(F.multi_head_attention_forward), so the module's own hooks never fire; it is measured as "
                f"{(name + '[out]')!r} when its attention module {name!r} is selected (canonreg.attention)"
            )
    return out



# ---------------------------------------------------------------------------- sample masks
_MASKS = threading.local()


def _mask_stack() -> list[Tensor | None]:
    """This thread's mask stack; a None entry unmasks (an encoder–decoder's decoder, :func:`mask_from_inputs`)."""
    stack: list[Tensor | None] | None = getattr(_MASKS, "stack", None)
    if stack is None:
        stack = _MASKS.stack = []
    return stack


def _as_mask(mask: object, what: str = "mask") -> Tensor:
    """``mask`` as a bool tensor; 0/1 integer or float masks (``attention_mask``) are accepted."""
    if not isinstance(mask, Tensor) or mask.dim() == 0:
        got = "a 0-d tensor" if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"Expected `{what}` to be a tensor of shape (batch, positions…) (True = a real sample), but got {got}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(
            f"Expected `{what}` to be a bool or 0/1 tensor (1 = a real position, as an attention_mask), but got "
            f"dtype {mask.dtype} with other values (an additive mask of 0/-inf? pass `mask == 0`)"
        )
    return mask != 0


@contextlib.contextmanager
def masked(mask: Tensor) -> Iterator[Tensor]:
    """Inside the block, positions where ``mask`` is False are no samples for canonreg's hooks.

    For every layer call a :class:`~canonreg.CRHMonitor` or :class:`~canonreg.AlignmentLoss` records
    inside the block, the rows of ``h_a``, ``h_b``, ``g_a`` and ``g_b`` whose position is masked out are
    dropped (the same rows for all four), so ``H = E_{mask}[h̃ h̃ᵀ]``, ``G = E_{mask}[g̃ g̃ᵀ]`` are means
    over the real positions only. ``mask`` is ``(batch, positions…)``, bool or 0/1 (a Hugging Face
    ``attention_mask`` as is; for token targets, ``labels != -100``). Which rows a layer call keeps:

    * ``rows == mask.numel()`` (a per-position layer): the rows where ``mask.reshape(-1)`` is True; rows
      are batch-major as the built-in taps order them, except an ``nn.Linear`` on sequence-first
      ``(positions, batch, features)`` inputs (``nn.Transformer*`` with ``batch_first=False``), whose
      rows take the transposed mask (told apart by shape: with as many positions as sequences the layout is
      ambiguous and batch-major is assumed — use ``batch_first=True`` models there);
    * ``rows == mask.shape[0]`` (a per-sequence layer: a pooler, a classifier on a pooled vector): the
      sequences with at least one True position;
    * anything else (a strided convolution, a layer on another sequence length): a
      :class:`CanonRegError` naming the layer and both shapes.

    The rows are chosen at the forward call, so the backward pass may run after the block.
    Blocks nest (the innermost mask applies); the mask is per thread. A call keeping no row is not
    recorded. ``max_rows`` sub-sampling then draws among the kept rows.

    Example:
        >>> with canonreg.taps.masked(batch["attention_mask"]):  # doctest: +SKIP
        ...     loss = model(**batch).loss
        >>> loss.backward()  # doctest: +SKIP
    """
    m = _as_mask(mask)
    stack = _mask_stack()
    stack.append(m)
    try:
        yield m
    finally:
        stack.pop()


def active_mask() -> Tensor | None:
    """The bool mask of the innermost :func:`masked` block of this thread, or None."""
    stack = _mask_stack()
    return stack[-1] if stack else None


def _mask_rows(layer: str, n_rows: int, mask: Tensor, lead: tuple[int, ...] | None = None) -> Tensor:
    """The ``(n_rows,)`` bool keep-vector of one layer call under ``mask`` (see :func:`masked`).

    ``lead``: the leading dims the rows flatten (a Linear's ``x.shape[:-1]``), when known: a sequence-first
    ``(positions, batch)`` call (``nn.Transformer*`` with ``batch_first=False``) takes the transposed
    ``(batch, positions)`` mask, so each row keeps its own position's flag."""
    if n_rows == mask.numel():
        if lead is not None and mask.dim() == 2 and lead == (mask.shape[1], mask.shape[0]) and lead != tuple(mask.shape):
            return mask.T.reshape(-1)
        return mask.reshape(-1)
    if n_rows == mask.shape[0]:
        return mask.reshape(n_rows, -1).any(1)
    raise CanonRegError(
        f"Layer {layer!r}: the sample mask has shape {tuple(mask.shape)} ({mask.numel()} positions in "
        f"{mask.shape[0]} sequences) but this call of the layer has {n_rows} rows; a mask applies to layers "
        "with one row per position (batch × positions) or one per sequence. Leave the layer out with `layers=`, "
        "or run it outside the masked block"
    )


def kept_rows(
    layer: str,
    n_rows: int,
    device: torch.device,
    *,
    max_rows: int | None = None,
    generator: torch.Generator | None = None,
    lead: tuple[int, ...] | None = None,
) -> Tensor | None:
    """Indices of the rows one layer call contributes, or None for all of them.

    The rows the active :func:`masked` mask keeps (all without one), then at most ``max_rows`` of them
    drawn uniformly without replacement with ``generator`` (``torch.randperm`` on the CPU; without a
    mask exactly the draw ``randperm(n_rows)[:max_rows]``). The same indices select ``h_a``, ``h_b``,
    ``g_a`` and ``g_b``. An empty result means the call keeps no row.

    Raises:
        CanonRegError: the mask fits neither ``n_rows`` positions nor ``n_rows`` sequences (names ``layer``).
    """
    mask = active_mask()
    idx = None
    n = n_rows
    if mask is not None:
        keep = _mask_rows(layer, n_rows, mask, lead)
        if not bool(keep.all()):
            idx = keep.nonzero().reshape(-1).to(device)
            n = idx.numel()
    if max_rows is not None and n > max_rows:
        pick = torch.randperm(n, generator=generator)[:max_rows].to(device)
        idx = pick if idx is None else idx[pick]
    return idx


def leading_shape(tap: LayerTap, module: nn.Module, inputs: tuple[object, ...]) -> tuple[int, ...] | None:
    """The leading dims a :class:`LinearTap` call's rows flatten (``x.shape[:-1]`` of a ≥ 3-D input), else None
    (other taps order their rows batch-major themselves)."""
    if not isinstance(tap, LinearTap):
        return None
    x = _first_tensor(module, inputs)
    return tuple(x.shape[:-1]) if x.dim() >= 3 else None


def take_rows(rows: Tensor, idx: Tensor | None) -> Tensor:
    """``rows[idx]`` (differentiable), or ``rows`` itself when ``idx`` is None (see :func:`kept_rows`)."""
    return rows if idx is None else rows.index_select(0, idx)


def mask_from_inputs(model: nn.Module, key: str = "attention_mask") -> _Handles:
    """Apply :func:`masked` to every forward call of ``model`` that gets the keyword argument ``key``.

    For loops one cannot wrap in a ``with`` block (the Hugging Face ``Trainer``): each call
    ``model(..., attention_mask=m)`` runs as if inside ``with masked(m):``; calls without ``key`` (or
    with ``key=None``) are unmasked. An encoder–decoder (``model.config.is_encoder_decoder``, e.g. T5,
    BART): the mask applies to the encoder stack's positions only; the decoder's layers (another sequence)
    run unmasked, every decoder position a sample. Returns a handle; ``handle.remove()`` removes both hooks. Copies
    of the model (deepcopy, pickle) do not carry them.

    Example:
        >>> handle = canonreg.taps.mask_from_inputs(model)  # doctest: +SKIP
        >>> model(input_ids=ids, attention_mask=am, labels=labels).loss.backward()  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be an nn.Module, but got {type(model).__name__}")
    if not isinstance(key, str) or not key:
        raise TypeError(f"Expected `key` to be a keyword-argument name, but got {key!r}")
    stacks = _encoder_decoder(model)
    if stacks is None:
        return _Handles(*_mask_hooks(model, key, unmask=False))
    # An encoder–decoder: one attention_mask belongs to the encoder's positions, never to the decoder's (another
    # length, or the same length and other positions): the encoder stack takes the mask its call gets, the
    # decoder stack runs unmasked (every decoder position is a sample).
    encoder, decoder = stacks
    return _Handles(*_mask_hooks(encoder, key, unmask=False), *_mask_hooks(decoder, key, unmask=True))


def _encoder_decoder(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The encoder and decoder stacks of a Hugging Face encoder–decoder model (``config.is_encoder_decoder``), else None."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    get_encoder, get_decoder = getattr(model, "get_encoder", None), getattr(model, "get_decoder", None)
    if not (callable(get_encoder) and callable(get_decoder)):
        return None
    encoder, decoder = get_encoder(), get_decoder()
    return (encoder, decoder) if isinstance(encoder, nn.Module) and isinstance(decoder, nn.Module) else None


def _mask_hooks(module: nn.Module, key: str, *, unmask: bool) -> tuple[RemovableHandle, RemovableHandle]:
    """Pre/post hooks: each call of ``module`` runs inside ``masked(kwargs[key])`` (``unmask``: with no mask)."""
    from .layers import OwnedHook  # layers imports this module

    opened: list[contextlib.ExitStack] = []

    def pre(module: nn.Module, args: tuple[object, ...], kwargs: dict[str, Any]) -> None:
        stack = contextlib.ExitStack()
        if unmask:
            stack.enter_context(_unmasked())
        else:
            value = kwargs.get(key)
            if value is not None:
                stack.enter_context(masked(_as_mask(value, key)))
        opened.append(stack)

    def post(module: nn.Module, args: tuple[object, ...], output: object) -> None:
        if opened:
            opened.pop().close()

    return (
        module.register_forward_pre_hook(OwnedHook(pre), with_kwargs=True),
        module.register_forward_hook(OwnedHook(post), always_call=True),
    )


@contextlib.contextmanager
def _unmasked() -> Iterator[None]:
    """Inside, no :func:`masked` block applies (an inner scope that is not the outer mask's positions)."""
    stack = _mask_stack()
    stack.append(None)
    try:
        yield
    finally:
        stack.pop()


class _Handles:
    """Removes several hook handles at once (``remove()`` is idempotent)."""

    def __init__(self, *handles: RemovableHandle) -> None:
        self._handles = list(handles)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
