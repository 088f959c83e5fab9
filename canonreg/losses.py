"""Differentiable CRH alignment losses: push chosen layers toward chosen relations.

For a layer ``h_b = W h_a + b`` the six relations of the Canonical Representation Hypothesis
(Ziyin, Chuang, Galanti & Poggio, arXiv:2410.03006) compare ``A ∝ B`` for the pairs of
:data:`canonreg.functional.RELATION_PAIRS`. The loss of one (layer, relation) term is

    ℓ(A, B) = 1 − α(A, B),     α = cosine ⟨A,B⟩_F / (‖A‖_F ‖B‖_F)   or   Pearson of the entries,

and :class:`AlignmentLoss` returns ``weight · Σ_{l,r} w_l w_r ℓ_{l,r} / Σ_{l,r} w_l w_r``.

Everything α needs is five scalars, ``⟨A,B⟩_F``, ``‖A‖_F²``, ``‖B‖_F²``, ``1ᵀA1``, ``1ᵀB1``
(Pearson: ``cov = ⟨A,B⟩ − (1ᵀA1)(1ᵀB1)/N``, ``var_A = ‖A‖² − (1ᵀA1)²/N``, ``N = d²``), and each is
a trace identity of factored matrices (crh-theory §3), so no ``d × d`` matrix is ever built when the
operands are a batch moment ``H = FᵀF`` (``F`` the preprocessed, centred rows over ``√n``) or a weight
Gram ``Z_a = WᵀW`` / ``Z_b = WWᵀ``:

    ⟨FᵀF, WᵀW⟩ = ‖F Wᵀ‖_F²            (= ‖rows of h_b − b, same preprocessing‖²: free for f-RWA)
    ⟨FᵀF, WWᵀ⟩ = ‖F W‖_F²
    ⟨FᵀF, GᵀG⟩ = ‖F Gᵀ‖_F²            (n × n'; two d × d moments instead when d < n/2)
    ‖FᵀF‖_F²   = ‖F Fᵀ‖_F²            (the min(n, d)-sized Gram)
    ‖WᵀW‖_F²   = ‖W Wᵀ‖_F²            (the min(d_a, d_b)-sized Gram; shared by Z_a and Z_b)
    1ᵀ FᵀF 1   = ‖F 1‖²,   1ᵀ WᵀW 1 = ‖W 1‖²,   1ᵀ WWᵀ 1 = ‖Wᵀ 1‖²
    ⟨C, FᵀF⟩   = Σ (F Cᵀ) ∘ F,   ⟨C, WᵀW⟩ = Σ (W Cᵀ) ∘ W,   ⟨C, WWᵀ⟩ = Σ (C W) ∘ W   (C dense)

Randomized alternative (``AlignmentLoss(estimator="hutchinson", probes=k)``): with Rademacher probes
``Ω`` (``d × k``), ``⟨A,B⟩ ≈ ⟨AΩ, BΩ⟩/k`` and ``‖A‖² ≈ ‖AΩ‖²/k`` (unbiased, Hutchinson), where
``FᵀF Ω = Fᵀ(FΩ)``, ``WᵀW Ω = Wᵀ(WΩ)``: ``O(k·(n·d + d_a·d_b))`` instead of ``O(d³ + n·d²)``; α is the
cosine of the two sketches (:func:`sketched_alignment`).

The functional twins below (:func:`alignment_loss`, :func:`row_moment`, :func:`frobenius_inner`,
:func:`gram_sqnorm` …) are what :class:`AlignmentLoss` calls; tests check the class against them and
them against dense matrices.

References: Ziyin, Chuang, Galanti & Poggio, "Formation of Representations in Neural Networks",
arXiv:2410.03006 (CRH, the six relations, α); Ziyin, Wang, Li & Wu, arXiv:2402.07193 (why they form).
"""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import functional as CF
from .capture import Backward, Capture, LayerCall, Policy, handle_nonfinite
from .errors import CanonRegError, check_choice, check_nonnegative, check_positive, check_positive_int
from .layers import LayerSpec, _display, at_least_float32, layer_roles, select_layers
from .taps import LayerTap, take_rows

__all__ = [
    "AlignmentLoss",
    "CRH_PRESET",
    "ESTIMATORS",
    "Estimator",
    "crh_loss",
    "inner_layers",
    "GMode",
    "LazyRowMoment",
    "MomentOperand",
    "RowMoment",
    "SketchOperand",
    "WeightGram",
    "alignment_from_moments",
    "alignment_loss",
    "centred_sketch",
    "entry_sum",
    "factored_alignment",
    "frobenius_inner",
    "gram_sketches",
    "gram_sqnorm",
    "rademacher_probes",
    "row_moment",
    "sketch_pieces",
    "sketch_product",
    "sketched_alignment",
    "spectral_flatness",
    "squared_frobenius",
]

GMode = Literal["ema", "exact"]
Side = Literal["a", "b"]

_G_MATRICES = ("G_a", "G_b")


# ====================================================================== functional core
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
        y = y - y.mean(0, keepdim=True)
        img = None if img is None else img - img.mean(0, keepdim=True)
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
        sq_a = sq_a - sum_a * sum_a / n
        sq_b = sq_b - sum_b * sum_b / n
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
    make all six relations hold together (crh-theory §1, §6). Computed in float64 from ``W / max|W_ij|``. ``Z_a = WᵀW`` and ``Z_b = WWᵀ`` share
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


# ====================================================================== randomized (sketched) estimators
#: How :class:`AlignmentLoss` evaluates the Frobenius moments: exact trace identities or Hutchinson sketches.
Estimator = Literal["exact", "hutchinson"]
ESTIMATORS: tuple[str, ...] = ("exact", "hutchinson")


def rademacher_probes(dim: int, probes: int, *, like: Tensor) -> Tensor:
    """``Ω`` of shape ``(dim, probes)`` with independent ±1 entries, so ``E[Ω Ωᵀ] / k = I`` (``k = probes``).

    Drawn from torch's global generator on ``like``'s device (reproducible under ``torch.manual_seed``),
    in ``like``'s dtype.
    """
    check_positive_int("probes", probes)
    omega = torch.randint(0, 2, (dim, probes), device=like.device, dtype=like.dtype)
    return omega.mul_(2.0).sub_(1.0)


def _t_mm(x: Tensor, w: Tensor) -> Tensor:
    """``wᵀ x`` for a skinny ``x``, as ``(xᵀ w)ᵀ``: CPU BLAS is about 2× slower with a transposed big operand."""
    return (x.T.contiguous() @ w).T


class _RowSketch(torch.autograd.Function):
    """``M Ω = xᵀ D C D (x Ω) / n`` of :class:`LazyRowMoment`, with a hand-written backward.

    With ``s = 1/‖x_i‖`` (``D = diag(s)``; ``s = 1`` for ``raw``/``centered``), ``p₀ = xΩ``,
    ``p₁ = s∘p₀``, ``p₂ = C p₁``, ``p₃ = s∘p₂``, ``u = xᵀp₃/n`` and ``g = ∂L/∂u``:
    ``∂p₃ = x g/n``, ``∂p₁ = C(s∘∂p₃)``, ``∂s = Σ_k(p₂∘∂p₃ + p₀∘∂p₁)``, and
    ``∂x = [p₃/n, s∘∂p₁] [g, Ω]ᵀ − (s³∘∂s)∘x``: one skinny product, one rank-``2k`` product and one
    row scaling, where autograd would write three ``(n, d)`` gradients (two products and the norm's)
    and add them.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, omega: Tensor, preprocess: str) -> Tensor:
        s = None
        if preprocess == "normalized":
            norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
            s = 1.0 / torch.where(norms > 0, norms, torch.ones_like(norms))
        p0 = x @ omega
        p1 = p0 if s is None else p0 * s
        p2 = p1 if preprocess == "raw" else p1 - p1.mean(0, keepdim=True)
        p3 = (p2 if s is None else p2 * s) / x.shape[0]
        ctx.save_for_backward(x, omega, s, p0, p2, p3)
        ctx.centre = preprocess != "raw"
        return _t_mm(p3, x)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:
        x, omega, s, p0, p2, p3 = ctx.saved_tensors
        n = x.shape[0]
        dp3 = (x @ g) / n
        dp2 = dp3 if s is None else dp3 * s
        dp1 = dp2 - dp2.mean(0, keepdim=True) if ctx.centre else dp2
        dp0 = dp1 if s is None else dp1 * s
        dx = torch.cat([p3, dp0], 1) @ torch.cat([g.T, omega.T], 0)
        if s is not None:
            ds = (p2 * dp3 + p0 * dp1).sum(1, keepdim=True)  # (n, 1)
            dx.addcmul_(x, -(s**3) * ds)  # ∂s/∂x = −s³ x (0 on zero rows: their s is the constant 1, norm 0)
        return dx, None, None


class _GramSketch(torch.autograd.Function):
    """``(WᵀW Ω_a, WWᵀ Ω_b)`` with three skinny products forward and two plus one rank-``4k`` product backward.

    Backward: ``∂⟨g_a, WᵀWΩ_a⟩/∂W = (WΩ_a) g_aᵀ + (W g_a) Ω_aᵀ``, ``∂⟨g_b, WWᵀΩ_b⟩/∂W = g_b (WᵀΩ_b)ᵀ +
    Ω_b (Wᵀ g_b)ᵀ``, summed in one ``(d_b, 4k) @ (4k, d_a)`` product (autograd would write four ``d × d``
    outer products and add them).
    """

    @staticmethod
    def forward(ctx: Any, w: Tensor, omega_a: Tensor, omega_b: Tensor) -> tuple[Tensor, Tensor]:
        k = omega_a.shape[1]
        q = _t_mm(omega_b, w)  # Wᵀ Ω_b
        r = w @ torch.cat([omega_a, q], 1)  # [W Ω_a, W Wᵀ Ω_b]
        p, u_b = r[:, :k], r[:, k:]
        u_a = _t_mm(p, w)  # Wᵀ W Ω_a
        ctx.save_for_backward(w, omega_a, omega_b, p, q)
        return u_a, u_b

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_a: Tensor | None, g_b: Tensor | None) -> tuple[Tensor | None, None, None]:
        w, omega_a, omega_b, p, q = ctx.saved_tensors
        left: list[Tensor] = []
        right: list[Tensor] = []
        if g_a is not None:
            left += [p, w @ g_a]
            right += [g_a, omega_a]
        if g_b is not None:
            left += [g_b, omega_b]
            right += [q, _t_mm(g_b, w)]
        if not left:
            return None, None, None
        return torch.cat(left, 1) @ torch.cat([r.T for r in right], 0), None, None


def sketch_product(a: SketchOperand, omega: Tensor) -> Tensor:
    """``A Ω`` for a ``(d, d)`` operand and probes ``Ω`` ``(d, k)``, never building ``A``.

    ``Fᵀ (F Ω)`` for a :class:`RowMoment` (``2·n·d·k`` multiply-adds), ``xᵀ D C D (x Ω) / n`` for a
    :class:`LazyRowMoment` (the same, with elementwise work on ``(n, k)`` only), ``Wᵀ (W Ω)`` for
    ``Z_a``, ``W (Wᵀ Ω)`` for ``Z_b`` (``2·d_a·d_b·k``), ``C Ω`` for a dense ``C`` (``d²·k``).
    """
    if _dim(a) != omega.shape[0]:
        raise ValueError(f"Expected probes with {_dim(a)} rows, but got {_describe(omega)}")
    if isinstance(a, LazyRowMoment):
        return _RowSketch.apply(a.x, omega.to(a.x.dtype), a.preprocess)
    if isinstance(a, RowMoment):
        f = a.rows
        return f.T @ (f @ omega.to(f.dtype))
    if isinstance(a, WeightGram):
        w = a.weight
        om = omega.to(w.dtype)
        return _t_mm(w @ om, w) if a.side == "a" else w @ _t_mm(om, w)
    return a @ omega.to(a.dtype)


def gram_sketches(w: Tensor, omega_a: Tensor, omega_b: Tensor) -> tuple[Tensor, Tensor]:
    """``(Z_a Ω_a, Z_b Ω_b) = (WᵀW Ω_a, WWᵀ Ω_b)`` of one weight ``(d_b, d_a)`` together (first-order
    differentiable in ``W``; the probes get no gradient). Cost ``3·d_a·d_b·k`` forward, ``6·d_a·d_b·k``
    backward (one rank-``4k`` product for ``∂W``)."""
    if not isinstance(w, Tensor) or w.dim() != 2 or omega_a.shape[0] != w.shape[1] or omega_b.shape[0] != w.shape[0]:
        raise ValueError(f"Expected W (d_b, d_a) with probes (d_a, k) and (d_b, k), but got {_describe(w)}, "
                         f"{_describe(omega_a)}, {_describe(omega_b)}")
    if omega_a.shape[1] != omega_b.shape[1]:
        raise ValueError(f"Expected the same number of probes on both sides, but got {omega_a.shape[1]} and {omega_b.shape[1]}")
    return _GramSketch.apply(w, omega_a.to(w.dtype), omega_b.to(w.dtype))


def centred_sketch(a: SketchOperand, omega: Tensor, metric: CF.Metric, *, product: Tensor | None = None) -> Tensor:
    """``A Ω`` (cosine) or ``(A − ā J) Ω`` (pearson; ``ā = 1ᵀA1 / d²`` exact, ``J`` all ones).

    Pearson α is the cosine of the entry-centred matrices, so centring the sketch keeps the
    cosine-of-sketches form (below) for both metrics. ``product``: ``A Ω`` when already computed
    (e.g. by :func:`gram_sketches`).
    """
    u = sketch_product(a, omega) if product is None else product
    if metric == "pearson":
        mean = (entry_sum(a) / (_dim(a) ** 2)).to(u.dtype)
        u = u - mean * omega.to(u.dtype).sum(0, keepdim=True)  # ā·1·(1ᵀΩ), broadcast over rows
    return u


def sketch_pieces(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Hutchinson estimates ``(⟨u, v⟩/k, ‖u‖²/k, ‖v‖²/k)`` (float64) from ``u = AΩ``, ``v = BΩ``.

    With ``E[ΩΩᵀ]/k = I``: ``E⟨AΩ, BΩ⟩/k = Tr(AᵀB) = ⟨A, B⟩_F`` and ``E‖AΩ‖²/k = ‖A‖_F²`` (unbiased).
    """
    k = u.shape[1]
    return _sum64(u * v) / k, _sq64(u) / k, _sq64(v) / k


def sketched_alignment(
    a: MomentOperand, b: MomentOperand, probes: int = 16, metric: CF.Metric = "cosine", *, omega: Tensor | None = None
) -> Tensor:
    """Randomized α: the cosine of two sketches, ``α̂ = ⟨ÃΩ, B̃Ω⟩ / (‖ÃΩ‖ ‖B̃Ω‖)`` (float64 0-d tensor).

    ``Ã = A`` (cosine) or ``A − (1ᵀA1/d²) J`` (pearson), ``Ω`` ``(d, k)`` Rademacher probes
    (:func:`rademacher_probes`; or pass ``omega``). Numerator and both squared norms are unbiased
    Hutchinson estimates of ``⟨Ã, B̃⟩``, ``‖Ã‖²``, ``‖B̃‖²`` sharing one ``Ω``; α̂ itself is a ratio, so
    it carries an ``O(1/k)`` bias, but ``|α̂| ≤ 1`` always and ``α̂ = 1`` exactly when ``Ã = cB̃``
    (``c > 0``): the randomized loss ``1 − α̂`` has the exact loss's minimisers, and its error shrinks
    with ``1 − α``. Cost ``O(k·(n·d + d_a·d_b))`` per pair instead of the exact ``O(d³ + n·d²)``.

    Args:
        a, b: operands of equal size ``d`` (dense, :class:`RowMoment`, :class:`WeightGram`).
        probes: ``k ≥ 1``.
        metric: ``"cosine"`` or ``"pearson"``.
        omega: optional ``(d, k)`` probes (then ``probes`` is ignored).
    """
    check_choice("metric", metric, CF.METRICS)
    d = _dim(a)
    if _dim(b) != d:
        raise ValueError(f"Expected operands of equal size, but got {d} × {d} and {_dim(b)} × {_dim(b)}")
    if omega is None:
        omega = rademacher_probes(d, probes, like=_operand_tensor(a))
    inner, sq_a, sq_b = sketch_pieces(centred_sketch(a, omega, metric), centred_sketch(b, omega, metric))
    return alignment_from_moments(inner, sq_a, sq_b, None, None, d * d, "cosine")


# ====================================================================== the module
@dataclass
class _Capture:
    """One call of a hooked layer in the current pass (references only; nothing is computed)."""

    module: nn.Module
    inputs: tuple[object, ...]
    output: Tensor
    rows_b: Tensor | None  # output rows, copied at capture time (safe from later in-place ops)
    in_version: int
    out_version: int
    w_version: int
    tap: LayerTap  # this call's tap (reads its rows; a sub-layer inside attention has one per call)
    keep: Tensor | None = None  # rows of real positions under a sample mask (canonreg.taps.masked); None: all


@dataclass
class _Terms:
    """The scalar moments of one call's terms, in order (``pieces``: inner, ‖A‖², ‖B‖², 1ᵀA1, 1ᵀB1)."""

    pieces: list[list[Tensor]] = field(default_factory=lambda: [[], [], [], [], []])
    numel: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    where: list[tuple[str, str]] = field(default_factory=list)
    flats: list[Tensor] = field(default_factory=list)
    flat_where: list[str] = field(default_factory=list)
    flat_weights: list[float] = field(default_factory=list)

    def add(self, where: tuple[str, str], weight: float, numel: int, pieces: tuple[Tensor | None, ...]) -> None:
        for bucket, piece in zip(self.pieces, pieces):
            if piece is not None:
                bucket.append(piece)
        self.numel.append(numel)
        self.weights.append(weight)
        self.where.append(where)


class AlignmentLoss(nn.Module):
    """Differentiable CRH alignment penalty on chosen layers and relations.

    With terms ``v_{l,r} = 1 − α_{l,r}`` of weight ``p_{l,r} = w_l w_r`` for the selected layers ``l`` and
    ``relations`` ``r`` (``α_{l,r} = α(A, B)`` for the pair ``(A, B)`` of relation ``r``,
    ``canonreg.functional.RELATION_PAIRS``, in layer ``l``), plus, when ``flatness = f > 0``, one term
    ``v_{l,♭} = 1 − φ(W_l)`` of weight ``w_l f`` per layer (:func:`spectral_flatness`,
    ``φ = Tr Z³ / (‖Z‖_F ‖Z²‖_F)``, 1 iff the nonzero spectrum of ``Z = WᵀW`` is flat), the loss at
    the ``t``-th call is

        L_t = weight · ρ_t · Agg(v),      ρ_t = min(1, t / warmup)   (ρ_t = 1 with ``warmup = 0``),

        Agg(v) = Σ p v / Σ p                              (``focus=None``: the weighted mean), or
        Agg(v) = τ · log( Σ p exp(v / τ) / Σ p )          (``focus = τ``: a soft maximum of the terms,
                                                           between the mean, τ → ∞, and the worst, τ → 0).

    Everything is computed from the most recent grad-enabled call of ``model`` (a "pass"; a layer
    called several times in one pass contributes the rows of every call).

    Why these pieces (crh-theory §1, §6): in raw/centred mode ``H_b = W H_a Wᵀ`` and
    ``G_a = Wᵀ G_b W`` hold exactly, so all six relations hold together iff ``H_a ∝ Z_a``,
    ``G_b ∝ Z_b`` and ``Z`` has a flat nonzero spectrum — the flatness term targets that shared
    structure directly, and ``focus`` keeps the optimiser on the relation that lags instead of
    over-fitting those that already hold. ``relations="all"`` asks for all six.

    Symbols → sources (crh-theory §1): ``H_a``, ``H_b`` from the rows of the layer input/output of the
    current pass (differentiable: gradients reach the weights and every earlier layer); ``Z_a = WᵀW``,
    ``Z_b = WWᵀ`` from the current weights (differentiable); ``G_a``, ``G_b`` (``g = −dℓ/dh``) from

    * ``g_mode="ema"``: an exponential moving average ``Ḡ ← β Ḡ + (1 − β) G_batch`` of the
      batch moments seen by backward hooks in *earlier* backward passes; ``Ḡ`` is a constant
      (detached) target. No extra backward pass; each backward adds one ``n·d²`` moment per needed
      G matrix and each loss call one ``n·d²`` (or ``d_a·d_b·d``) product. The hook sees the gradient
      that actually reaches the layer output, i.e. of the *total* loss (task + regularisers,
      including this loss's own H–Z terms). Before the first backward the G terms raise
      (``ema_warmup="error"``) or are left out of the mean (``"skip"``).
    * ``g_mode="exact"`` (default): the current batch's ``g_b = −∂ℓ/∂h_b`` of the *task* loss by double
      backprop, so the task loss must be passed: ``loss = task + align(task)``. This is the G the
      monitor measures in the paper's protocol (task loss only), and G itself is moved toward the
      relations (second-order terms); the EMA is a constant target that also contains the
      regulariser's own gradient, so G relations partly "satisfy themselves" there. Double backprop
      needs every op of the model to be twice differentiable: the fused CPU/GPU kernels of
      ``F.scaled_dot_product_attention`` are not ("derivative for ..._flash_attention_..._backward is not
      implemented" at ``loss.backward()``); run the forward pass under
      ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` or use ``g_mode="ema"``. ``align(task)`` runs
      ``torch.autograd.grad(task, layer outputs, create_graph=True)`` — one extra backward pass with
      graph — and the final ``loss.backward()`` then differentiates through it (second-order terms):
      expect roughly 2–3× the cost of a plain training step. ``G_a`` uses rows ``g_a = g_b W``.

    Cost of H–Z terms, in multiply-adds forward + backward (``n`` rows, ``W`` of shape
    ``(d_b, d_a)``; a plain training step costs ``3·n·d_a·d_b`` per layer): ``‖Z_a‖_F = ‖Z_b‖_F``
    from the ``min(d_a, d_b)``-sized Gram of ``W``, ``2·d_a·d_b·min(d_a, d_b)``, once per layer;
    ``‖H‖_F`` from the ``min(n, d)``-sized Gram of the rows, ``2·n·d·min(n, d)`` per H;
    ``⟨H_a, Z_a⟩ = ‖F Wᵀ‖²`` is free (the layer output gives ``h_a Wᵀ = h_b − b``) for plain
    ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d``; ``⟨H_b, Z_b⟩ = ‖F_b W‖²`` costs ``3·n·d_a·d_b``.
    No ``d × d`` moment matrix is built. Relative to the step, a square ``d × d`` layer pays
    ``2d/(3n) + 2·min(n, d)/(3d)`` for f-RWA (at least 4/3, at ``n = d``) and about 3 for
    f-RWA + b-RWA: exact α terms cost a few training steps on wide square layers at moderate batch
    sizes (they are cheap for thin layers, e.g. ``d_a ≪ d_b``). To amortise, add ``align()`` on every
    ``k``-th step only: on the other steps the attached hooks just keep references (and one copy
    of the output rows).

    ``estimator="hutchinson"`` (``probes = k``) removes the ``d³`` and ``n·d²`` terms: per layer and
    side it draws ``k`` Rademacher probes ``Ω`` (``E[ΩΩᵀ]/k = I``, fresh each call, from torch's global
    generator) and scores every relation of that side by the cosine of the sketches,
    ``α̂ = ⟨ÃΩ, B̃Ω⟩ / (‖ÃΩ‖ ‖B̃Ω‖)`` (``Ã`` entry-centred for pearson; :func:`sketched_alignment`),
    whose numerator and squared norms are unbiased Hutchinson estimates of ``⟨Ã, B̃⟩``, ``‖Ã‖²``,
    ``‖B̃‖²``. ``|α̂| ≤ 1``, ``α̂ = 1`` exactly when ``Ã ∝ B̃``, and the ratio's bias is ``O(1/k)``
    (below the sampling noise in the tests). Cost per layer about ``6·k·n·(d_a + d_b) + 9·k·d_a·d_b``
    (:class:`LazyRowMoment`, :func:`gram_sketches`); sides of width ``≤ k`` stay exact. Measured
    (``benchmarks/results/loss_overhead_estimators.json``, ``loss_effect_estimators.md``): std of α̂
    about ``0.01`` at ``k = 16`` on trained width-128 layers (``∝ 1/√k``), the same α after
    training as the exact loss (3 seeds), and, with f-RWA + b-RWA on every layer of an MLP
    40→4×1024→10 at batch 512 (one thread), 1.42–1.46× a plain step at ``k = 16`` (1.32–1.39× at
    ``k = 8``) against 4.7–4.9× for the exact form. ``"exact"``
    stays the default: deterministic, and as cheap on narrow layers (width ≲ 256).

    Scale conventions: α is invariant to positive rescaling of either matrix, so the batch-mean
    ``1/B`` of hook gradients needs no correction and ``weight`` is not multiplied by the learning
    rate.

    torch.func and torch.compile: passes inside ``torch.func`` transforms and through
    ``functional_call`` with substituted parameters are not captured and do not replace the last
    ordinary pass (:func:`canonreg.layers.untraced_call`). Build the loss before ``torch.compile``; a
    model already compiled is refused. The hooks are those of :class:`canonreg.capture.Capture` (the
    engine the monitor and :class:`~canonreg.NoiseCalibrated` share); a loss that is garbage-collected
    while attached takes its hooks with it.

    Copies: ``copy.deepcopy(model)``, ``pickle`` and ``torch.save`` of the model work while the loss is
    attached and give a plain model (no hook travels; EMA/SWA ``AveragedModel`` copies are never
    captured); a copy of the loss itself is detached (see :meth:`__getstate__`).

    Memory: the layer inputs and outputs of the last pass stay referenced until the next pass (or
    :meth:`detach`); output rows are copied at capture time when H_b or f-RWA needs them, so in-place
    activations after a layer (``nn.ReLU(inplace=True)``) are safe except with ``g_mode="exact"``.

    Args:
        model: the model (never modified; hooks go on the selected submodules).
        relations: relations to enforce, names from ``canonreg.RELATIONS``, or ``"all"`` for the six.
        layers: which layers (see :mod:`canonreg.layers`); default every Linear/Conv layer.
        metric: ``"pearson"`` (default: the paper's score and :class:`~canonreg.CRHMonitor`'s default, so the
            loss optimises what the monitor reports) or ``"cosine"`` (1 iff ``A = cB``, ``c > 0``).
        weight: overall strength (``≥ 0``; settable, e.g. for schedules). ``0`` returns an exact zero
            without computing anything: training is bit-identical to training without the loss.
        preprocess: ``"normalized"`` (default: per-sample unit norm then covariance, the paper's
            measurement protocol and :class:`~canonreg.CRHMonitor`'s default), ``"centered"`` or ``"raw"``.
        g_mode: ``"ema"`` or ``"exact"`` (see above); irrelevant without G relations.
        ema_decay: β of the G moving average, in ``[0, 1)`` (0 = last backward only).
        layer_weights: ``{layer name: w_l ≥ 0}``; unnamed selected layers get 1.
        relation_weights: ``{relation: w_r ≥ 0}``; unnamed requested relations get 1.
        flatness: weight ``f ≥ 0`` of the per-layer spectral-flatness term ``1 − φ(W)`` (0: none).
        focus: temperature ``τ > 0`` of the soft-maximum aggregation, or None for the weighted mean.
        warmup: linear ramp of the weight over the first ``warmup`` calls of the loss (0: none).
            Calls are counted in ``calls`` (saved in the state dict), also while ``weight = 0``.
        ema_warmup: ``"error" | "skip"`` for G relations whose moving average does not exist yet.
        nonfinite: ``"error" | "warn" | "skip"`` for terms whose α is NaN (a zero or constant matrix,
            e.g. a dead layer); ``"skip"``/``"warn"`` leave them out of the mean (one host sync per call
            for ``"error"``/``"warn"``).
        estimator: ``"exact"`` (default: the trace identities) or ``"hutchinson"`` (randomized
            sketches, see above; for wide layers).
        probes: ``k ≥ 1``, probes per layer side with ``estimator="hutchinson"`` (default 16).
        taps: extra ``{module type: tap}`` for this loss only.

    Raises:
        ValueError: unknown relation, bad option or weight (the message names the argument).
        CanonRegError: another AlignmentLoss is attached to the model, a selected layer has no tap, or the
            model has no parameter that requires grad (at construction) / no term of the loss depends on
            one (at the call; a partly frozen model warns once, naming the layers that cannot act).

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> align = AlignmentLoss(model, relations="all", weight=0.1)
        >>> x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
        >>> task = torch.nn.functional.cross_entropy(model(x), y)
        >>> (task + align(task)).backward()

    Reference: Ziyin, Chuang, Galanti & Poggio, arXiv:2410.03006 (relations and α).
    """

    model: nn.Module  # set with object.__setattr__: not a submodule

    def __init__(
        self,
        model: nn.Module,
        relations: Sequence[str] | Literal["all"] = ("f-RWA", "b-RWA"),
        layers: LayerSpec = None,
        *,
        metric: CF.Metric = "pearson",
        weight: float = 1.0,
        preprocess: CF.Preprocess = "normalized",
        g_mode: GMode = "exact",
        ema_decay: float = 0.9,
        layer_weights: Mapping[str, float] | None = None,
        relation_weights: Mapping[str, float] | None = None,
        flatness: float = 0.0,
        focus: float | None = None,
        warmup: int = 0,
        ema_warmup: Literal["error", "skip"] = "error",
        nonfinite: Policy = "error",
        estimator: Estimator = "exact",
        probes: int = 16,
        taps: dict[type[nn.Module], LayerTap] | None = None,
    ) -> None:
        super().__init__()
        rels = _check_relations(relations)
        check_choice("metric", metric, CF.METRICS)
        check_choice("preprocess", preprocess, CF.PREPROCESS_MODES)
        check_choice("g_mode", g_mode, ("ema", "exact"))
        check_choice("ema_warmup", ema_warmup, ("error", "skip"))
        check_choice("nonfinite", nonfinite, ("error", "warn", "skip"))
        check_choice("estimator", estimator, ESTIMATORS)
        self.probes = check_positive_int("probes", probes)
        if not (isinstance(ema_decay, (int, float)) and not isinstance(ema_decay, bool) and 0 <= ema_decay < 1):
            raise ValueError(f"Expected `ema_decay` to be a float in [0, 1), but got {ema_decay!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"Expected `warmup` to be a non-negative int (loss calls), but got {warmup!r}")
        self.flatness = check_nonnegative("flatness", flatness)
        self.focus = None if focus is None else check_positive("focus", focus)
        if not any(p.requires_grad for p in model.parameters()):
            raise CanonRegError(
                "AlignmentLoss got a model with no parameter that requires grad (a frozen model): the loss could "
                "never change it. Unfreeze the layers to shape (p.requires_grad_(True)) or do not add the loss"
            )

        # Plain attributes: the model must not become a submodule (state_dict, .to(), .train()).
        object.__setattr__(self, "model", model)
        self._tap_types = taps
        capture = self._new_capture(layers)
        self._capture: Capture | None = capture
        self.layer_names: tuple[str, ...] = tuple(capture.targets)
        self._modules_by_name: dict[str, nn.Module] = dict(capture.modules)
        self._taps: dict[str, LayerTap] = {n: t.tap for n, t in capture.targets.items()}
        self.excluded: dict[str, str] = dict(capture.excluded)
        self.relations: tuple[str, ...] = rels
        self.metric: CF.Metric = metric
        self.preprocess: CF.Preprocess = preprocess
        self.g_mode: GMode = g_mode
        self.estimator: Estimator = estimator
        self.ema_decay = float(ema_decay)
        self.ema_warmup = ema_warmup
        self.nonfinite: Policy = nonfinite
        self.weight = weight
        self.warmup = warmup
        self._init_term_weights(layer_weights, relation_weights)
        self._init_state()
        self.attach()

    def _init_term_weights(self, layer_weights: Mapping[str, float] | None, relation_weights: Mapping[str, float] | None) -> None:
        """Per-layer and per-relation weights (at least one positive term) and the matrices they need."""
        rels = self.relations
        self._layer_w = self._check_weights("layer_weights", layer_weights, self.layer_names, _display)
        self._rel_w = self._check_weights("relation_weights", relation_weights, rels, str)
        if not any(self._layer_w[n] * self._rel_w[r] > 0 for n in self.layer_names for r in rels) and not (
            self.flatness > 0 and any(self._layer_w[n] > 0 for n in self.layer_names)
        ):
            raise ValueError("Expected `layer_weights` and `relation_weights` to leave at least one positive term, but all are 0")
        needed = {m for r in rels for m in CF.RELATION_PAIRS[r]}
        self._needs_g: tuple[str, ...] = tuple(m for m in _G_MATRICES if m in needed)
        # output rows: for H_b, and for the free ⟨H_a, Z_a⟩ = ‖F Wᵀ‖² of exact f-RWA
        self._needs_out_rows = "H_b" in needed or ("f-RWA" in rels and self.estimator == "exact")

    def _init_state(self) -> None:
        """Hooks, captures, G averages and counters of a freshly built loss."""
        self.calls = 0
        self._inert_warned = False
        self._captures: dict[str, list[_Capture]] = {}
        self._ema: dict[str, dict[str, Tensor]] = {}
        self._ema_updates: dict[str, int] = {}
        #: ``{layer: {relation: α}}`` of the last call (detached 0-d tensors; no host sync until read).
        self.last_alignment: dict[str, dict[str, Tensor]] = {}

    # ------------------------------------------------------------------ configuration
    @property
    def weight(self) -> float:
        """Overall strength (``≥ 0``); 0 makes the call an exact, free zero."""
        return self._weight

    @weight.setter
    def weight(self, value: float) -> None:
        self._weight = check_nonnegative("weight", value)

    @staticmethod
    def _check_weights(
        arg: str, given: Mapping[str, float] | None, allowed: Sequence[str], show: Callable[[str], str]
    ) -> dict[str, float]:
        out = {k: 1.0 for k in allowed}
        if given is None:
            return out
        if not isinstance(given, Mapping):
            raise TypeError(f"Expected `{arg}` to be a mapping name -> float, but got {type(given).__name__}")
        for k, v in given.items():
            if k not in out:
                raise ValueError(f"Expected `{arg}` keys from {[show(a) for a in allowed]}, but got {k!r}")
            out[k] = check_nonnegative(f"{arg}[{k!r}]", v)
        return out

    @property
    def uses_g(self) -> bool:
        """Whether any requested relation involves ``G_a`` or ``G_b``."""
        return bool(self._needs_g)

    def extra_repr(self) -> str:
        return (
            f"relations={list(self.relations)}, layers={[_display(n) for n in self.layer_names]}, "
            f"metric={self.metric!r}, preprocess={self.preprocess!r}, weight={self.weight}, g_mode={self.g_mode!r}, "
            f"flatness={self.flatness}, focus={self.focus}, warmup={self.warmup}, estimator={self.estimator!r}"
            + (f", probes={self.probes}" if self.estimator == "hutchinson" else "")
        )

    # ------------------------------------------------------------------ lifecycle
    def _new_capture(self, layers: LayerSpec) -> Capture:
        """The capture engine (:class:`canonreg.capture.Capture`) on ``layers`` of the model, not attached."""
        return Capture(
            self.model,
            layers,
            owner_kind="AlignmentLoss",
            on_call=self._on_call,
            on_root=self._on_root,
            taps=self._tap_types,
            nonfinite=None,  # the loss checks its own terms (one host sync per call at most)
            need_grad=False,  # H and Z terms need no gradient of the output
            on_masked_out=self._refuse_masked_out,
        )

    @property
    def attached(self) -> bool:
        return self._capture is not None and self._capture.attached

    def attach(self) -> AlignmentLoss:
        """Install the hooks (idempotent; done at construction). Coexists with a CRHMonitor.

        Raises:
            CanonRegError: another AlignmentLoss is attached to this model.
        """
        if self._capture is None:  # a copy of a loss: a new capture on the copy's model
            self._capture = self._new_capture(list(self.layer_names))
        self._capture.attach()
        return self

    def detach(self) -> AlignmentLoss:
        """Remove every hook and drop captured tensors (idempotent); the G averages are kept."""
        if self._capture is not None:
            self._capture.detach()
        self._captures = {}
        return self

    def __enter__(self) -> AlignmentLoss:  # noqa: PYI034
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def reset(self) -> None:
        """Forget captured tensors, the G moving averages and the call count (hooks stay as they are)."""
        self.calls = 0
        self._captures = {}
        self._ema = {}
        self._ema_updates = {}
        self.last_alignment = {}

    def get_extra_state(self) -> dict[str, Any]:
        """The G moving averages (``state_dict()['_extra_state']``); configuration is not state."""
        return {
            "ema": {n: {k: v.detach().cpu().clone() for k, v in d.items()} for n, d in self._ema.items()},
            "ema_updates": dict(self._ema_updates),
            "weight": self._weight,
            "calls": self.calls,
        }

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or not {"ema", "ema_updates", "weight"} <= set(state):
            raise ValueError("Expected an AlignmentLoss state with keys 'ema', 'ema_updates', 'weight'")
        unknown = set(state["ema"]) - set(self.layer_names)
        if unknown:
            raise ValueError(f"Expected G averages for layers {list(self.layer_names)}, but the state has {sorted(unknown)}")
        self._ema = {n: {k: v.to(torch.float64).clone() for k, v in d.items()} for n, d in state["ema"].items()}
        self._ema_updates = {n: int(c) for n, c in state["ema_updates"].items()}
        self.weight = state["weight"]
        calls = state.get("calls", 0)
        if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
            raise ValueError(f"Expected the state's 'calls' to be a non-negative int, but got {calls!r}")
        self.calls = calls

    def __getstate__(self) -> dict[str, Any]:
        """A pickle or deep copy of the loss is *detached* (call ``.attach()`` on it to use it).

        Its model is the copy's (the same object when the model is copied along, e.g. a LightningModule
        that holds both); the original stays attached. The model's hooks never travel with a copy
        (:class:`canonreg.layers.OwnedHook`), so EMA/SWA copies (``AveragedModel``) and checkpoints of a
        model with an attached loss are plain models.
        """
        state = dict(self.__dict__)
        state["_capture"] = None  # never copied (canonreg.capture): attach() builds a new one
        state["_captures"] = {}
        state["last_alignment"] = {}
        return state

    # ------------------------------------------------------------------ capture callbacks
    def _on_root(self) -> None:
        # a new ordinary pass (the engine leaves out torch.func transforms and substituted parameters,
        # which neither are captured nor clear the last ordinary pass: canonreg.layers.untraced_call)
        self._captures = {}

    def _refuse_masked_out(self, name: str) -> None:
        raise CanonRegError(
            f"AlignmentLoss: every position of this call of layer {_display(name)!r} is masked out "
            "(canonreg.taps.masked); the loss needs at least one real position per pass"
        )

    def _on_call(self, call: LayerCall) -> Backward | None:
        output, module, tap = call.output, call.module, call.tap
        x = call.inputs[0] if call.inputs else None
        rows_b = None
        if self._needs_out_rows:
            with torch.enable_grad():  # differentiable rows (the engine calls under no_grad)
                # A copy (differentiable, cheap next to the layer's matmul): an in-place op after the layer,
                # e.g. nn.ReLU(inplace=True), would otherwise overwrite h_b before the loss reads it.
                rows_b = call.output_rows(detach=False)
                if call.keep is None and (rows_b._is_view() or rows_b is output):
                    rows_b = rows_b.clone()
        cap = _Capture(
            module,
            call.inputs,
            output,
            rows_b,
            x._version if isinstance(x, Tensor) else 0,
            output._version,
            tap.weight(module)._version,
            tap,
            call.keep,
        )
        self._captures.setdefault(call.name, []).append(cap)
        if self._needs_g and self.g_mode == "ema":
            # batch: undoes the 1/B of a batch-mean loss. The callback holds the loss weakly: the loss holds
            # this output (a tensor hook referring back to its tensor is a cycle the collector cannot see)
            return Backward(partial(_to_loss, weakref.ref(self), call.name, module, tap, float(call.batch_size)))
        return None

    def _on_grad(self, name: str, module: nn.Module, tap: LayerTap, batch: float, rows: Tensor) -> None:
        """Fold the G moments of one call's gradient rows ``dL/dh_b`` into the moving averages."""
        gb = rows * (-batch)  # g = −dℓ/dh per sample
        new = {"G_b": CF.second_moment(gb, self.preprocess)} if "G_b" in self._needs_g else {}
        if "G_a" in self._needs_g:
            ga = gb @ _work(tap.weight(module).detach())
            new["G_a"] = CF.second_moment(ga, self.preprocess)
        if not all(bool(torch.isfinite(v).all()) for v in new.values()):
            handle_nonfinite(
                self.nonfinite,
                f"Non-finite gradients reached layer {_display(name)!r}",
                hint="its G average was not updated (pass nonfinite='skip' to drop such backward passes silently)",
                consequence="its G average was not updated",
            )
            return
        ema = self._ema.setdefault(name, {})
        beta = self.ema_decay
        for k, v in new.items():
            v = v.to(torch.float64)
            if k in ema:
                ema[k] = ema[k].to(v.device).mul_(beta).add_(v, alpha=1.0 - beta)
            else:
                ema[k] = v.clone()
        self._ema_updates[name] = self._ema_updates.get(name, 0) + 1

    # ------------------------------------------------------------------ the loss
    def forward(self, task_loss: Tensor | None = None) -> Tensor:
        """The weighted mean of ``1 − α`` over layers and relations, times ``weight``.

        Args:
            task_loss: the scalar task loss of the current pass; required with ``g_mode="exact"`` when a
                G relation is requested (it is differentiated with ``create_graph=True``), ignored otherwise.

        Returns:
            0-d tensor in the dtype of the layer weights (at least float32), on their device.

        Raises:
            CanonRegError: no grad-enabled forward pass since attaching; a selected layer did not run in the
                last pass; a layer input or weight was modified in place after the forward pass (e.g.
                ``optimizer.step()`` before the call), or, with ``g_mode="exact"``, a layer output (e.g.
                ``nn.ReLU(inplace=True)`` right after it);
                ``g_mode="ema"`` before any backward pass reached a layer (``ema_warmup="error"``);
                a NaN α (``nonfinite="error"``).
            ValueError: ``g_mode="exact"`` with G relations and no ``task_loss``.
        """
        ref = next(iter(self._modules_by_name.values()))
        w0 = self._taps[self.layer_names[0]].weight(ref)
        out_dtype = w0.dtype if w0.dtype in (torch.float32, torch.float64) else torch.float32
        self.calls += 1
        scale = self._weight * (min(1.0, self.calls / self.warmup) if self.warmup else 1.0)
        if scale == 0.0:
            return torch.zeros((), dtype=out_dtype, device=w0.device)
        if not self.attached:
            raise CanonRegError("AlignmentLoss is detached: call .attach() (or use `with align:`) before the forward pass")
        if not self._captures:
            raise CanonRegError(
                "AlignmentLoss was called before any grad-enabled forward pass of the model since it was attached "
                "(or since the last pass began): run `out = model(x)` first, then `loss = task + align()`. Passes inside "
                "torch.func transforms (vmap/grad) or through torch.func.functional_call with substituted parameters "
                "are not captured"
            )
        exact_g = bool(self._needs_g) and self.g_mode == "exact"
        self._check_captures(exact_g)
        grads = self._exact_grads(task_loss) if exact_g else {}
        with torch.autocast(device_type=w0.device.type, enabled=False):
            terms = self._collect_terms(grads)
        self.last_alignment = {}
        if not terms.where and not terms.flat_where:
            return torch.zeros((), dtype=out_dtype, device=w0.device)
        self._check_can_act(terms)
        vals, weights, where = self._term_values(terms)
        return (scale * self._aggregate(vals, weights, where)).to(out_dtype)

    # ------------------------------------------------------------------ terms
    def _collect_terms(self, grads: Mapping[str, list[Tensor]]) -> _Terms:
        """The five scalar moments of every (layer, relation) term and the flatness terms."""
        terms = _Terms()
        for name in self.layer_names:
            ops = self._operands(name, grads)
            sketches: dict[str, Tensor] = {}  # matrix name → its (centred) sketch, shared by relations
            if self.estimator == "hutchinson":
                self._gram_sketches(ops, sketches)
            for rel in self.relations:
                wt = self._layer_w[name] * self._rel_w[rel]
                a_name, b_name = CF.RELATION_PAIRS[rel]
                a, b = ops.get(a_name), ops.get(b_name)
                if wt == 0.0 or a is None or b is None:
                    continue  # zero weight, or G average not yet available with ema_warmup="skip"
                terms.add((name, rel), wt, _dim(a) ** 2, self._pieces(a, b, a_name, b_name, sketches))
            flat_w = self._layer_w[name] * self.flatness
            if flat_w > 0:
                terms.flats.append(spectral_flatness(_work(self._taps[name].weight(self._captures[name][0].module))))
                terms.flat_where.append(name)
                terms.flat_weights.append(flat_w)
        return terms

    def _gram_sketches(self, ops: Mapping[str, SketchOperand | None], sketches: dict[str, Tensor]) -> None:
        """Both weight Grams' sketches in one pass (:func:`gram_sketches`) when both sides are sketched."""
        za, zb = ops.get("Z_a"), ops.get("Z_b")
        if isinstance(za, WeightGram) and isinstance(zb, WeightGram) and self._sketched(za.dim) and self._sketched(zb.dim):
            sketches["omega_a"] = rademacher_probes(za.dim, self.probes, like=za.weight)
            sketches["omega_b"] = rademacher_probes(zb.dim, self.probes, like=za.weight)
            sketches["raw_Z_a"], sketches["raw_Z_b"] = gram_sketches(za.weight, sketches["omega_a"], sketches["omega_b"])

    def _pieces(
        self, a: SketchOperand, b: SketchOperand, a_name: str, b_name: str, sketches: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """``(⟨A,B⟩, ‖A‖², ‖B‖², 1ᵀA1, 1ᵀB1)``: exact, or (``estimator="hutchinson"``) Hutchinson estimates
        of the moments of the entry-centred matrices for pearson (then the sums are None and α is their cosine).

        Sides of width ``d ≤ probes`` stay exact under ``"hutchinson"`` (cheaper than ``k ≥ d`` probes).
        """
        d = _dim(a)
        pearson = self.metric == "pearson"
        if not self._sketched(d):
            assert not isinstance(a, LazyRowMoment) and not isinstance(b, LazyRowMoment)  # _rows() keeps them exact
            inner, sq_a, sq_b = frobenius_inner(a, b), squared_frobenius(a), squared_frobenius(b)
            if not pearson:
                return inner, sq_a, sq_b, None, None
            s_a, s_b = entry_sum(a), entry_sum(b)
            if self.estimator == "exact":
                return inner, sq_a, sq_b, s_a, s_b
            n = float(d * d)
            return inner - s_a * s_b / n, sq_a - s_a * s_a / n, sq_b - s_b * s_b / n, None, None
        for m, op in ((a_name, a), (b_name, b)):
            if m not in sketches:
                side = "omega_" + m[-1]  # H_a, Z_a, G_a act on the input side; H_b, Z_b, G_b on the output side
                if side not in sketches:
                    sketches[side] = rademacher_probes(d, self.probes, like=_operand_tensor(op))
                sketches[m] = centred_sketch(op, sketches[side], self.metric, product=sketches.pop("raw_" + m, None))
        return (*sketch_pieces(sketches[a_name], sketches[b_name]), None, None)

    def _term_values(self, terms: _Terms) -> tuple[Tensor, list[float], list[tuple[str, str]]]:
        """``1 − α`` and ``1 − φ`` of every term (α of all terms in one vectorised call); records ``last_alignment``."""
        vals_list: list[Tensor] = []
        if terms.where:
            stacked = [torch.stack(p) if p else None for p in terms.pieces]
            numel = torch.tensor(terms.numel, dtype=torch.float64, device=stacked[0].device)  # type: ignore[union-attr]
            metric: CF.Metric = self.metric if self.estimator == "exact" else "cosine"  # sketches come centred
            alphas = alignment_from_moments(stacked[0], stacked[1], stacked[2], stacked[3], stacked[4], numel, metric)  # type: ignore[arg-type]
            detached = alphas.detach()
            for i, (name, rel) in enumerate(terms.where):
                self.last_alignment.setdefault(name, {})[rel] = detached[i]
            vals_list.append(1.0 - alphas)
        if terms.flat_where:
            phi = torch.stack(terms.flats)
            for i, name in enumerate(terms.flat_where):
                self.last_alignment.setdefault(name, {})["flatness"] = phi.detach()[i]
            vals_list.append(1.0 - phi)
        where = terms.where + [(n, "flatness") for n in terms.flat_where]
        return torch.cat(vals_list), terms.weights + terms.flat_weights, where

    def _aggregate(self, vals: Tensor, weights: list[float], where: list[tuple[str, str]]) -> Tensor:
        """The weighted mean (``focus=None``) or soft maximum of the finite terms (policy ``nonfinite``)."""
        wts = torch.tensor(weights, dtype=vals.dtype, device=vals.device)
        finite = torch.isfinite(vals)
        if self.nonfinite != "skip" and not bool(finite.all()):  # one host sync
            bad = [f"{_display(n)!r}/{r}" for (n, r), ok in zip(where, finite.tolist()) if not ok]
            msg = f"AlignmentLoss: α is undefined (a zero or constant matrix, or non-finite activations) for {bad}"
            if self.nonfinite == "error":
                raise CanonRegError(msg + "; pass nonfinite='skip' or 'warn' to leave such terms out")
            warnings.warn(msg + "; left out of the mean", RuntimeWarning, stacklevel=3)
        wts = torch.where(finite, wts, torch.zeros_like(wts))
        vals = torch.where(finite, vals, torch.zeros_like(vals))
        total = wts.sum()
        total = torch.where(total > 0, total, torch.ones_like(total))
        if self.focus is None:
            return (wts * vals).sum() / total
        # τ·log Σ p_i exp(v_i/τ), p = w/Σw: between the weighted mean (τ → ∞) and the worst term (τ → 0)
        tau, live = self.focus, wts > 0
        logits = torch.where(live, vals / tau + torch.log(torch.where(live, wts, torch.ones_like(wts))), torch.full_like(vals, -math.inf))
        any_live = live.any()
        logits = torch.where(any_live, logits, torch.zeros_like(logits))  # every term skipped: no -inf − -inf
        return torch.where(any_live, tau * (torch.logsumexp(logits, 0) - torch.log(total)), torch.zeros_like(total))

    # ------------------------------------------------------------------ internals
    def _check_can_act(self, terms: _Terms) -> None:
        """Raise if no term can reach a parameter (frozen model); warn once naming the layers that cannot act."""
        if not torch.is_grad_enabled():
            return
        acting: dict[str, bool] = {}  # layers with at least one computed term
        for i, (name, _) in enumerate(terms.where):
            acting[name] = acting.get(name, False) or any(p[i].requires_grad for p in terms.pieces if p)
        for name, phi in zip(terms.flat_where, terms.flats):
            acting[name] = acting.get(name, False) or phi.requires_grad
        inert = [_display(n) for n, ok in acting.items() if not ok]
        if len(inert) == len(acting):
            raise CanonRegError(
                f"AlignmentLoss cannot act: none of its terms depends on a parameter that requires grad (selected layers "
                f"{inert}; are their weights and every earlier layer frozen?). Unfreeze them or select trainable layers "
                "with `layers=`"
            )
        if inert and not self._inert_warned:
            self._inert_warned = True
            warnings.warn(
                f"AlignmentLoss: layers {inert} cannot act (their terms depend on no parameter that requires grad: "
                "frozen weights and frozen inputs); their terms only add a constant",
                RuntimeWarning,
                stacklevel=3,
            )

    def _check_captures(self, exact_g: bool) -> None:
        for name in self.layer_names:
            caps = self._captures.get(name)
            if not caps:
                raise CanonRegError(
                    f"Layer {_display(name)!r} has no hook data from the last forward pass: it did not run in a "
                    "grad-enabled call of the model (is it used in forward? was the pass under torch.no_grad()?). "
                    "Select the layers that run with `layers=`"
                )
            for cap in caps:
                x = cap.inputs[0] if cap.inputs else None
                if isinstance(x, Tensor) and x._version != cap.in_version:
                    raise CanonRegError(
                        f"The input of layer {_display(name)!r} was modified in place after its forward pass; "
                        "AlignmentLoss reads h_a when called. Use an out-of-place operation there"
                    )
                if exact_g and cap.output._version != cap.out_version:
                    raise CanonRegError(
                        f"The output of layer {_display(name)!r} was modified in place after its forward pass "
                        "(e.g. nn.ReLU(inplace=True) right after it), so g_mode='exact' cannot differentiate the "
                        "task loss with respect to h_b. Use an out-of-place activation or g_mode='ema'"
                    )
                if self._taps[name].weight(cap.module)._version != cap.w_version:
                    raise CanonRegError(
                        f"The weights of layer {_display(name)!r} changed since the forward pass (optimizer.step() "
                        "before calling the loss?). Call align() after the forward pass and before the optimizer step"
                    )

    def _exact_grads(self, task_loss: Tensor | None) -> dict[str, list[Tensor]]:
        if task_loss is None:
            raise ValueError(
                "Expected `task_loss` (a scalar tensor) with g_mode='exact' and G relations "
                f"{[r for r in self.relations if set(CF.RELATION_PAIRS[r]) & set(_G_MATRICES)]}: "
                "call `loss = task + align(task)`"
            )
        if not isinstance(task_loss, Tensor) or task_loss.numel() != 1 or not task_loss.requires_grad:
            raise ValueError(f"Expected `task_loss` to be a scalar tensor that requires grad, but got {_describe(task_loss)}")
        outs = [(n, c.output) for n in self.layer_names for c in self._captures[n]]
        for n, o in outs:
            if not o.requires_grad:
                raise CanonRegError(f"The output of layer {_display(n)!r} does not require grad; its G is undefined")
        gs = torch.autograd.grad(task_loss.reshape(()), [o for _, o in outs], create_graph=True, allow_unused=True)
        res: dict[str, list[Tensor]] = {}
        for (n, _), g in zip(outs, gs):
            if g is None:
                raise CanonRegError(f"`task_loss` does not depend on the output of layer {_display(n)!r}; its G is undefined")
            res.setdefault(n, []).append(g)
        return res

    def _sketched(self, dim: int) -> bool:
        """Whether a side of width ``dim`` is sketched (``estimator="hutchinson"`` and ``dim > probes``)."""
        return self.estimator == "hutchinson" and dim > self.probes

    def _rows(self, x: Tensor, image: Tensor | None = None) -> RowMoment | LazyRowMoment:
        """The moment of rows ``x``: lazy (raw rows) on a sketched side, else factored (:func:`row_moment`)."""
        return LazyRowMoment(x, self.preprocess) if self._sketched(x.shape[1]) else row_moment(x, self.preprocess, image=image)

    def _operands(self, name: str, grads: Mapping[str, list[Tensor]]) -> dict[str, SketchOperand | None]:
        caps = self._captures[name]
        tap = self._taps[name]
        module = caps[0].module
        w = _work(tap.weight(module))
        needed = {m for r in self.relations for m in CF.RELATION_PAIRS[r]}
        ops: dict[str, SketchOperand | None] = {}
        shared: dict[str, Tensor] = {}
        if "Z_a" in needed:
            ops["Z_a"] = WeightGram(w, "a", shared)
        if "Z_b" in needed:
            ops["Z_b"] = WeightGram(w, "b", shared)
        out_rows = None
        if self._needs_out_rows:
            out_rows = _cat([_work(c.rows_b) for c in caps if c.rows_b is not None])
        if "H_a" in needed:
            x = _cat([_work(take_rows(c.tap.input_rows(c.module, c.inputs), c.keep)) for c in caps])
            image = None
            if "f-RWA" in self.relations and type(module) in _EXACT_AFFINE and out_rows is not None and not self._sketched(x.shape[1]):
                bias = tap.bias(module)
                image = out_rows - _work(bias) if bias is not None else out_rows
            ops["H_a"] = self._rows(x, image)
        if "H_b" in needed:
            assert out_rows is not None
            ops["H_b"] = self._rows(out_rows)
        if self._needs_g:
            if self.g_mode == "exact":
                gb = _cat([_work(take_rows(c.tap.output_rows(c.module, g), c.keep)) for c, g in zip(caps, grads[name])])
                gb = -gb / gb.detach().abs().amax().clamp_min(torch.finfo(gb.dtype).tiny)  # scale-free; no underflow
                if "G_b" in needed:
                    ops["G_b"] = self._rows(gb)
                if "G_a" in needed:
                    ops["G_a"] = self._rows(gb @ w)
            else:
                ema = self._ema.get(name, {})
                for m in self._needs_g:
                    if m not in ema:
                        if self.ema_warmup == "error":
                            raise CanonRegError(
                                f"g_mode='ema' needs a G average for layer {_display(name)!r}, but no backward pass has "
                                "reached it since the loss was attached: run one backward pass first (e.g. of the task "
                                "loss alone), pass ema_warmup='skip' to leave G terms out until then, or use g_mode='exact'"
                            )
                        ops[m] = None
                    else:
                        c = ema[m]
                        ops[m] = (c / c.abs().amax().clamp_min(torch.finfo(c.dtype).tiny)).to(w.device, w.dtype)
        return ops


def _to_loss(ref: weakref.ref[AlignmentLoss], name: str, module: nn.Module, tap: LayerTap, batch: float, rows: Tensor) -> None:
    """Hand one call's gradient rows to its loss, if the loss still exists."""
    loss = ref()
    if loss is not None:
        loss._on_grad(name, module, tap, batch, rows)


#: Module types whose output is exactly ``W h_a + b`` row by row (so ``h_a Wᵀ = h_b − b``).
_EXACT_AFFINE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _check_relations(relations: Sequence[str] | Literal["all"]) -> tuple[str, ...]:
    """The requested relation names as a tuple (``"all"``: the six), or a clear error."""
    if relations == "all":
        relations = CF.RELATIONS
    if isinstance(relations, str):
        raise ValueError(  # noqa: TRY004 — a single name is a wrong value, not a wrong type
            f"Expected `relations` to be a sequence of names, e.g. ({relations!r},), but got the string {relations!r}"
        )
    if not isinstance(relations, Sequence):
        raise TypeError(f"Expected `relations` to be a sequence of names from {list(CF.RELATIONS)}, but got {relations!r}")
    rels = tuple(relations)
    if not rels:
        raise ValueError(f"Expected `relations` to name at least one of {list(CF.RELATIONS)}, but got an empty sequence")
    for r in rels:
        if r not in CF.RELATIONS:
            raise ValueError(f"Expected `relations` to contain names from {list(CF.RELATIONS)}, but got {r!r}")
    if len(set(rels)) != len(rels):
        raise ValueError(f"Expected `relations` without duplicates, but got {list(rels)}")
    return rels


def _cat(xs: list[Tensor]) -> Tensor:
    return xs[0] if len(xs) == 1 else torch.cat(xs)


def _operand_tensor(a: SketchOperand) -> Tensor:
    """The tensor an operand holds (its device and dtype are the sketch's)."""
    if isinstance(a, LazyRowMoment):
        return a.x
    return a.rows if isinstance(a, RowMoment) else a.weight if isinstance(a, WeightGram) else a


#: Loss arithmetic in at least float32 (half/bfloat16 tensors are upcast).
_work = at_least_float32


# ====================================================================== preset
#: The configuration :func:`crh_loss` returns (see its docstring for the measurement behind it).
CRH_PRESET: dict[str, Any] = {
    "relations": "all",
    "metric": "pearson",
    "preprocess": "normalized",
    "g_mode": "exact",
    "weight": 1.0,
    "flatness": 0.0,
    "focus": 0.05,
    "warmup": 0,
}


def inner_layers(model: nn.Module, taps: dict[type[nn.Module], LayerTap] | None = None) -> list[str]:
    """The default-selected layers of ``model`` without the first and the last (in registration order).

    The first layer's input is the data (its ``H_a`` is fixed) and the last is the head; the layers
    in between are the "inner" ones whose input is itself learned. With fewer than three layers every
    layer is returned.
    """
    roles = layer_roles(list(select_layers(model, None, taps)[0]))
    inner = [n for n, role in roles.items() if role == "inner"]
    return inner or list(roles)


def crh_loss(model: nn.Module, *, weight: float | None = None, layers: LayerSpec = None, **overrides: Any) -> AlignmentLoss:
    """canonreg's best measured trade-off for full CRH: an :class:`AlignmentLoss` on the inner layers.

        L = weight · τ · log( (1/|T|) Σ_{(l,r) ∈ T} exp((1 − α_{l,r}) / τ) ),   T = inner layers × six relations,

    a soft maximum (``focus = τ = 0.05``) of ``1 − α`` over all six relations of every inner layer, α the
    Pearson score of normalized moments (the monitor's protocol), ``G`` the *task* loss's gradient by
    double backprop (``g_mode="exact"``), i.e. ``AlignmentLoss(model, relations="all",
    layers=inner_layers(model), **CRH_PRESET)``. Use it as ``loss = task + align(task)``. Cost: one
    extra backward with graph plus 18 α terms; about 10× a plain step of a small MLP on the CPU.

    Why this one (``benchmarks/results/crh_reach.md``, MNIST-1D MLP 40-128×4-10, SGD, 3000 steps,
    3 seeds, α measured after training on the whole training set with the task gradient only):
    against a weighted *mean* of the 18 terms the soft maximum lifts the worst relation (0.37 → 0.77
    at λ = 1, 2000 steps, same accuracy) because the mean spends its gradient on relations that
    already hold; a spectral-flatness term (the shared structure of theory §6) and a joint
    f-RWA + b-GWA + flatness objective did not help under normalized/pearson scoring. Full CRH at
    baseline accuracy was *not* reached: min α over the inner layers 0.55 / 0.78 / 0.87 at
    λ = 0.1 / 1 / 3 for −2.1 / −4.1 / −11.9 points of test accuracy (best plain baseline 73.4 %,
    min α 0.17–0.27); the first inner layer's f-RGA (``H_a ∝ G_a``) lags longest. ``weight = 1`` is
    the knee of that front. On a 1-D CNN (``crh_reach_cnn1d.md``, 3 seeds, 1500 steps) the same preset
    reached min α 0.83 at λ = 1 for −1.7 ± 2.7 points and 0.91 (full CRH in both inner conv layers)
    at λ = 3 for −9.0 ± 7.6 points.

    Args:
        model: the model to shape.
        weight: overall strength (default: the preset's).
        layers: which layers (default: :func:`inner_layers`).
        **overrides: any other :class:`AlignmentLoss` keyword, replacing the preset's value.

    Raises:
        TypeError: an override that :class:`AlignmentLoss` does not accept (named in the message).
    """
    allowed = set(inspect.signature(AlignmentLoss.__init__).parameters) - {"self", "model", "layers", "weight"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise TypeError(f"Expected `crh_loss` overrides from {sorted(allowed)}, but got {unknown}")
    kwargs = {**CRH_PRESET, **overrides}
    if weight is not None:
        kwargs["weight"] = weight
    taps = kwargs.get("taps")
    return AlignmentLoss(model, layers=inner_layers(model, taps) if layers is None else layers, **kwargs)
