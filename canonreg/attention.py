"""``nn.MultiheadAttention`` as four measured layers: the q, k, v projections and the output projection.

For an attention module named ``attn`` with embedding width ``E`` (theory §1, one layer per map):

    attn[q]   h_b = W_q h_a + b_q,  W_q = in_proj_weight[0:E]    (q_proj_weight when kdim/vdim ≠ E)
    attn[k]   h_b = W_k h_a + b_k,  W_k = in_proj_weight[E:2E]   (k_proj_weight)
    attn[v]   h_b = W_v h_a + b_v,  W_v = in_proj_weight[2E:3E]  (v_proj_weight)
    attn[out] h_b = W_o h_a + b_o,  W_o = out_proj.weight

where ``h_a`` is the query (key, value) token and ``h_b`` its projection; ``attn[out]``'s ``h_a`` is the
concatenated head output. Every token position is a sample; rows are batch-major (sample ``i`` of the
batch, then its positions), whatever ``batch_first`` says, so sample masks apply as for any layer.

**How the rows are read.** ``nn.MultiheadAttention`` applies all four weights inside
``F.multi_head_attention_forward``, where no module hook can see ``q``, ``k``, ``v`` or their
gradients. During each measured call, :class:`MultiheadAttentionTap` opens that function: a
``TorchFunctionMode`` (:class:`_Spy`) runs its body — the same code object, with the one
``has_torch_function`` dispatch check that would hand the whole call to the mode turned off — and
sees each ``F.linear`` the body makes. A call whose weight is ``in_proj_weight`` or a row slice of
it (self-attention: one packed ``3E``-wide call; ``key is value``: ``q`` then a ``2E``-wide ``kv``
call; otherwise three calls), a separate ``{q,k,v}_proj_weight`` or ``out_proj.weight`` is delivered
as a call of the sub-layers whose rows it covers. Nothing is recomputed: the output is bit-identical
to the module's own, and the only cost is the row copies the owner asks for.

The fast inference path (``torch._native_multi_head_attention``, taken only without autograd) is
never measured: canonreg records grad-enabled calls only.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .errors import CanonRegError

__all__ = ["MultiheadAttentionTap", "ProjectionTap"]

#: Deliver one inner call: ``(sub-layer, its tap for this call, (h_a source,), linear output)``.
Deliver = Callable[[str, "ProjectionCallTap", tuple[object, ...], Tensor], None]

_SUBS = ("q", "k", "v", "out")


def _mha(module: nn.Module, name: str = "") -> nn.MultiheadAttention:
    if not isinstance(module, nn.MultiheadAttention):
        raise CanonRegError(f"Layer {name or type(module).__name__!r} ({type(module).__name__}) was given an attention tap, which supports nn.MultiheadAttention only")
    return module


@dataclass(frozen=True)
class ProjectionTap:
    """The weight, bias and layout of one projection (``"q"``, ``"k"``, ``"v"`` or ``"out"``) of an MHA module.

    ``weight(module)`` is a differentiable view of the parameter (a row slice of ``in_proj_weight``
    for a packed q/k/v), so losses differentiate through it and ``matrix_view``/``to_weight_layout``
    (strides relative to the parameter) place gradients and noise in the right rows. Rows come from
    the per-call :class:`ProjectionCallTap` the engine hands out with each call.
    """

    which: str

    def check(self, module: nn.Module, name: str) -> None:
        _mha(module, name)

    def weight(self, module: nn.Module) -> Tensor:
        m = _mha(module)
        if self.which == "out":
            return m.out_proj.weight
        if not m._qkv_same_embed_dim:
            return getattr(m, f"{self.which}_proj_weight")  # type: ignore[no-any-return]
        i, e = _SUBS.index(self.which), m.embed_dim
        assert m.in_proj_weight is not None
        return m.in_proj_weight[i * e : (i + 1) * e]

    def bias(self, module: nn.Module) -> Tensor | None:
        m = _mha(module)
        if self.which == "out":
            return m.out_proj.bias
        if m.in_proj_bias is None:
            return None
        i, e = _SUBS.index(self.which), m.embed_dim
        return m.in_proj_bias[i * e : (i + 1) * e]

    def input_rows(self, module: nn.Module, inputs: tuple[object, ...]) -> Tensor:
        raise CanonRegError(f"{self.which!r} projection rows come with each call (ProjectionCallTap); this tap only gives W and b")

    def output_rows(self, module: nn.Module, output: Tensor) -> Tensor:
        raise CanonRegError(f"{self.which!r} projection rows come with each call (ProjectionCallTap); this tap only gives W and b")


@dataclass(frozen=True)
class ProjectionCallTap(ProjectionTap):
    """One ``F.linear`` call inside the attention, seen as a call of sub-layer ``which``.

    Inside ``F.multi_head_attention_forward`` tensors are sequence-first: the linear's input is
    ``(T, N, d_a)`` (or ``(T·N, d_a)``, position-major, for the output projection; ``(T, d_a)``
    unbatched). Rows are reordered batch-major, ``(N·T, ·)``; the output's columns
    ``[col0, col0 + width)`` are this sub-layer's (a packed call computes q, k and v at once).
    """

    col0: int = 0
    width: int = 0
    batch: int = 1

    def _rows(self, t: Tensor) -> Tensor:
        d = t.shape[-1]
        return t.reshape(-1, self.batch, d).transpose(0, 1).reshape(-1, d)

    def input_rows(self, module: nn.Module, inputs: tuple[object, ...]) -> Tensor:
        x = inputs[0]
        assert isinstance(x, Tensor)
        return self._rows(x)

    def output_rows(self, module: nn.Module, output: Tensor) -> Tensor:
        return self._rows(output[..., self.col0 : self.col0 + self.width])

    def batch_size(self, module: nn.Module, inputs: tuple[object, ...]) -> int:
        return self.batch

    # Rows are not batch-leading in the call's tensors: per-sample selection goes through the rows.
    batch_leading = False


class MultiheadAttentionTap:
    """Built-in tap of ``nn.MultiheadAttention``: sub-layers ``q``, ``k``, ``v``, ``out`` (module docstring).

    The module itself has no single ``W``: its ``weight``/``bias``/rows raise; the engine measures
    the sub-layers through :meth:`open_call`.
    """

    def check(self, module: nn.Module, name: str) -> None:
        _mha(module, name)

    def sublayers(self, module: nn.Module) -> dict[str, ProjectionTap]:
        return {s: ProjectionTap(s) for s in _SUBS}

    def open_call(self, module: nn.Module, args: tuple[object, ...], kwargs: Mapping[str, Any], deliver: Deliver) -> _Spy:
        """The context to hold during one forward call: it hands each projection's call to ``deliver``."""
        m = _mha(module)
        query = args[0] if args else kwargs.get("query")
        if not isinstance(query, Tensor):
            raise CanonRegError(f"nn.MultiheadAttention was called without a query tensor (got {type(query).__name__})")
        batch = 1 if query.dim() == 2 else int(query.shape[0] if m.batch_first else query.shape[1])
        return _Spy(m, batch, deliver)

    def _whole(self, module: nn.Module) -> Tensor:
        raise CanonRegError(
            "nn.MultiheadAttention has no single weight matrix: it is measured as four sub-layers "
            "'<name>[q]', '<name>[k]', '<name>[v]', '<name>[out]' (canonreg.attention)"
        )

    def weight(self, module: nn.Module) -> Tensor:
        return self._whole(module)

    def bias(self, module: nn.Module) -> Tensor | None:
        return self._whole(module)

    def input_rows(self, module: nn.Module, inputs: tuple[object, ...]) -> Tensor:
        return self._whole(module)

    def output_rows(self, module: nn.Module, output: Tensor) -> Tensor:
        return self._whole(module)


def _opened_attention() -> Callable[..., Any]:
    """``F.multi_head_attention_forward`` without its ``__torch_function__`` dispatch of the whole call.

    The same code object over a copy of ``torch.nn.functional``'s globals in which
    ``has_torch_function`` is False, so a mode sees the ops the body runs (``linear`` above all)
    instead of one opaque call. The copy is taken at each call (a few microseconds), so the body uses
    ``torch.nn.functional`` as it is then, including anything patched into it after canonreg was imported.
    """
    f = F.multi_head_attention_forward
    ns = dict(vars(F))
    ns["has_torch_function"] = _never
    opened = types.FunctionType(f.__code__, ns, f.__name__, f.__defaults__, f.__closure__)
    opened.__kwdefaults__ = f.__kwdefaults__
    return opened


def _never(*_args: object, **_kwargs: object) -> bool:
    return False


class _Spy(TorchFunctionMode):
    """Held during one measured MHA call: delivers the ``F.linear`` calls made with the module's projection weights."""

    def __init__(self, module: nn.MultiheadAttention, batch: int, deliver: Deliver) -> None:
        super().__init__()
        self.module, self.batch, self.deliver = module, batch, deliver

    def __torch_function__(self, func: Any, types_: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            with self:  # (the mode is popped while its __torch_function__ runs) see the body's ops
                return _opened_attention()(*args, **kwargs)
        out = func(*args, **kwargs)
        if func is F.linear and isinstance(out, Tensor):
            x = args[0] if args else kwargs.get("input")
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            if isinstance(x, Tensor) and isinstance(w, Tensor):
                for sub, col0, width in self._covered(w):
                    self.deliver(sub, ProjectionCallTap(sub, col0, width, self.batch), (x,), out)
        return out

    def _covered(self, w: Tensor) -> list[tuple[str, int, int]]:
        """``(sub-layer, first output column, width)`` for each projection whose rows ``w`` holds."""
        m = self.module
        if w is m.out_proj.weight:
            return [("out", 0, int(w.shape[0]))]
        if not m._qkv_same_embed_dim:
            return [(s, 0, int(w.shape[0])) for s in _SUBS[:3] if w is getattr(m, f"{s}_proj_weight")]
        p, e = m.in_proj_weight, m.embed_dim
        if p is None or w.dim() != 2 or w.stride() != p.stride() or w.untyped_storage()._cdata != p.untyped_storage()._cdata:
            return []
        first = (w.storage_offset() - p.storage_offset()) // p.stride(0)
        last = first + int(w.shape[0])
        return [(s, i * e - first, e) for i, s in enumerate(_SUBS[:3]) if first <= i * e and (i + 1) * e <= last]
