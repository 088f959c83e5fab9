"""Factored moments and the exact alignment math of :class:`~canonreg.AlignmentLoss` (pure functions).

Everything α needs is five scalars, ``⟨A,B⟩_F``, ``‖A‖_F²``, ``‖B‖_F²``, ``1ᵀA1``, ``1ᵀB1``
(Pearson: ``cov = ⟨A,B⟩ − (1ᵀA1)(1ᵀB1)/N``, ``var_A = ‖A‖² − (1ᵀA1)²/N``, ``N = d²``), and each is
a trace identity of factored matrices (theory §3), so no ``d × d`` matrix is ever built when the
operands are a batch moment ``H = FᵀF`` (``F`` the preprocessed, centred rows over ``√n``) or a weight
Gram ``Z_a = WᵀW`` / ``Z_b = WWᵀ``:

    ⟨FᵀF, WᵀW⟩ = ‖F Wᵀ‖_F²            (= ‖rows of h_b − b, same preprocessing‖²: free for f-RWA)
    ⟨FᵀF, WWᵀ⟩ = ‖F W‖_F²
    ⟨FᵀF, GᵀG⟩ = ‖F Gᵀ‖_F²            (n × n'; two d × d moments instead when d < n/2)
    ‖FᵀF‖_F²   = ‖F Fᵀ‖_F²            (the min(n, d)-sized Gram)
    ‖WᵀW‖_F²   = ‖W Wᵀ‖_F²            (the min(d_a, d_b)-sized Gram; shared by Z_a and Z_b)
    1ᵀ FᵀF 1   = ‖F 1‖²,   1ᵀ WᵀW 1 = ‖W 1‖²,   1ᵀ WWᵀ 1 = ‖Wᵀ 1‖²
    ⟨C, FᵀF⟩   = Σ (F Cᵀ) ∘ F,   ⟨C, WᵀW⟩ = Σ (W Cᵀ) ∘ W,   ⟨C, WWᵀ⟩ = Σ (C W) ∘ W   (C dense)

The operands (:class:`RowMoment`, :class:`WeightGram`, :class:`LazyRowMoment`) are what
:mod:`canonreg.sketch` multiplies by probes for the randomized estimator. :class:`~canonreg.AlignmentLoss`
calls these functions; tests check it against them and them against dense matrices. Every name is
re-exported by :mod:`canonreg.losses`.

References: Ziyin, Chuang, Galanti & Poggio, "Formation of Representations in Neural Networks",
arXiv:2410.03006 (CRH, the six relations, α).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import functional as CF
from .errors import check_choice

__all__ = [
    "LazyRowMoment",
    "MomentOperand",
    "RowMoment",
    "SketchOperand",
    "WeightGram",
    "alignment_from_moments",
    "alignment_loss",
    "entry_sum",
    "factored_alignment",
    "frobenius_inner",
    "gram_sqnorm",
    "row_moment",
    "spectral_flatness",
    "squared_frobenius",
]

Side = Literal["a", "b"]


@dataclass(frozen=True, eq=False)
class RowMoment:
    """A second moment in factored form, ``M = Fᵀ F`` (``F``: ``(n, d)``), never materialised.

    Build it from samples with :func:`row_moment` (then ``M`` equals
    :func:`canonreg.functional.second_moment`). ``image`` optionally holds ``F Wᵀ`` for the layer's
    ``W``, which makes ``⟨M, WᵀW⟩ = ‖F Wᵀ‖²`` free when the layer output is at hand.
    """

    rows: Tensor
    image: Tensor | None = None
    _cache: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def dim(self) -> int:
        return int(self.rows.shape[1])

    def dense(self) -> Tensor:
        """``Fᵀ F`` as a ``(d, d)`` matrix (for references and tests; the losses never call it)."""
        return self.rows.T @ self.rows


@dataclass(frozen=True, eq=False)
class WeightGram:
    """A weight Gram matrix in factored form: ``Z_a = WᵀW`` (``side="a"``) or ``Z_b = WWᵀ`` (``"b"``).

    ``W`` is the layer matrix of shape ``(d_b, d_a)``. Two grams of one ``W`` may share ``_cache``
    so that ``‖Z_a‖_F = ‖Z_b‖_F`` is computed once.
    """

    weight: Tensor
    side: Side
    _cache: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1] if self.side == "a" else self.weight.shape[0])

    def dense(self) -> Tensor:
        w = self.weight
        return w.T @ w if self.side == "a" else w @ w.T


#: A matrix operand of the alignment functions: dense ``(d, d)`` tensor or a factored form.
MomentOperand = Tensor | RowMoment | WeightGram


@dataclass(frozen=True, eq=False)
class LazyRowMoment:
    """The moment of :func:`row_moment` kept as the raw rows: ``M = Fᵀ F`` with ``F = C D x / √n`` unformed.

    ``D = diag(1/‖x_i‖)`` (``normalized``) or ``I``, ``C = I − 11ᵀ/n`` (``centered``, ``normalized``) or
    ``I`` (``raw``). Sketches need only ``M Ω = xᵀ D C D (x Ω) / n`` (``C² = C``), so every elementwise
    step acts on ``(n, k)`` products instead of the ``(n, d)`` rows; only :func:`sketch_product` and
    :func:`entry_sum` accept it.
    """

    x: Tensor
    preprocess: CF.Preprocess
    _cache: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    def _inv_norms(self) -> Tensor | None:
        if self.preprocess != "normalized":
            return None
        if "inv" not in self._cache:
            norms = torch.linalg.vector_norm(self.x, dim=1, keepdim=True)
            self._cache["inv"] = 1.0 / torch.where(norms > 0, norms, torch.ones_like(norms))
        return self._cache["inv"]

    def _rows_of(self, p: Tensor) -> Tensor:
        """``C D p`` for ``p = x·(something)`` of shape ``(n, k)``."""
        inv = self._inv_norms()
        p = p if inv is None else p * inv
        return p if self.preprocess == "raw" else p - p.mean(0, keepdim=True)

    def dense(self) -> Tensor:
        """``M`` as a ``(d, d)`` matrix (for references and tests)."""
        return row_moment(self.x, self.preprocess).dense()


#: Operands a sketch accepts: every :data:`MomentOperand` and :class:`LazyRowMoment`.
SketchOperand = MomentOperand | LazyRowMoment


def _sum64(x: Tensor) -> Tensor:
    """Sum as a float64 scalar: reduced in the working dtype, then the scalar pieces of α are combined
    in float64 (Pearson subtracts large terms)."""
    return x.sum().to(torch.float64)


def _sq64(x: Tensor) -> Tensor:
    return (x * x).sum().to(torch.float64)


def row_moment(x: Tensor, preprocess: CF.Preprocess = "raw", *, image: Tensor | None = None) -> RowMoment:
    """Factor ``M = FᵀF`` of the second moment of the rows of ``x`` after the spec's preprocessing.

    ``F = P(x) / √n`` with ``P`` the identity (``raw``), row centring (``centered``), or per-row unit
    norm followed by centring (``normalized``), so that ``FᵀF`` equals
    :func:`canonreg.functional.second_moment` ``(x, preprocess)`` (population moments).

    ``image`` (optional, ``(n, d_b)``) is ``x Wᵀ`` for a matrix ``W``; it goes through the same
    row scaling and centring (both commute with right-multiplication by ``Wᵀ``), so the returned
    ``RowMoment.image`` is ``F Wᵀ``. For a layer, ``x Wᵀ = h_b − b``: the forward pass already
    computed it.

    Args:
        x: ``(n, d)`` samples.
        preprocess: ``"raw" | "centered" | "normalized"``.
        image: optional ``(n, d_b)`` rows of ``x Wᵀ``.

    Example:
        >>> x = torch.randn(50, 6, dtype=torch.float64)
        >>> m = row_moment(x, "centered")
        >>> torch.allclose(m.dense(), canonreg.functional.second_moment(x, "centered"))  # doctest: +SKIP
        True
    """
    check_choice("preprocess", preprocess, CF.PREPROCESS_MODES)
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"Expected `x` to be a non-empty 2-D (samples, features) tensor, but got {_describe(x)}")
    if image is not None and (not isinstance(image, Tensor) or image.dim() != 2 or image.shape[0] != x.shape[0]):
        raise ValueError(f"Expected `image` to be a ({x.shape[0]}, d_b) tensor, but got {_describe(image)}")
    n = x.shape[0]
    y, img = x, image
    if preprocess == "normalized":
        # the scaling of canonreg.functional.preprocess_rows, applied to x and to its image alike
        norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        y = x / norms
        img = None if image is None else image / norms
    if preprocess != "raw":
        # identical rows have no spread, but their mean need not round back to them: ulps would score an α
        centred = y - y.mean(0, keepdim=True)
        flat = CF._is_flat(centred, y)
        y = torch.where(flat, 0.0, centred)
        img = None if img is None else torch.where(flat, 0.0, img - img.mean(0, keepdim=True))
    scale = 1.0 / math.sqrt(n)
    return RowMoment(y * scale, None if img is None else img * scale)


class _GramSqNorm(torch.autograd.Function):
    """``‖XᵀX‖_F² = ‖XXᵀ‖_F²`` through the smaller Gram ``K``; backward ``4 K X`` (or ``4 X K``).

    Autograd would differentiate ``X @ X.T`` as a product of two inputs (two matmuls); the Gram is
    symmetric, so one matmul suffices.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        left = x.shape[0] <= x.shape[1]
        k = x @ x.T if left else x.T @ x
        ctx.save_for_backward(x, k)
        ctx.left = left
        return _sq64(k)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        x, k = ctx.saved_tensors
        g = (4.0 * grad).to(x.dtype)
        return g * (k @ x if ctx.left else x @ k)


def gram_sqnorm(x: Tensor) -> Tensor:
    """``‖XᵀX‖_F² = ‖XXᵀ‖_F²`` (float64 0-d tensor) via the ``min(n, d)``-sized Gram.

    Cost ``n·d·min(n, d)`` multiply-adds forward and the same backward (one matmul each way).
    First-order differentiable only (raises on double backward).
    """
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"Expected `x` to be a 2-D tensor, but got {_describe(x)}")
    return _GramSqNorm.apply(x)


def _describe(x: object) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def _dim(a: SketchOperand) -> int:
    if isinstance(a, (RowMoment, WeightGram, LazyRowMoment)):
        return a.dim
    if isinstance(a, Tensor) and a.dim() == 2 and a.shape[0] == a.shape[1]:
        return int(a.shape[0])
    raise TypeError(f"Expected a square matrix, a RowMoment or a WeightGram, but got {_describe(a)}")


def squared_frobenius(a: MomentOperand) -> Tensor:
    """``‖A‖_F²`` (float64): ``‖FFᵀ‖²`` / ``‖WWᵀ‖²`` via :func:`gram_sqnorm` for factored forms."""
    if isinstance(a, RowMoment):
        if "sq" not in a._cache:
            a._cache["sq"] = gram_sqnorm(a.rows)
        return a._cache["sq"]
    if isinstance(a, WeightGram):
        if "sq" not in a._cache:
            a._cache["sq"] = gram_sqnorm(a.weight)
        return a._cache["sq"]
    _dim(a)
    return _sq64(a)


def entry_sum(a: SketchOperand) -> Tensor:
    """``1ᵀ A 1`` (float64): ``‖F1‖²``, ``‖W1‖²`` (``Z_a``) or ``‖Wᵀ1‖²`` (``Z_b``)."""
    if isinstance(a, LazyRowMoment):
        if "sum" not in a._cache:
            a._cache["sum"] = _sq64(a._rows_of(a.x.sum(1, keepdim=True))) / a.x.shape[0]
        return a._cache["sum"]
    if isinstance(a, RowMoment):
        if "sum" not in a._cache:
            a._cache["sum"] = _sq64(a.rows.sum(1))
        return a._cache["sum"]
    if isinstance(a, WeightGram):
        key = "sum_" + a.side
        if key not in a._cache:
            a._cache[key] = _sq64(a.weight.sum(1 if a.side == "a" else 0))
        return a._cache[key]
    _dim(a)
    return _sum64(a)


def frobenius_inner(a: MomentOperand, b: MomentOperand) -> Tensor:
    """``⟨A, B⟩_F = Tr(AᵀB)`` (float64) by the trace identities in the module docstring.

    Cost (n rows, width d): RowMoment·WeightGram ``n·d_a·d_b`` (0 with an ``image``), RowMoment·RowMoment
    ``n·n'·d`` (or ``2·n·d²`` when ``d < n/2``), dense·factored ``n·d²`` or ``d_a·d_b·d``.
    """
    da, db = _dim(a), _dim(b)
    if da != db:
        raise ValueError(f"Expected operands of equal size, but got {da} × {da} and {db} × {db}")
    rank = {RowMoment: 0, WeightGram: 1}
    if rank.get(type(b), 2) < rank.get(type(a), 2):  # order: RowMoment, WeightGram, dense
        a, b = b, a
    if isinstance(a, RowMoment):
        f = a.rows
        if isinstance(b, WeightGram):
            if b.side == "a":
                return _sq64(a.image if a.image is not None else f @ b.weight.T)
            return _sq64(f @ b.weight)
        if isinstance(b, RowMoment):
            g = b.rows
            if 2 * f.shape[1] < min(f.shape[0], g.shape[0]):  # wide batch: two d × d moments are cheaper
                return _sum64((f.T @ f) * (g.T @ g))
            return _sq64(f @ g.T)
        assert isinstance(b, Tensor)  # the order above leaves a dense b here
        c = b.to(f.dtype)
        return _sum64((f @ c.T) * f)
    if isinstance(a, WeightGram):
        w = a.weight
        if isinstance(b, WeightGram):
            if b.side == a.side:
                return squared_frobenius(a)
            return _sum64(a.dense() * b.dense())  # ⟨WᵀW, WWᵀ⟩ (square W only); no relation uses it
        assert isinstance(b, Tensor)
        c = b.to(w.dtype)
        return _sum64((w @ c.T) * w) if a.side == "a" else _sum64((c @ w) * w)
    assert isinstance(a, Tensor) and isinstance(b, Tensor)
    return _sum64(a * b.to(a.dtype))


#: Centred energies ``‖A‖² − (1ᵀA1)²/N`` up to this many float64 ulps of ``‖A‖²`` are rounding: α undefined.
_FLAT_ENERGY = 64.0


def alignment_from_moments(
    inner: Tensor,
    sq_a: Tensor,
    sq_b: Tensor,
    sum_a: Tensor | None,
    sum_b: Tensor | None,
    numel: int | Tensor,
    metric: CF.Metric = "cosine",
) -> Tensor:
    """α from the five scalar moments of two matrices with ``numel`` (``N = d²``) entries each.

    ``cosine``: ``⟨A,B⟩ / sqrt(‖A‖² ‖B‖²)``;
    ``pearson``: ``(⟨A,B⟩ − s_A s_B/N) / sqrt((‖A‖² − s_A²/N)(‖B‖² − s_B²/N))`` with ``s = 1ᵀM1``.

    Elementwise: pass 1-D tensors (and a tensor ``numel``) to score many pairs at once. ``sum_a``,
    ``sum_b`` are unused by the cosine. Clamped to ``[−1, 1]``; NaN where a denominator is not
    positive (alignment undefined), as :func:`canonreg.functional.alignment`.
    """
    check_choice("metric", metric, CF.METRICS)
    if metric == "pearson":
        if sum_a is None or sum_b is None:
            raise ValueError("Expected `sum_a` and `sum_b` (entry sums) with metric='pearson', but got None")
        n = numel if isinstance(numel, Tensor) else float(numel)
        inner = inner - sum_a * sum_b / n
        raw_a, raw_b = sq_a, sq_b
        sq_a = sq_a - sum_a * sum_a / n
        sq_b = sq_b - sum_b * sum_b / n
        # a spread at the rounding level of ‖A‖² is none (a constant matrix whose mean does not round exactly)
        tol = _FLAT_ENERGY * torch.finfo(torch.float64).eps
        sq_a = torch.where(sq_a > tol * raw_a, sq_a, torch.zeros_like(sq_a))
        sq_b = torch.where(sq_b > tol * raw_b, sq_b, torch.zeros_like(sq_b))
    denom2 = sq_a * sq_b
    ok = denom2 > 0
    safe = torch.where(ok, denom2, torch.ones_like(denom2))
    alpha = inner / torch.sqrt(safe)
    return torch.where(ok, alpha, torch.full_like(alpha, float("nan"))).clamp(-1.0, 1.0)


def factored_alignment(a: MomentOperand, b: MomentOperand, metric: CF.Metric = "cosine") -> Tensor:
    """α(A, B) of dense or factored operands by trace identities (float64 0-d tensor)."""
    check_choice("metric", metric, CF.METRICS)
    d = _dim(a)
    pearson = metric == "pearson"
    return alignment_from_moments(
        frobenius_inner(a, b),
        squared_frobenius(a),
        squared_frobenius(b),
        entry_sum(a) if pearson else None,
        entry_sum(b) if pearson else None,
        d * d,
        metric,
    )


def spectral_flatness(w: Tensor) -> Tensor:
    """``φ(W) = cos(Z, Z²) = Tr Z³ / (‖Z‖_F ‖Z²‖_F)`` for ``Z = WᵀW`` (float64 0-d tensor, in ``(0, 1]``).

    With ``λ_i`` the eigenvalues of ``Z``: ``φ = Σλ³ / sqrt(Σλ² · Σλ⁴)`` (Cauchy–Schwarz on ``λ·λ²``),
    so ``φ = 1`` exactly when the nonzero spectrum of ``Z`` is flat (``Z² = sZ``: ``W`` is a scaled partial
    isometry, of any rank), the state in which the exact identities ``H_b = W H_a Wᵀ``, ``G_a = Wᵀ G_b W``
    make all six relations hold together (theory §1, §6). Computed in float64 from ``W / max|W_ij|``. ``Z_a = WᵀW`` and ``Z_b = WWᵀ`` share
    their nonzero spectrum, so one value serves both; computed from the ``min(d_a, d_b)``-sized Gram
    ``K`` of ``W``: ``Tr Z³ = ⟨K, K²⟩``, ``‖Z‖ = ‖K‖``, ``‖Z²‖ = ‖K²‖``. NaN for ``W = 0``.

    Args:
        w: ``(d_b, d_a)`` weight matrix.
    """
    if not isinstance(w, Tensor) or w.dim() != 2:
        raise ValueError(f"Expected `w` to be a 2-D weight matrix, but got {_describe(w)}")
    w = w.to(torch.float64)
    w = w / w.detach().abs().amax().clamp_min(torch.finfo(torch.float64).tiny)  # φ is scale-free; no underflow
    k = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    k2 = k @ k
    num = (k * k2).sum()
    den2 = (k * k).sum() * (k2 * k2).sum()
    ok = den2 > 0
    return torch.where(ok, num / torch.sqrt(torch.where(ok, den2, torch.ones_like(den2))), torch.full_like(num, float("nan")))


def alignment_loss(a: MomentOperand, b: MomentOperand, metric: CF.Metric = "cosine") -> Tensor:
    """``1 − α(A, B)``: the per-term loss of :class:`AlignmentLoss`, in [0, 2].

    With two dense tensors this is ``1 − canonreg.functional.alignment(A, B, metric)`` (the obvious
    reference); with a :class:`RowMoment` or :class:`WeightGram` operand it uses the trace identities
    and never builds the ``d × d`` matrix. Differentiable in every tensor the operands hold.

    Args:
        a, b: ``(d, d)`` tensors, :class:`RowMoment` (``H``, ``G`` from rows) or :class:`WeightGram` (``Z``).
        metric: ``"cosine"`` (default for losses: 0 exactly when ``A = cB``, ``c > 0``) or ``"pearson"``.

    Returns:
        0-d tensor: the dtype of ``a``/``b`` for two dense tensors, float64 otherwise.

    Example:
        >>> w = torch.randn(16, 8, requires_grad=True)
        >>> h = row_moment(torch.randn(32, 8), "centered")
        >>> alignment_loss(h, WeightGram(w, "a")).backward()   # f-RWA of one layer   # doctest: +SKIP
    """
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return 1.0 - CF.alignment(a, b, metric)
    return 1.0 - factored_alignment(a, b, metric)


def _operand_tensor(a: SketchOperand) -> Tensor:
    """The tensor an operand holds (its device and dtype are the sketch's)."""
    if isinstance(a, LazyRowMoment):
        return a.x
    return a.rows if isinstance(a, RowMoment) else a.weight if isinstance(a, WeightGram) else a

