"""Matplotlib figures for reports (optional dependency: ``pip install canonreg[recipes]``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .functional import RELATION_PAIRS, RELATIONS
from .layers import _display

if TYPE_CHECKING:  # pragma: no cover
    from .report import CRHReport

__all__ = ["plot_alignment_heatmap", "plot_pair", "plot_report", "plot_history", "plot_comparison"]


def _plt() -> Any:
    try:
        import matplotlib

        if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo") and not _has_display():
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("Plotting needs matplotlib: pip install 'canonreg[recipes]'") from e
    return plt


def _has_display() -> bool:
    import os

    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def plot_alignment_heatmap(report: CRHReport, ax: Any = None) -> Any:
    """Layers × relations heatmap of α (NaN cells are hatched grey), annotated with values."""
    plt = _plt()
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 0.5 * len(report.layers) + 1.5))
    data = [[report.alignment[n][r] for r in RELATIONS] for n in report.layers]
    vmin = -1.0 if report.metric == "pearson" else 0.0
    im = ax.imshow(data, vmin=vmin, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(RELATIONS)), RELATIONS)
    ax.set_yticks(range(len(report.layers)), [_display(n) for n in report.layers])
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            text = "nan" if math.isnan(v) else f"{v:.2f}"
            ax.text(j, i, text, ha="center", va="center", color="white" if not math.isnan(v) and v < 0.6 else "black", fontsize=8)
    ax.set_title(f"CRH alignment ({report.metric}, {report.preprocess})")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="α")
    return ax


def plot_pair(report: CRHReport, layer: str, relation: str, ax: Any = None, *, floor: float | None = None) -> Any:
    """Eigen-scatter of a relation ``A ∝ B^κ``: ``log λ_i(B)`` against ``log v_iᵀ A v_i`` with the PAH fit.

    The points are the ones the fit used (``floor`` None: the report's fit's ``n_points`` largest eigenvalues with
    ``v_iᵀ A v_i > 0``, i.e. its own floor; without a fit ``1e-6``); a float ``floor`` keeps ``λ_i > floor·λ_max``.
    A layer whose matrices the report does not hold (``CRHMonitor(sketch=k)``) or are not finite gets a note.
    """
    if relation not in RELATION_PAIRS:
        raise ValueError(f"Expected `relation` to be one of {list(RELATIONS)}, but got {relation!r}")
    plt = _plt()
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4))
    a_name, b_name = RELATION_PAIRS[relation]
    try:
        mats = report.matrices(layer)
    except KeyError:
        if layer not in report.layers:
            raise
        return _note(ax, f"{_display(layer)}: {relation}", "no matrices in this report (CRHMonitor(sketch=k) keeps sketches)")
    if not all(bool(torch.isfinite(mats[m]).all()) for m in (a_name, b_name)):
        return _note(ax, f"{_display(layer)}: {relation}", f"{a_name} or {b_name} is not finite: no spectrum to draw")
    lam, v = torch.linalg.eigh(mats[b_name])
    a_i = (v * (mats[a_name] @ v)).sum(0)  # diag(VᵀAV) with one matmul
    fit = report.exponents.get(layer, {}).get(relation)
    if floor is None and fit is not None and fit.n_points > 0:
        usable = ((lam > 0) & (a_i > 0)).nonzero().reshape(-1)
        top = usable[torch.argsort(lam[usable], descending=True)[: fit.n_points]]
        keep = torch.zeros_like(lam, dtype=torch.bool)
        keep[top] = True
    else:
        keep = (lam > (1e-6 if floor is None else floor) * lam.max()) & (a_i > 0)
    x = torch.log10(lam[keep]).numpy()
    y = torch.log10(a_i[keep]).numpy()
    ax.scatter(x, y, s=8, alpha=0.7)
    if fit is not None and not math.isnan(fit.exponent) and len(x) > 1:
        xs = [float(x.min()), float(x.max())]
        # intercept is in natural logs: log10 a = κ log10 λ + c / ln 10
        ys = [fit.exponent * t + fit.intercept / math.log(10) for t in xs]
        ax.plot(xs, ys, "r-", label=f"κ = {fit.exponent:.2f} [{fit.ci_low:.2f}, {fit.ci_high:.2f}], R² = {fit.r2:.2f}")
        ax.legend(fontsize=8)
    ax.set_xlabel(f"log10 eigenvalue of {b_name}")
    ax.set_ylabel(f"log10 vᵀ {a_name} v (v: eigenvectors of {b_name})")
    ax.set_title(f"{_display(layer)}: {relation} (α = {report.alignment[layer][relation]:.2f})")
    return ax


def _note(ax: Any, title: str, text: str) -> Any:
    """An axis with a title and a centred note instead of a plot."""
    ax.set_title(title)
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9, transform=ax.transAxes)
    ax.set_axis_off()
    return ax


def plot_report(report: CRHReport, path: str | Path | None = None, *, pair: tuple[str, str] | None = None) -> Any:
    """Heatmap plus one eigen-scatter (default: the last layer's ``f-RWA``); saved to ``path`` if given."""
    plt = _plt()
    if pair is None:
        pair = (report.layers[-1], "f-RWA")
    fig, axes = plt.subplots(1, 2, figsize=(12, max(3.5, 0.45 * len(report.layers) + 1.8)), gridspec_kw={"width_ratios": [1.5, 1]})
    plot_alignment_heatmap(report, axes[0])
    plot_pair(report, pair[0], pair[1], axes[1])
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_history(steps: list[int], history: dict[str, list[float]], ax: Any = None, *, ylabel: str = "mean α") -> Any:
    """Line plot of one scalar per series (e.g. mean α per layer) against training steps."""
    plt = _plt()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    for name, ys in history.items():
        ax.plot(steps[: len(ys)], ys, label=_display(name))
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    return ax


def plot_comparison(
    reports: Mapping[str, CRHReport],
    path: str | Path | None = None,
    *,
    history: Mapping[str, Sequence[Mapping[str, float]]] | None = None,
    suptitle: str | None = None,
) -> Any:
    """Two reports compared in a 2 × 2 figure: α heatmaps of each, their difference, α during training.

    ``reports`` holds exactly two reports over the same layers, reference first (e.g.
    ``{"baseline": r0, "crh": r1}``). Panels: the reference's layers × relations heatmap, the other's,
    the difference ``α_other − α_reference`` (diverging colours, symmetric scale, annotated) and, with
    ``history`` (``{name: [{"step", "min_alpha_inner", "mean_alpha_post"}, …]}`` as
    :func:`canonreg.experiment.train_trial` records with ``track_crh=True``), the task-only min α over
    the inner layers (solid) and mean α (dashed) against the step, per report.

    Returns the figure; saves it to ``path`` when given. Needs matplotlib.

    Raises:
        ValueError: not two reports, or reports over different layers.
    """
    if len(reports) != 2:
        raise ValueError(f"Expected `reports` to hold exactly two reports (reference first), but got {len(reports)}")
    (name_a, a), (name_b, b) = reports.items()
    if list(a.layers) != list(b.layers):
        raise ValueError(f"Expected two reports over the same layers, but got {a.layers} and {b.layers}")
    plt = _plt()
    height = max(3.4, 0.45 * len(a.layers) + 1.8)
    fig, grid = plt.subplots(2, 2, figsize=(13, 2 * height))
    axes = list(grid.flat)
    n_layers = len(a.layers)
    labels = [
        f"{_display(n)} ({'first' if i == 0 else 'head' if i == n_layers - 1 else 'inner'})" for i, n in enumerate(a.layers)
    ]
    plot_alignment_heatmap(a, axes[0])
    axes[0].set_title(f"{name_a}: α ({a.metric}, {a.preprocess})")
    plot_alignment_heatmap(b, axes[1])
    axes[1].set_title(f"{name_b}: α ({b.metric}, {b.preprocess})")
    diff = [[float(b.alignment[n][r]) - float(a.alignment[n][r]) for r in RELATIONS] for n in a.layers]
    finite = [abs(v) for row in diff for v in row if not math.isnan(v)]
    scale = max([0.05, *finite])
    ax = axes[2]
    im = ax.imshow(diff, vmin=-scale, vmax=scale, cmap="RdBu", aspect="auto")
    ax.set_xticks(range(len(RELATIONS)), RELATIONS)
    for i, row in enumerate(diff):
        for j, v in enumerate(row):
            text = "nan" if math.isnan(v) else f"{v:+.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if not math.isnan(v) and abs(v) > 0.6 * scale else "black")
    ax.set_title(f"difference {name_b} − {name_a}")
    for h in axes[:3]:
        h.set_yticks(range(n_layers), labels)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="Δα")
    if not history:
        axes[3].set_axis_off()
    else:
        ax = axes[3]
        for k, (name, hist) in enumerate(history.items()):
            steps = [h["step"] for h in hist]
            color = f"C{k}"
            for key, style, what in (("min_alpha_inner", "-", "min α, inner layers"), ("mean_alpha_post", "--", "mean α")):
                ys = [float(h.get(key, math.nan)) for h in hist]
                if any(not math.isnan(y) for y in ys):
                    ax.plot(steps, ys, style, color=color, marker="o", markersize=3, label=f"{name}: {what}")
        ax.set_xlabel("step")
        ax.set_ylabel("α (task gradient only, training set)")
        ax.set_title("during training")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
