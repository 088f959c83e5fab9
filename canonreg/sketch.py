"""Randomized sketches of ``d × d`` moments: the probe and sketch math of the monitor and of the loss.

A sketch of a symmetric ``d × d`` matrix ``M`` is ``M Ω`` for ``d × k`` probes ``Ω`` with ``E[Ω Ωᵀ] = k I``
(orthogonal Gaussian: ``E[Ω Ωᵀ] = I`` after the ``sqrt(d/k)`` scaling below, the same up to the constant
``k``, which every cosine ignores). Pearson's α of two ``d × d`` matrices is the cosine of their
entry-centred versions ``A_c = A − Ā 11ᵀ`` (``Ā = 1ᵀA1/d²``), and the centring acts on the sketch
exactly (:func:`entry_centred`, shared by both users):

    A_c Ω = AΩ − Ā 1 (1ᵀΩ),     α̂(A, B) = ⟨A_c Ω, B_c Ω⟩ / (‖A_c Ω‖_F ‖B_c Ω‖_F)

(``cosine``: the same without centring). Each of the three Frobenius products is an unbiased
(Hutchinson-type) estimate of ``tr(A_c B_c)``, ``‖A_c‖²``, ``‖B_c‖²``; α̂ itself is a ratio (an
``O(1/k)`` bias, in [−1, 1] by Cauchy–Schwarz, ``α̂ = 1`` exactly when ``A_c = c B_c``, ``c > 0``).

**Monitor** (:class:`~canonreg.CRHMonitor` with ``sketch=k``; :func:`probe`, :func:`sketched_moment`,
:func:`weight_sketches`, :func:`sketched_alignments`). Per layer side (``a``: the ``d_a`` input side,
``b``: the ``d_b`` output side) a fixed probe ``P = [Ω, 1]`` (``d × (k + 1)``) and, for each streamed
moment ``M`` (``H``, ``G``), the product ``M P`` instead of ``M``: per collected step ``2·n·d·(k + 1)``
multiply-adds per moment (instead of the ``n·d²/2`` of a symmetric Gram) and ``d·(k + 1)`` float64
entries of state (instead of ``d²``). ``Ω = sqrt(d/k) Q`` with ``Q`` the orthonormal columns of a
seeded Gaussian ``d × k`` matrix (uniform on the Stiefel manifold, so ``E[Ω Ωᵀ] = I``); for ``k ≥ d``,
``Ω = I`` and every estimate is exact. The ``1`` column gives ``M 1`` exactly, hence ``Ā``. Against the
exact monitor's ``n·d²/2`` per Gram (and its identities, which save two of the four moments in
raw/centered mode), the sketch pays for widths above about ``4(k + 1)``. ``Z_a = WᵀW`` and ``Z_b = WWᵀ``
enter as ``Wᵀ(WP)``, ``W(WᵀP)`` at ``compute()`` time (``2·d_a·d_b·(k + 1)``), so all six relations are
estimated. The error shrinks like ``1/sqrt(k)`` (times ``sqrt(1 − k/d)``). Measured on a trained MLP
40 → 1024 ×4 → 10 (``benchmarks/monitor_overhead.py --sketch-error``,
``benchmarks/results/monitor_sketch_error.json``; 3 probe seeds, 5 layers × 6 relations each):
``max |α̂ − α|`` 0.065 / 0.042 / 0.026 / 0.019 / 0.010 at ``k`` = 32 / 64 / 128 / 256 / 512 (raw), and
at most 0.042 / 0.028 / 0.021 / 0.014 / 0.009 (centered, normalized); mean errors are 4–7× smaller.
Not estimated (they need the full matrices): the matrices themselves, PAH exponents (eigenvectors of
``Z``) and effective ranks; ``compute()`` of a sketched monitor raises for them.

**Loss** (:class:`~canonreg.AlignmentLoss` with ``estimator="hutchinson"``; :func:`rademacher_probes`,
:func:`sketch_product`, :func:`gram_sketches`, :func:`centred_sketch`, :func:`sketch_pieces`,
:func:`sketched_alignment`). Differentiable sketches of the factored operands of
:mod:`canonreg.loss_moments`, ``FᵀF Ω = Fᵀ(FΩ)``, ``WᵀW Ω = Wᵀ(WΩ)``, with ``k`` Rademacher probes
drawn afresh at every call: ``⟨A,B⟩ ≈ ⟨AΩ, BΩ⟩/k`` and ``‖A‖² ≈ ‖AΩ‖²/k``, in
``O(k·(n·d + d_a·d_b))`` instead of ``O(d³ + n·d²)``; ``Ā`` comes exactly from the operands'
entry sums, so no ones column is needed.

Where the two differ on purpose: the monitor's probes are fixed for its lifetime (its sums over
batches must share one ``Ω``) and orthogonal (exact for ``k ≥ d``; a QR once per layer side), the
loss's are fresh ±1 draws every call (no QR per call, any dtype, unbiased without a scale); the
monitor scores once per ``compute()`` on the host from float64 state, the loss as batched
differentiable tensors (:func:`canonreg.loss_moments.alignment_from_moments`); ``Z P`` is a plain
float64 product in the monitor and an autograd ``Function`` in the loss's working dtype
(:func:`gram_sketches`), whose CPU-friendly operand layout gives other rounding, so the two are
kept apart to leave both results unchanged.

Reference: Hutchinson (1989), Martinsson & Tropp, "Randomized numerical linear algebra" (2020), §4–§5;
the alignments are those of Ziyin, Chuang, Galanti & Poggio, arXiv:2410.03006.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import functional as F
from .errors import check_choice, check_positive_int
from .loss_moments import (
    LazyRowMoment,
    MomentOperand,
    RowMoment,
    SketchOperand,
    WeightGram,
    _describe,
    _dim,
    _operand_tensor,
    _sq64,
    _sum64,
    alignment_from_moments,
    entry_sum,
)

__all__ = [
    "centred_sketch",
    "entry_centred",
    "gram_sketches",
    "probe",
    "rademacher_probes",
    "sketch_pieces",
    "sketch_product",
    "sketched_alignment",
    "sketched_alignments",
    "sketched_moment",
    "weight_sketches",
]


# ====================================================================== probes
def probe(d: int, k: int, generator: torch.Generator) -> Tensor:
    """The float64 probe ``P = [Ω, 1]`` (``d × (min(k, d) + 1)``) of one layer side (see the module docstring)."""
    if k >= d:
        omega = torch.eye(d, dtype=torch.float64)
    else:
        q, _ = torch.linalg.qr(torch.randn(d, k, dtype=torch.float64, generator=generator))
        omega = q * math.sqrt(d / k)
    return torch.cat([omega, torch.ones(d, 1, dtype=torch.float64)], dim=1)


def rademacher_probes(dim: int, probes: int, *, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``Ω`` of shape ``(dim, probes)`` with independent ±1 entries, so ``E[Ω Ωᵀ] / k = I`` (``k = probes``).

    In ``like``'s dtype, on ``like``'s device. Without ``generator`` drawn from torch's global generator
    on that device (reproducible under ``torch.manual_seed``); with one, drawn from it on its own device
    (so a CPU generator gives the same probes for a model on any device) and then moved, leaving the
    global generator untouched.
    """
    check_positive_int("probes", probes)
    if generator is None:
        omega = torch.randint(0, 2, (dim, probes), device=like.device, dtype=like.dtype)
    else:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"Expected `generator` to be a torch.Generator or None, but got {type(generator).__name__}")
        omega = torch.randint(0, 2, (dim, probes), generator=generator, device=generator.device, dtype=like.dtype).to(like.device)
    return omega.mul_(2.0).sub_(1.0)


def entry_centred(product: Tensor, mean: Tensor | float, probe_sums: Tensor) -> Tensor:
    """``(A − Ā 11ᵀ) Ω = AΩ − Ā 1 (1ᵀΩ)`` from ``product = AΩ``, the entry mean ``Ā = 1ᵀA1/d²`` and
    ``probe_sums = 1ᵀΩ`` (``(1, k)``, broadcast over the rows): the sketch of the entry-centred matrix,
    whose cosine with another is the sketched Pearson α."""
    return product - mean * probe_sums


# ====================================================================== streamed (monitor)
def sketched_moment(s_x: Tensor, s_xp: Tensor, n: float, centered: bool, p: Tensor) -> Tensor:
    """``M P`` from the sums ``Σ(x − o)`` and ``Σ(x − o)(x − o)ᵀ P`` (about the mean in centred modes).

    ``raw``: ``M = Σxxᵀ/n``; centred: ``M = Σ(x − o)(x − o)ᵀ/n − μ_o μ_oᵀ`` with ``μ_o = Σ(x − o)/n`` (≈ 0).
    """
    mp = s_xp / n
    if centered:
        mu = s_x / n
        mp = mp - torch.outer(mu, mu @ p)
    return mp


def _score(a: Tensor, b: Tensor) -> float:
    """``⟨a, b⟩ / (‖a‖ ‖b‖)`` of two (centred) sketches as a host float in [−1, 1]; NaN for a zero or
    non-finite norm. The loss's differentiable, batched twin is :func:`sketch_pieces` followed by
    :func:`canonreg.loss_moments.alignment_from_moments` (other rounding; kept apart on purpose)."""
    den = float(torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))
    if not math.isfinite(den) or den == 0.0:
        return float("nan")
    return max(-1.0, min(1.0, float((a * b).sum()) / den))


def sketched_alignments(
    sketches: Mapping[str, Tensor], probes: Mapping[str, Tensor], metric: F.Metric
) -> dict[str, float]:
    """The six α̂ of one layer from ``sketches[m] = M P_side`` (``m`` in ``H_a, G_a, Z_a, H_b, G_b, Z_b``).

    ``probes`` maps ``"a"``/``"b"`` to ``P = [Ω, 1]``. NaN where a centred sketch is zero or not finite.
    """
    scores: dict[tuple[str, str], float] = {}
    for side in ("a", "b"):
        p = probes[side]
        d = p.shape[0]
        ones_omega = p[:, :-1].sum(0)  # 1ᵀΩ
        names = (f"H_{side}", f"G_{side}", f"Z_{side}")
        cent = {}
        for m in names:
            mp = sketches[m]
            x = mp[:, :-1]
            if metric == "pearson":
                mean = float(mp[:, -1].sum()) / (d * d)  # 1ᵀM1/d²
                raw = x
                x = entry_centred(x, mean, ones_omega.unsqueeze(0))  # (M − m̄ 11ᵀ)Ω
                # a constant M (no spread) centres to rounding, not to 0: undefined (F._flat_to_zero's rule)
                if float(torch.linalg.vector_norm(x)) <= F._FLAT_ULPS * torch.finfo(x.dtype).eps * float(torch.linalg.vector_norm(raw)):
                    x = torch.zeros_like(x)
            cent[m] = x
        for i, pa in enumerate(names):
            for pb in names[i + 1 :]:
                scores[(pa, pb)] = scores[(pb, pa)] = _score(cent[pa], cent[pb])
    return {rel: scores[pair] for rel, pair in F.RELATION_PAIRS.items()}


def weight_sketches(weight: Tensor, probes: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``Z_a P_a = Wᵀ(W P_a)`` and ``Z_b P_b = W(Wᵀ P_b)`` in float64 (``2·d_a·d_b·(k + 1)`` each)."""
    w = weight.to(torch.float64)
    return {"Z_a": w.T @ (w @ probes["a"].to(w.device)), "Z_b": w @ (w.T @ probes["b"].to(w.device))}


# ====================================================================== differentiable (loss)
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


def centred_sketch(a: SketchOperand, omega: Tensor, metric: F.Metric, *, product: Tensor | None = None) -> Tensor:
    """``A Ω`` (cosine) or ``(A − ā J) Ω`` (pearson; ``ā = 1ᵀA1 / d²`` exact, ``J`` all ones).

    Pearson α is the cosine of the entry-centred matrices, so centring the sketch keeps the
    cosine-of-sketches form (below) for both metrics. ``product``: ``A Ω`` when already computed
    (e.g. by :func:`gram_sketches`).
    """
    u = sketch_product(a, omega) if product is None else product
    if metric == "pearson":
        mean = (entry_sum(a) / (_dim(a) ** 2)).to(u.dtype)
        u = entry_centred(u, mean, omega.to(u.dtype).sum(0, keepdim=True))
    return u


def sketch_pieces(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Hutchinson estimates ``(⟨u, v⟩/k, ‖u‖²/k, ‖v‖²/k)`` (float64) from ``u = AΩ``, ``v = BΩ``.

    With ``E[ΩΩᵀ]/k = I``: ``E⟨AΩ, BΩ⟩/k = Tr(AᵀB) = ⟨A, B⟩_F`` and ``E‖AΩ‖²/k = ‖A‖_F²`` (unbiased).
    """
    k = u.shape[1]
    return _sum64(u * v) / k, _sq64(u) / k, _sq64(v) / k


def sketched_alignment(
    a: MomentOperand,
    b: MomentOperand,
    probes: int = 16,
    metric: F.Metric = "cosine",
    *,
    omega: Tensor | None = None,
    generator: torch.Generator | None = None,
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
        omega: optional ``(d, k)`` probes (then ``probes`` and ``generator`` are ignored).
        generator: draw the probes from this generator instead of torch's global one.
    """
    check_choice("metric", metric, F.METRICS)
    d = _dim(a)
    if _dim(b) != d:
        raise ValueError(f"Expected operands of equal size, but got {d} × {d} and {_dim(b)} × {_dim(b)}")
    if omega is None:
        omega = rademacher_probes(d, probes, like=_operand_tensor(a), generator=generator)
    inner, sq_a, sq_b = sketch_pieces(centred_sketch(a, omega, metric), centred_sketch(b, omega, metric))
    return alignment_from_moments(inner, sq_a, sq_b, None, None, d * d, "cosine")
