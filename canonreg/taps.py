"""Layer taps: how a module exposes ``h_a`` rows, ``h_b``/``g_b`` rows and its matrix ``W``.

A tap turns one call of a module into per-sample rows (crh-spec §1):

* ``nn.Linear``: every position of any leading dimensions is a sample; ``h_a`` is the input row,
  ``h_b`` the output row, ``W`` the weight.
* ``nn.Conv1d`` / ``nn.Conv2d``: every output position is a sample; ``h_a`` is the unfolded input
  patch (``C_in·k`` or ``C_in·kh·kw``) *including* the padding the layer applies, ``W`` the weight
  reshaped to ``(C_out, C_in·k…)``, ``h_b``/``g_b`` the ``C_out`` vectors. Then
  ``h_b = W h_a + b`` holds exactly per position. Grouped convolutions raise a clear error.

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

from typing import Protocol, runtime_checkable

import torch.nn.functional as F
from torch import Tensor, nn

from .errors import CanonRegError

__all__ = ["LayerTap", "LinearTap", "ConvTap", "register_tap", "get_tap", "default_taps", "tap_batch_size"]


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


class ConvTap:
    """Tap for ``nn.Conv1d`` / ``nn.Conv2d`` (every output position is a sample)."""

    def check(self, module: nn.Module, name: str) -> None:
        conv = _as_conv(module, name)
        if conv.groups != 1:
            raise CanonRegError(
                f"Layer '{name}' is a grouped convolution (groups={conv.groups}); canonreg taps support "
                "groups=1 only. Exclude it with `layers=` or register a custom tap."
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
}


def register_tap(module_type: type[nn.Module], tap: LayerTap) -> None:
    """Register ``tap`` for ``module_type`` (and its subclasses without a tap of their own).

    Example:
        >>> class Scale(nn.Module): ...
        >>> register_tap(Scale, MyScaleTap())  # doctest: +SKIP
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"Expected `module_type` to be an nn.Module subclass, but got {module_type!r}")
    for meth in ("check", "input_rows", "output_rows", "weight", "bias"):
        if not callable(getattr(tap, meth, None)):
            raise TypeError(f"Expected `tap` to implement LayerTap (missing `{meth}`), but got {type(tap).__name__}")
    _REGISTRY[module_type] = tap


def default_taps() -> dict[type[nn.Module], LayerTap]:
    """A copy of the global tap registry."""
    return dict(_REGISTRY)


def get_tap(module: nn.Module, taps: dict[type[nn.Module], LayerTap] | None = None) -> LayerTap | None:
    """The tap for ``module``: exact type first, then the nearest registered base class (MRO order)."""
    table = _REGISTRY if taps is None else {**_REGISTRY, **taps}
    for cls in type(module).__mro__:
        if cls in table:
            return table[cls]  # type: ignore[index]
    return None


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
                "(F.multi_head_attention_forward), so the module's own hooks never fire"
            )
    return out

