"""Pure tensor functions behind every number canonreg reports.

Notation follows ``docs/theory.md``: a layer ``h_b = W h_a + b`` with ``W`` of shape ``(d_b, d_a)``;
``g_b = -dℓ/dh_b`` per sample, ``g_a = Wᵀ g_b``. The six matrices are

    H_a = E[h_a h_aᵀ]   G_a = E[g_a g_aᵀ]   Z_a = WᵀW
    H_b = E[h_b h_bᵀ]   G_b = E[g_b g_bᵀ]   Z_b = WWᵀ

and the six relations of the Canonical Representation Hypothesis (Ziyin, Chuang, Galanti &
Poggio, "Formation of Representations in Neural Networks", arXiv:2410.03006) claim pairwise
proportionality on each side (see :data:`RELATION_PAIRS`).

All functions here are stateless, differentiable where that makes sense, and work in the dtype
they are given (pass float64 for reference-quality numbers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .errors import (
    check_choice,
    check_fraction,
    check_nonnegative,
    check_nonnegative_int,
    check_positive,
    check_positive_int,
    renamed_arguments,
)

__all__ = [
    "RELATIONS",
    "RELATION_PAIRS",
    "MATRIX_NAMES",
    "PREPROCESS_MODES",
    "Preprocess",
    "Metric",
    "preprocess_rows",
    "second_moment",
    "moment_from_sums",
    "alignment",
    "pairwise_alignment",
    "symmetric_product",
    "relation_alignments",
    "participation_ratio",
    "entropy_rank",
    "n_components",
    "random_orthogonal",
    "rotation_null_alignment",
    "PowerLawFit",
    "power_law_fit",
    "nc1",
    "invariance_score",
    "BalanceTerms",
    "balance_terms",
]

Preprocess = Literal["raw", "centered", "normalized"]
Metric = Literal["pearson", "cosine"]

PREPROCESS_MODES: tuple[Preprocess, ...] = ("raw", "centered", "normalized")
METRICS: tuple[Metric, ...] = ("pearson", "cosine")

#: The six CRH relations, in the order reports use.
RELATIONS: tuple[str, ...] = ("f-RGA", "f-GWA", "f-RWA", "b-RGA", "b-GWA", "b-RWA")

#: ``relation -> (A, B)``: the relation claims ``A ∝ B``; a PAH fit reads ``A ∝ B^κ``.
RELATION_PAIRS: dict[str, tuple[str, str]] = {
    "f-RGA": ("H_a", "G_a"),
    "f-GWA": ("G_a", "Z_a"),
    "f-RWA": ("H_a", "Z_a"),
    "b-RGA": ("H_b", "G_b"),
    "b-GWA": ("G_b", "Z_b"),
    "b-RWA": ("H_b", "Z_b"),
}

MATRIX_NAMES: tuple[str, ...] = ("H_a", "H_b", "G_a", "G_b", "Z_a", "Z_b")


def _check_rows(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, but got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(
            f"Expected `{name}` to be a 2-D (samples, features) tensor, but got shape {tuple(x.shape)}"
        )


def _check_square(name: str, a: Tensor) -> None:
    if not isinstance(a, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, but got {type(a).__name__}")
    if a.dim() != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"Expected `{name}` to be a square matrix, but got shape {tuple(a.shape)}")


@renamed_arguments(mode="preprocess")
def preprocess_rows(x: Tensor, preprocess: Preprocess) -> Tensor:
    """Per-sample preprocessing applied before second moments.

    ``raw`` and ``centered`` return ``x`` unchanged (centering happens in the moment);
    ``normalized`` returns ``x_i / ‖x_i‖`` (rows of zero norm stay zero, and still count as samples).

    Args:
        x: ``(n, d)`` rows, one sample each.
        preprocess: ``"raw" | "centered" | "normalized"`` (formerly ``mode``, still accepted with a
            FutureWarning).
    """
    check_choice("preprocess", preprocess, PREPROCESS_MODES)
    if preprocess != "normalized":
        return x
    # the norm in float64 (at least): a float32 norm of rows of 1e-30 underflows to 0, of 1e30 overflows
    wide = torch.promote_types(x.dtype, torch.float64) if x.dtype.is_floating_point else torch.float64
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=wide).to(x.dtype)
    return x / torch.where(norms > 0, norms, torch.ones_like(norms))


def moment_from_sums(sum_xx: Tensor, sum_x: Tensor, count: int | float | Tensor, *, centered: bool) -> Tensor:
    """Second moment from streaming sums.

    ``raw``: ``S_xx / n``; centred: ``S_xx / n − μ μᵀ`` with ``μ = S_x / n`` (population covariance).
    One ``d × d`` allocation (the result); the inputs are not modified.
    """
    n = float(count)
    if n <= 0:
        raise ValueError(f"Expected `count` to be positive, but got {count!r}")
    m = sum_xx / n
    if centered:
        mu = sum_x / n
        if mu.dtype == m.dtype and mu.device == m.device:
            m.addr_(mu, mu, alpha=-1.0)  # in place: no second d × d temporary
        else:
            m = m - torch.outer(mu, mu)
    return m


@renamed_arguments(mode="preprocess")
def second_moment(x: Tensor, preprocess: Preprocess = "raw") -> Tensor:
    """Second moment of the rows of ``x`` after the spec's preprocessing.

    ``raw``: ``E[x xᵀ]``; ``centered``: ``Cov(x)``; ``normalized``: ``Cov(x/‖x‖)`` (the paper's
    measurement protocol). Expectations are population means over the ``n`` rows. Covariances are
    formed from the centred rows ``(x − x̄)ᵀ(x − x̄)/n`` (never ``E[xxᵀ] − x̄x̄ᵀ``, which cancels when
    the mean is large against the spread).

    Args:
        x: ``(n, d)`` samples.
        preprocess: ``"raw" | "centered" | "normalized"`` (formerly ``mode``, still accepted with a
            FutureWarning).

    Returns:
        ``(d, d)`` symmetric matrix.

    Example:
        >>> second_moment(torch.randn(100, 5), "centered").shape
        torch.Size([5, 5])
    """
    _check_rows("x", x)
    check_choice("preprocess", preprocess, PREPROCESS_MODES)
    if x.shape[0] == 0:
        raise ValueError("Expected `x` to have at least one row, but got 0 rows")
    y = preprocess_rows(x, preprocess)
    if preprocess == "raw":
        return y.T @ y / y.shape[0]
    yc = _flat_to_zero(y - y.mean(0), y)  # identical rows: no spread, whether or not their mean rounds back
    return yc.T @ yc / y.shape[0]


def alignment(a: Tensor, b: Tensor, metric: Metric = "pearson") -> Tensor:
    """Alignment score ``α(A, B)`` between two equally shaped matrices.

    ``pearson``: ``Σ(A_ij − Ā)(B_ij − B̄) / sqrt(Σ(A_ij − Ā)² Σ(B_ij − B̄)²)`` (the paper's score);
    ``cosine``:  ``⟨A, B⟩_F / (‖A‖_F ‖B‖_F)``, equal to 1 exactly when ``A = cB`` with ``c > 0``.

    Both lie in ``[−1, 1]``, are symmetric and invariant to positive rescaling of either argument.
    The result is NaN when either matrix has zero spread (pearson) or zero norm (cosine): alignment
    with a constant matrix is undefined. Differentiable, and lean for the per-step losses;
    :func:`pairwise_alignment` scores several large matrices in one pass without temporaries of their
    size (what :meth:`~canonreg.CRHMonitor.compute` uses); the two agree to round-off.

    Returns:
        0-d tensor in the promoted dtype of ``a`` and ``b``.
    """
    check_choice("metric", metric, METRICS)
    for arg, t in (("a", a), ("b", b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"Expected `{arg}` to be a torch.Tensor, but got {type(t).__name__}")
    if a.shape != b.shape:
        raise ValueError(f"Expected `a` and `b` to have the same shape, but got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.numel() == 0:
        raise ValueError("Expected `a` and `b` to have at least one entry, but got empty tensors")
    # The lean form for the per-step losses (few ops, differentiable); pairwise_alignment scores large
    # matrices without temporaries of their size.
    x = a.reshape(-1)
    y = b.reshape(-1)
    dtype = torch.promote_types(x.dtype, y.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float64  # integer/bool inputs: score them in float64
    x = x.to(dtype)
    y = y.to(dtype)
    if metric == "pearson":  # a spread at the rounding level of the mean is none: α undefined (NaN)
        x = _flat_to_zero(x - x.mean(), x)
        y = _flat_to_zero(y - y.mean(), y)
    # Scale each side by its max before the products: exact in real arithmetic, and it keeps
    # tiny gradient moments (1e-20 and below) from underflowing in float32.
    sx = x.detach().abs().amax()
    sy = y.detach().abs().amax()
    x = x / torch.where(sx > 0, sx, torch.ones_like(sx))
    y = y / torch.where(sy > 0, sy, torch.ones_like(sy))
    denom = torch.sqrt((x * x).sum() * (y * y).sum())
    num = (x * y).sum()
    nan = torch.full_like(num, float("nan"))
    return torch.where(denom > 0, num / torch.where(denom > 0, denom, torch.ones_like(denom)), nan).clamp(-1.0, 1.0)


#: Deviations from the entry mean up to this many ulps of the largest entry are rounding, not spread: a constant
#: matrix whose mean does not round exactly (0.3·11ᵀ) centres to a tiny constant, not to 0.
_FLAT_ULPS = 16.0


def _is_flat(centred: Tensor, raw: Tensor) -> Tensor:
    """0-d bool: the spread of ``centred`` (``raw`` minus its mean) is at the rounding level of ``raw``: no spread.

    ``max|centred| ≤ 16 ε max|raw|``. The one rule for "constant" of :func:`alignment`, :func:`second_moment`,
    the loss's row moments and the report's NaN reasons.
    """
    return centred.detach().abs().amax() <= _FLAT_ULPS * torch.finfo(centred.dtype).eps * raw.detach().abs().amax()


def _flat_to_zero(centred: Tensor, raw: Tensor) -> Tensor:
    """``centred`` (entries minus their mean), or zeros where its spread is at the rounding level of ``raw``."""
    return torch.where(_is_flat(centred, raw), 0.0, centred)


def pairwise_alignment(matrices: Sequence[Tensor], metric: Metric = "pearson") -> Tensor:
    """``α(M_i, M_j)`` (see :func:`alignment`) for every pair of equally shaped matrices, in one pass.

    ``S = X Xᵀ`` with row ``i`` of ``X`` the centred (pearson) or plain (cosine) vectorisation of
    ``M_i``, and ``α_ij = S_ij / sqrt(S_ii S_jj)`` (NaN where a matrix has zero spread or norm; ``α_ii = 1``
    otherwise). ``X`` is never materialised: ``S`` is summed over blocks of entries, so the extra memory
    is a few MiB whatever the size (three 4608² matrices: one read of each instead of ~20 temporaries).

    Args:
        matrices: ``k ≥ 1`` tensors of one shape (at least one entry).
        metric: ``"pearson" | "cosine"``.

    Returns:
        ``(k, k)`` symmetric tensor in the promoted dtype (float64 for integer inputs). Differentiable.

    Example:
        >>> a = torch.randn(4, 4); s = pairwise_alignment([a, 2 * a, -a])
        >>> [round(float(v), 6) for v in s[0]]
        [1.0, 1.0, -1.0]
    """
    check_choice("metric", metric, METRICS)
    mats = list(matrices)
    if not mats:
        raise ValueError("Expected `matrices` to hold at least one tensor, but got none")
    for i, t in enumerate(mats):
        if not isinstance(t, Tensor):
            raise TypeError(f"Expected `matrices[{i}]` to be a torch.Tensor, but got {type(t).__name__}")
        if t.shape != mats[0].shape:
            raise ValueError(
                f"Expected every matrix to have the shape of `matrices[0]` {tuple(mats[0].shape)}, but `matrices[{i}]` has {tuple(t.shape)}"
            )
    if mats[0].numel() == 0:
        raise ValueError("Expected `matrices` to have at least one entry each, but got empty tensors")
    return _scores(_centred_gram(mats, metric))


#: Entries per matrix in one block of :func:`_centred_gram` (4 MiB of float64). Large enough that a
#: 4608² matrix takes ~40 ops (each op is a parallel region: with 2 threads on a busy machine, small
#: blocks cost 10× more), small enough to stay in cache.
_GRAM_BLOCK = 1 << 19


def _centred_gram(mats: Sequence[Tensor], metric: Metric) -> Tensor:
    """``X Xᵀ`` of the vectorised matrices, centred on their means (pearson).

    Each row is divided by a power of two near its spread ``max |x − c|`` first: exact, and it keeps
    tiny gradient moments (1e-20 and below) from underflowing in float32 products. Summed block by
    block into one reused ``(k, _GRAM_BLOCK)`` buffer (a differentiable stack when autograd records),
    so a 4608² matrix costs three reads and no temporary of its size. No host synchronisation.
    """
    dtype = mats[0].dtype
    for m in mats[1:]:
        dtype = torch.promote_types(dtype, m.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float64  # integer/bool inputs: score them in float64
    flats = [m.reshape(-1).to(dtype) for m in mats]
    centres = [f.mean() if metric == "pearson" else torch.zeros((), dtype=dtype, device=f.device) for f in flats]
    scales = []
    for f, c in zip(flats, centres):
        lo, hi = torch.aminmax(f.detach())
        spread = torch.maximum(hi - c.detach(), c.detach() - lo)  # = max |f − c|: rounding is monotone
        ok = torch.isfinite(spread) & (spread > 0)
        scale = torch.where(ok, torch.exp2(-torch.floor(torch.log2(torch.where(ok, spread, 1.0)))), 1.0)
        if metric == "pearson":  # _is_flat's rule from the spread at hand: none at rounding level (scale 0: α NaN)
            scale = torch.where(spread <= _FLAT_ULPS * torch.finfo(dtype).eps * torch.maximum(hi.abs(), lo.abs()), 0.0, scale)
        scales.append(scale)
    n, k = flats[0].numel(), len(flats)
    if torch.is_grad_enabled() and any(f.requires_grad for f in flats):
        x = torch.stack([(f - c) * s for f, c, s in zip(flats, centres, scales)])
        return x @ x.T
    gram = torch.zeros(k, k, dtype=dtype, device=flats[0].device)
    buf = torch.empty(k, min(n, _GRAM_BLOCK), dtype=dtype, device=flats[0].device)
    for start in range(0, n, _GRAM_BLOCK):
        x = buf[:, : min(_GRAM_BLOCK, n - start)]
        for i, (f, c, s) in enumerate(zip(flats, centres, scales)):
            # (f − c)·s in one op: s is a power of two, so f·s − c·s rounds exactly like (f − c) then ·s
            torch.addcmul(-c * s, f[start : start + x.shape[1]], s, out=x[i])
        gram.addmm_(x, x.T)
    return gram


def _scores(gram: Tensor) -> Tensor:
    """``S_ij / sqrt(S_ii S_jj)`` clamped to ``[−1, 1]``; NaN where a diagonal entry is 0 or not finite."""
    gram = 0.5 * (gram + gram.T)  # exactly symmetric scores (a BLAS X Xᵀ need not be)
    diag = torch.diagonal(gram)
    denom = torch.sqrt(torch.outer(diag, diag))
    ok = denom > 0
    out = torch.where(ok, gram / torch.where(ok, denom, torch.ones_like(denom)), torch.full_like(gram, float("nan")))
    return out.clamp(-1.0, 1.0)


#: Row-panel height of :func:`symmetric_product` (one matmul per panel). 256 and 512 tie on one CPU
#: thread; with two, MKL ran the 256-row panels of a 512 × 4608 ``W`` 4× slower than 512-row ones.
_SYM_PANEL = 512


def symmetric_product(a: Tensor, b: Tensor) -> Tensor:
    """``aᵀ b`` for a product known to be symmetric (``WᵀW``, ``Wᵀ (G W)``, ``Vᵀ (A V)``), exactly symmetric.

    Row panels of ``p = _SYM_PANEL`` columns: ``out[i:i+p, i:] = a[:, i:i+p]ᵀ b[:, i:]``, one matmul
    each, mirrored into ``out[i:, i:i+p]``; each ``p × p`` diagonal block is symmetrised
    (``(D + Dᵀ)/2``). About ``1/2 + p/(2d)`` of the flops of ``aᵀb`` (measured 0.6 of the time of
    ``w.T @ w`` at ``d = 4096``, one CPU thread). The lower triangle of a product that is *not*
    symmetric is not computed: it mirrors the upper one.

    Args:
        a, b: ``(k, d)`` tensors of one shape.

    Returns:
        ``(d, d)`` symmetric tensor in the promoted dtype. Not differentiable.

    Example:
        >>> w = torch.randn(3, 5, dtype=torch.float64)
        >>> torch.allclose(symmetric_product(w, w), w.T @ w)
        True
    """
    for arg, t in (("a", a), ("b", b)):
        if not isinstance(t, Tensor) or t.dim() != 2:
            raise ValueError(f"Expected `{arg}` to be a 2-D torch.Tensor, but got {t.shape if isinstance(t, Tensor) else type(t).__name__}")
    if a.shape != b.shape:
        raise ValueError(f"Expected `a` and `b` to have the same shape, but got {tuple(a.shape)} and {tuple(b.shape)}")
    d = a.shape[1]
    out = torch.empty(d, d, dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
    with torch.no_grad():
        for i in range(0, d, _SYM_PANEL):
            e = min(i + _SYM_PANEL, d)
            panel = a[:, i:e].T @ b[:, i:]
            diag = panel[:, : e - i]
            diag.copy_((diag + diag.T).mul_(0.5))
            out[i:e, i:] = panel
            out[i:, i:e] = panel.T
    return out


def relation_alignments(matrices: Mapping[str, Tensor], metric: Metric = "pearson") -> dict[str, float]:
    """``α`` of all six relations from a mapping with keys ``H_a, H_b, G_a, G_b, Z_a, Z_b``."""
    missing = [k for k in MATRIX_NAMES if k not in matrices]
    if missing:
        raise ValueError(f"Expected `matrices` to contain {list(MATRIX_NAMES)}, but it lacks {missing}")
    return {r: float(alignment(matrices[p], matrices[q], metric)) for r, (p, q) in RELATION_PAIRS.items()}


def _sym_eigvalsh(h: Tensor) -> Tensor:
    return torch.linalg.eigvalsh(0.5 * (h + h.T)).clamp_min(0)


def participation_ratio(h: Tensor) -> Tensor:
    """Participation ratio ``(Σλ)² / Σλ²`` of a symmetric PSD matrix ``H`` with eigenvalues ``λ``.

    ``(Tr H)² / Tr(H²)`` for an exactly PSD ``H``. Equals the rank for a flat spectrum, 1 for rank
    one, and lies in ``[1, rank]`` by construction: negative eigenvalues (round-off in a second
    moment, which is PSD) are clipped to zero first. NaN for the zero matrix (no spectrum) and for a
    matrix with non-finite entries.
    """
    _check_square("h", h)
    if not bool(torch.isfinite(h).all()):
        return torch.full((), float("nan"), dtype=h.dtype, device=h.device)
    lam = _sym_eigvalsh(h)
    total = lam.sum()
    sq = (lam * lam).sum()
    nan = torch.full_like(total, float("nan"))
    return torch.where(sq > 0, (total * total / torch.where(sq > 0, sq, torch.ones_like(sq))).clamp_min(1.0), nan)


def entropy_rank(h: Tensor) -> Tensor:
    """Entropy effective rank ``exp(−Σ p_i log p_i)``, ``p_i = λ_i / Σ λ`` (Roy & Vetterli, 2007).

    Negative eigenvalues from round-off are clipped to zero; NaN for the zero matrix and for a matrix
    with non-finite entries.
    """
    _check_square("h", h)
    if not bool(torch.isfinite(h).all()):
        return torch.full((), float("nan"), dtype=h.dtype, device=h.device)
    lam = _sym_eigvalsh(h)
    total = lam.sum()
    if not bool(total > 0):
        return torch.full((), float("nan"), dtype=h.dtype, device=h.device)
    p = lam / total
    ent = -(torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))).sum()
    return torch.exp(ent)


def n_components(h: Tensor, threshold: float = 0.95) -> int:
    """Number of principal components needed to explain ``threshold`` of ``Tr H``.

    Smallest ``k`` with ``Σ_{i≤k} λ_(i) ≥ threshold · Σ λ`` (eigenvalues sorted descending).
    """
    _check_square("h", h)
    check_fraction("threshold", threshold)
    lam = torch.flip(_sym_eigvalsh(h.detach().double()), dims=(0,))
    total = lam.sum()
    if not bool(total > 0):
        raise ValueError("Expected `h` to have a positive trace; n_components is undefined for the zero matrix")
    cum = torch.cumsum(lam, 0) / total
    k = int(torch.searchsorted(cum, torch.tensor(threshold, dtype=cum.dtype) - 1e-12).item()) + 1
    return min(k, lam.numel())  # round-off can leave cum[-1] a hair below 1


def random_orthogonal(d: int, *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """Haar-distributed random ``d × d`` orthogonal matrix (QR of a Gaussian with sign fix)."""
    check_positive_int("d", d)
    g = torch.randn(d, d, generator=generator, dtype=dtype)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(1, dtype=dtype))


def rotation_null_alignment(
    a: Tensor,
    b: Tensor,
    metric: Metric = "pearson",
    *,
    num_samples: int = 16,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Spectrum-preserving chance level: ``α(A, Q B Qᵀ)`` for Haar-random orthogonal ``Q``.

    ``Q B Qᵀ`` keeps B's eigenvalues but forgets its eigenbasis, so the samples show what
    alignment two matrices with these spectra reach by chance (the paper's random-projection
    baseline is α ≈ 0.14).

    Returns:
        ``(num_samples,)`` tensor of null alignments.
    """
    _check_square("a", a)
    _check_square("b", b)
    if a.shape != b.shape:
        raise ValueError(f"Expected `a` and `b` to have the same shape, but got {tuple(a.shape)} and {tuple(b.shape)}")
    check_positive_int("num_samples", num_samples)
    out = []
    for _ in range(num_samples):
        q = random_orthogonal(b.shape[0], generator=generator, dtype=torch.float64).to(b.dtype)
        out.append(alignment(a, q @ b @ q.T, metric))
    return torch.stack(out)


@dataclass(frozen=True)
class PowerLawFit:
    """Result of :func:`power_law_fit` for a pair ``A ∝ B^κ``.

    Attributes:
        exponent: fitted κ.
        intercept: fitted c in ``log a = κ log λ + c``.
        r2: coefficient of determination of the log-log fit.
        ci_low, ci_high: bootstrap 95% percentile interval of κ.
        off_diagonal: ``‖VᵀAV − blockdiag(VᵀAV)‖_F / ‖A‖_F`` over B's eigenspaces (0 when A and B
            share an eigenbasis; see :func:`power_law_fit`).
        n_points: eigenvalues used (above the floor, with positive ``a_i``).
    """

    exponent: float
    intercept: float
    r2: float
    ci_low: float
    ci_high: float
    off_diagonal: float
    n_points: int

    def to_dict(self) -> dict[str, float | int]:
        return {
            "exponent": self.exponent,
            "intercept": self.intercept,
            "r2": self.r2,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "off_diagonal": self.off_diagonal,
            "n_points": self.n_points,
        }


def _ols(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Batched least squares ``y = k x + c`` along the last dim; returns (k, c)."""
    xm = x.mean(-1, keepdim=True)
    ym = y.mean(-1, keepdim=True)
    sxx = ((x - xm) ** 2).sum(-1)
    sxy = ((x - xm) * (y - ym)).sum(-1)
    k = sxy / sxx
    c = ym.squeeze(-1) - k * xm.squeeze(-1)
    return k, c


#: Eigenvalues closer than this (relative to the largest) are one degenerate eigenspace.
_DEGENERACY_TOL = 1e-9


def _eigenspace_labels(lam: Tensor, floor: float) -> Tensor:
    """Label each eigenvalue with its eigenspace: one label (-1) for all ``λ ≤ floor·λ_max`` (numerical
    null space), and runs of nonzero eigenvalues within ``_DEGENERACY_TOL·λ_max`` of each other share one."""
    if lam.numel() == 0:
        return torch.empty(0, dtype=torch.long)
    lam_max = lam.max()
    values, order = torch.sort(lam)
    new_run = torch.ones_like(values, dtype=torch.bool)
    new_run[1:] = (values[1:] - values[:-1]) > _DEGENERACY_TOL * lam_max
    ids = torch.cumsum(new_run.long(), 0)
    ids[(values <= floor * lam_max) | (lam_max <= 0)] = -1
    labels = torch.empty_like(ids)
    labels[order] = ids
    return labels


def power_law_fit(
    a: Tensor,
    b: Tensor,
    *,
    floor: float = 1e-6,
    n_bootstrap: int = 200,
    generator: torch.Generator | None = None,
    eig: tuple[Tensor, Tensor] | None = None,
) -> PowerLawFit:
    """Fit the PAH exponent κ in ``A ∝ B^κ`` (theory §4).

    With ``B = V Λ Vᵀ`` and ``a_i = v_iᵀ A v_i``, fit ``log a_i = κ log λ_i + c`` over eigenvalues
    ``λ_i > floor · λ_max`` with ``a_i > 0``. The interval is a 95% percentile bootstrap over the
    fitted points. Symmetric inputs are assumed (they are symmetrised).

    The off-diagonal mass ``‖VᵀAV − blockdiag(VᵀAV)‖_F / ‖A‖_F`` takes the blocks over B's eigenspaces:
    for distinct eigenvalues it is the mass off the diagonal; within a degenerate eigenspace (and in
    B's numerical null space, ``λ ≤ floor · λ_max``) the basis is arbitrary, so A's block there is not
    counted. This makes it basis-independent, e.g. for ``Z_b = WWᵀ`` of an expanding layer.

    Args:
        a, b: symmetric ``(d, d)`` matrices.
        floor: relative eigenvalue floor (eigenvalues below ``floor · λ_max`` are dropped).
        n_bootstrap: bootstrap resamples (0 disables the interval: NaN bounds).
        generator: RNG for the bootstrap.
        eig: optional precomputed ``(λ, V)`` of ``b`` from ``torch.linalg.eigh``.

    Returns:
        :class:`PowerLawFit`; exponent, r2 and interval are NaN when fewer than 3 points survive or
        all surviving eigenvalues are equal (the slope is then undefined); R² is 1 when all fitted
        ``a_i`` are equal (the flat fit is exact). Bootstrap resamples that drew a single eigenvalue are
        dropped (they have no slope).
    """
    _check_fit_args(a, b, floor, n_bootstrap, eig)
    nan = float("nan")
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return PowerLawFit(nan, nan, nan, nan, nan, nan, 0)
    a64 = a.detach().double()
    a64 = 0.5 * (a64 + a64.T)
    lam, v = torch.linalg.eigh(0.5 * (b.detach().double() + b.detach().double().T)) if eig is None else (eig[0].double(), eig[1].double())
    rot = symmetric_product(v, a64 @ v)  # VᵀAV
    diag = torch.diagonal(rot)
    off = _off_diagonal_mass(rot, lam, floor, torch.linalg.matrix_norm(a64))
    keep = (lam > floor * lam.max()) & (lam > 0) & (diag > 0)
    n = int(keep.sum())
    if n < 3:
        return PowerLawFit(nan, nan, nan, nan, nan, off, n)
    x = torch.log(lam[keep])
    y = torch.log(diag[keep])
    if float(x.max() - x.min()) <= 1e-12:
        return PowerLawFit(nan, nan, nan, nan, nan, off, n)
    k, c = _ols(x, y)
    resid = y - (k * x + c)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    # all a_i equal (up to round-off): the flat fit κ = 0 is exact, R² = 1 by convention
    flat_y = float(y.max() - y.min()) <= 1e-12
    r2 = 1.0 if flat_y or ss_tot <= 0 else 1.0 - float((resid**2).sum()) / ss_tot
    lo, hi = _bootstrap_interval(x, y, n_bootstrap, generator)
    return PowerLawFit(float(k), float(c), r2, lo, hi, off, n)


def _check_fit_args(a: Tensor, b: Tensor, floor: float, n_bootstrap: int, eig: tuple[Tensor, Tensor] | None) -> None:
    _check_square("a", a)
    _check_square("b", b)
    if a.shape != b.shape:
        raise ValueError(f"Expected `a` and `b` to have the same shape, but got {tuple(a.shape)} and {tuple(b.shape)}")
    if not (isinstance(floor, (int, float)) and not isinstance(floor, bool) and 0 <= floor < 1):
        raise ValueError(f"Expected `floor` to be a float in [0, 1), but got {floor!r}")
    check_nonnegative_int("n_bootstrap", n_bootstrap)
    if eig is not None and not (
        isinstance(eig, tuple) and len(eig) == 2 and all(isinstance(t, Tensor) for t in eig)
        and eig[0].shape == (b.shape[0],) and eig[1].shape == b.shape
    ):
        raise ValueError(
            f"Expected `eig` to be the (eigenvalues ({b.shape[0]},), eigenvectors {tuple(b.shape)}) pair of "
            f"torch.linalg.eigh(b), but got {type(eig).__name__}"
        )


def _off_diagonal_mass(rot: Tensor, lam: Tensor, floor: float, a_norm: Tensor) -> float:
    """``‖VᵀAV − blockdiag(VᵀAV)‖_F / ‖A‖_F`` over B's eigenspaces (NaN for ``A = 0``)."""
    if not a_norm > 0:
        return float("nan")
    labels = _eigenspace_labels(lam, floor)
    outside = labels[:, None] != labels[None, :]
    return float(torch.linalg.matrix_norm(rot * outside) / a_norm)


def _bootstrap_interval(x: Tensor, y: Tensor, n_bootstrap: int, generator: torch.Generator | None) -> tuple[float, float]:
    """95% percentile interval of the OLS slope over ``n_bootstrap`` resamples of the points (NaN if none)."""
    if n_bootstrap == 0:
        return float("nan"), float("nan")
    n = x.shape[0]
    idx = torch.randint(0, n, (n_bootstrap, n), generator=generator)
    xb = x[idx]
    kb, _ = _ols(xb, y[idx])
    # a resample that drew a single eigenvalue has no slope (round-off would make one up)
    spread = xb.amax(-1) - xb.amin(-1)
    kb = kb[(spread > 1e-12) & torch.isfinite(kb)]
    if kb.numel() == 0:
        return float("nan"), float("nan")
    return float(torch.quantile(kb, 0.025)), float(torch.quantile(kb, 0.975))


def nc1(features: Tensor, labels: Tensor) -> float:
    """Neural-collapse NC1 ``Tr(Σ_W Σ_B⁺) / C`` (Papyan, Han & Donoho, 2020).

    ``Σ_W`` is the mean within-class covariance, ``Σ_B`` the covariance of the class means around
    the global mean, ``C`` the number of classes present. 0 at full collapse.

    Args:
        features: ``(n, d)`` representations.
        labels: ``(n,)`` integer class labels.
    """
    _check_rows("features", features)
    if not isinstance(labels, Tensor):
        raise TypeError(f"Expected `labels` to be a torch.Tensor, but got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"Expected `labels` to have shape ({features.shape[0]},), but got {tuple(labels.shape)}"
        )
    x = features.detach().double()
    classes = torch.unique(labels)
    if classes.numel() < 2:
        raise ValueError(f"Expected `labels` to contain at least 2 classes, but got {classes.numel()}")
    mu = x.mean(0)
    d = x.shape[1]
    sw = torch.zeros(d, d, dtype=torch.float64)
    sb = torch.zeros(d, d, dtype=torch.float64)
    for c in classes:
        xc = x[labels == c]
        mc = xc.mean(0)
        dc = xc - mc
        sw += dc.T @ dc / xc.shape[0]
        sb += torch.outer(mc - mu, mc - mu)
    sw /= classes.numel()
    sb /= classes.numel()
    return float(torch.trace(sw @ torch.linalg.pinv(sb, hermitian=True)) / classes.numel())


def invariance_score(h_x: Tensor, h_tx: Tensor) -> float:
    """Invariance of a representation to a nuisance transform ``T`` (theory §6).

    ``E‖h(Tx) − h(x)‖² / E‖h(x) − h(x')‖²`` with ``x, x'`` independent samples; the denominator is
    computed exactly over all pairs as ``2 Tr Cov(h(x))`` (unbiased). 0 = perfectly invariant,
    about 1 = the transform moves a representation as far as swapping the input for another.
    """
    _check_rows("h_x", h_x)
    _check_rows("h_tx", h_tx)
    if h_x.shape != h_tx.shape:
        raise ValueError(f"Expected `h_x` and `h_tx` to have the same shape, but got {tuple(h_x.shape)} and {tuple(h_tx.shape)}")
    if h_x.shape[0] < 2:
        raise ValueError("Expected at least 2 samples for the invariance score")
    a = h_x.detach().double()
    b = h_tx.detach().double()
    num = ((b - a) ** 2).sum(1).mean()
    den = 2.0 * a.var(0, unbiased=True).sum()
    return float(num / den) if den > 0 else float("nan")


@dataclass(frozen=True)
class BalanceTerms:
    """Trace form of the three forces on the weight Gram matrices (theory §5), per unit learning rate.

    From ``W⁺ = W + η(M − γW)`` with ``M`` the negative batch gradient,
    ``Tr E[Δ(WᵀW)]/η = drift + noise + signal − decay`` where

        decay  = γ(2 − ηγ) ‖W‖_F²
        drift  = 2(1 − ηγ) E⟨g_a, h_a⟩            (= 2(1 − ηγ) E⟨g_b, W h_a⟩)
        noise  = (η/S) E[‖g_b‖² ‖h_a‖²]            (per-sample weight-gradient norm, /S)
        signal = η (1 − 1/S) ‖E[g_b h_aᵀ]‖_F²      (squared mean gradient; NaN when not tracked)

    The traces of ``Δ(WᵀW)`` and ``Δ(WWᵀ)`` are equal, so one set of scalars serves both sides.
    ``noise_share = noise / decay``. Rows are treated as samples (exact for Linear layers on 2-D
    inputs; for convolutions and sequences each position counts as one sample).
    """

    decay: float
    drift: float
    noise: float
    signal: float
    noise_share: float
    lr: float
    weight_decay: float
    batch_size: int

    @property
    def rho(self) -> float:
        """``ρ = η / (γ S)``: noise (large ρ) against decay (small ρ); inf without weight decay."""
        return self.lr / (self.weight_decay * self.batch_size) if self.weight_decay > 0 else math.inf

    def to_dict(self) -> dict[str, float]:
        return {
            "decay": self.decay,
            "drift": self.drift,
            "noise": self.noise,
            "signal": self.signal,
            "noise_share": self.noise_share,
            "rho": self.rho,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "batch_size": self.batch_size,
        }


def balance_terms(
    weight_sq_norm: float,
    mean_ga_ha: float,
    mean_gnorm2_hnorm2: float,
    *,
    lr: float,
    weight_decay: float,
    batch_size: int,
    mean_gradient_sq_norm: float = 0.0,
) -> BalanceTerms:
    """Balance terms of theory §5 from per-sample means (see :class:`BalanceTerms`).

    Args:
        weight_sq_norm: ``‖W‖_F²``.
        mean_ga_ha: ``E⟨g_a, h_a⟩`` with ``g = −dℓ/dh`` per sample.
        mean_gnorm2_hnorm2: ``E[‖g_b‖² ‖h_a‖²]``.
        lr, weight_decay, batch_size: η, γ, S of the SGD step.
        mean_gradient_sq_norm: ``‖E[g_b h_aᵀ]‖_F²`` (optional; pass NaN when it was not measured —
            :class:`~canonreg.CRHMonitor` does not track it, since it costs one more matmul per step).
    """
    check_positive("lr", lr)
    check_nonnegative("weight_decay", weight_decay)
    check_positive_int("batch_size", batch_size)
    eta, gamma, s = float(lr), float(weight_decay), int(batch_size)
    decay = gamma * (2.0 - eta * gamma) * weight_sq_norm
    drift = 2.0 * (1.0 - eta * gamma) * mean_ga_ha
    noise = eta / s * mean_gnorm2_hnorm2
    signal = eta * (1.0 - 1.0 / s) * mean_gradient_sq_norm
    share = noise / decay if decay > 0 else math.inf
    return BalanceTerms(decay, drift, noise, signal, share, eta, gamma, s)
