"""Sketched alignment: the six CRH scores of wide layers from ``d × k`` sketches of the moments.

:class:`~canonreg.CRHMonitor` with ``sketch=k`` keeps, per layer side (``a``: the ``d_a`` input side,
``b``: the ``d_b`` output side), a fixed probe ``P = [Ω, 1]`` (``d × (k + 1)``) and, for each streamed
moment ``M`` (``H``, ``G``), the product ``M P`` instead of ``M``: per collected step ``2·n·d·(k + 1)``
multiply-adds per moment (instead of the ``n·d²/2`` of a symmetric Gram) and ``d·(k + 1)`` float64
entries of state (instead of ``d²``).

``Ω = sqrt(d/k) Q`` with ``Q`` the orthonormal columns of a seeded Gaussian ``d × k`` matrix (uniform on the
Stiefel manifold, so ``E[Ω Ωᵀ] = I``); for ``k ≥ d``, ``Ω = I`` and every estimate below is exact. The
``1`` column gives ``M 1`` exactly, hence the mean entry ``m̄ = 1ᵀM1/d²``. Against the exact
monitor's ``n·d²/2`` per Gram (and its identities, which save two of the four moments in raw/centered
mode), the sketch pays for widths above about ``4(k + 1)``.

Estimates (theory §3). Pearson's α of two ``d × d`` matrices is the cosine of their entry-centred
versions ``A_c = A − Ā 11ᵀ``; with ``A_c Ω = AΩ − Ā 1(1ᵀΩ)`` computed exactly from the sketch,

    α̂(A, B) = ⟨A_c Ω, B_c Ω⟩ / (‖A_c Ω‖_F ‖B_c Ω‖_F)

(``cosine``: the same without centring). Each of the three Frobenius products is an unbiased
(Hutchinson-type, orthogonal probes) estimate of ``tr(A_c B_c)``, ``‖A_c‖²``, ``‖B_c‖²``; α̂ itself is
a ratio (slightly biased, in [−1, 1] by Cauchy–Schwarz) and exact when ``k ≥ d``. ``Z_a = WᵀW`` and
``Z_b = WWᵀ`` enter as ``Wᵀ(WΩ)``, ``W(WᵀΩ)`` at ``compute()`` time (``2·d_a·d_b·(k + 1)``), so all six
relations are estimated: f-RGA, f-GWA, f-RWA from ``(H_a Ω, G_a Ω, Z_a Ω)``, the b-relations likewise
with ``Ω_b``. The error shrinks like ``1/sqrt(k)`` (times ``sqrt(1 − k/d)``). Measured on a trained MLP
40 → 1024 ×4 → 10 (``benchmarks/monitor_overhead.py --sketch-error``,
``benchmarks/results/monitor_sketch_error.json``; 3 probe seeds, 5 layers × 6 relations each):
``max |α̂ − α|`` 0.065 / 0.042 / 0.026 / 0.019 / 0.010 at ``k`` = 32 / 64 / 128 / 256 / 512 (raw), and
at most 0.042 / 0.028 / 0.021 / 0.014 / 0.009 (centered, normalized); mean errors are 4–7× smaller.

Not estimated (they need the full matrices): the matrices themselves, PAH exponents (eigenvectors of
``Z``) and effective ranks; ``compute()`` of a sketched monitor raises for them.

Reference: Hutchinson (1989), Martinsson & Tropp, "Randomized numerical linear algebra" (2020), §4–§5;
the alignments are those of Ziyin, Chuang, Galanti & Poggio, arXiv:2410.03006.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from . import functional as F

__all__ = ["probe", "sketched_alignments"]


def probe(d: int, k: int, generator: torch.Generator) -> Tensor:
    """The float64 probe ``P = [Ω, 1]`` (``d × (min(k, d) + 1)``) of one layer side (see the module docstring)."""
    if k >= d:
        omega = torch.eye(d, dtype=torch.float64)
    else:
        q, _ = torch.linalg.qr(torch.randn(d, k, dtype=torch.float64, generator=generator))
        omega = q * math.sqrt(d / k)
    return torch.cat([omega, torch.ones(d, 1, dtype=torch.float64)], dim=1)


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
                x = x - mean * ones_omega.unsqueeze(0)  # (M − m̄ 11ᵀ)Ω
            cent[m] = x
        for i, pa in enumerate(names):
            for pb in names[i + 1 :]:
                scores[(pa, pb)] = scores[(pb, pa)] = _score(cent[pa], cent[pb])
    return {rel: scores[pair] for rel, pair in F.RELATION_PAIRS.items()}


def weight_sketches(weight: Tensor, probes: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``Z_a P_a = Wᵀ(W P_a)`` and ``Z_b P_b = W(Wᵀ P_b)`` in float64 (``2·d_a·d_b·(k + 1)`` each)."""
    w = weight.to(torch.float64)
    return {"Z_a": w.T @ (w @ probes["a"].to(w.device)), "Z_b": w @ (w.T @ probes["b"].to(w.device))}
