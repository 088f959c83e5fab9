"""Figures: a metric's mean and 95% t-interval over seeds against one grid factor, one line per arm."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..experiment import TrialConfig, scalar_metrics
from ..stats import Interval, mean_ci
from .spec import ARM_COLORS, _acts, _check_metric, _config_value, _is_number, _show


def plot_metric(
    records: Sequence[Mapping[str, Any]],
    metric: str,
    factor: str,
    path: str | Path | None = None,
    *,
    series: Sequence[str] = (),
    ax: Any = None,
) -> Any:
    """``metric`` (mean with 95% t-interval error bars over seeds) against ``factor``, one line per arm.

    ``series``: further factors that split the lines (one line per arm × combination). An arm in
    which ``factor`` does not act (e.g. ``noise`` for the baseline) is drawn as a horizontal line
    with a shaded interval across the x range. Numeric factors spanning a decade or more on the
    positive axis get a log x axis; non-numeric ones are categorical.

    Returns the matplotlib Figure (saved to ``path`` when given). Needs matplotlib.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("Plots need matplotlib: pip install 'canonreg[recipes]'") from e
    _check_plot_args(records, metric, factor, series)
    xs_all = sorted({_config_value(r, factor) for r in records if _acts(TrialConfig.from_dict(r["config"]), factor)}, key=_sort_key)
    numeric = all(_is_number(x) for x in xs_all)
    pos = {x: (float(x) if numeric else float(i)) for i, x in enumerate(xs_all)}
    lines, constant = _group_lines(records, metric, factor, series)
    fig = Figure(figsize=(6.4, 4.2)) if ax is None else ax.figure
    ax = fig.add_subplot(1, 1, 1) if ax is None else ax
    x_range = (min(pos.values()), max(pos.values())) if pos else (0.0, 1.0)
    log_x = numeric and bool(xs_all) and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 10
    varied = [k for k in lines if k not in constant]
    for key, by_x in lines.items():
        label = " ".join([key[0], *(f"{s}={_show(v)}" for s, v in zip(series, key[1:]))])
        color = ARM_COLORS.get(key[0]) if not series else None
        if key in constant:
            _draw_constant(ax, mean_ci(by_x[None]), x_range, color, f"{label} ({factor} n/a)")
        else:
            _draw_series(ax, by_x, pos, log_x, varied.index(key) - (len(varied) - 1) / 2, color, label)
    if log_x:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks([pos[x] for x in xs_all], [_show(x) for x in xs_all])
    seeds = sorted({r["config"]["seed"] for r in records})
    ax.set(xlabel=factor, ylabel=metric)
    ax.set_title(f"{metric} vs {factor} (mean ± 95% t-interval over seeds {seeds})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if path is not None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(p, dpi=120)
    return fig


def _check_plot_args(records: Sequence[Mapping[str, Any]], metric: str, factor: str, series: Sequence[str]) -> None:
    _check_metric("metric", metric)
    if not records:
        raise ValueError("Expected at least one finished run to plot, but got none")
    if factor not in records[0]["config"] or factor in ("arm", "seed"):
        raise ValueError(f"Expected `factor` to be a TrialConfig field other than 'arm' and 'seed', but got {factor!r}")
    for s in series:
        if s not in records[0]["config"] or s in ("arm", "seed", factor):
            raise ValueError(f"Expected `series` to name TrialConfig fields other than 'arm', 'seed' and {factor!r}, but got {s!r}")


Line = tuple[Any, ...]


def _group_lines(
    records: Sequence[Mapping[str, Any]], metric: str, factor: str, series: Sequence[str]
) -> tuple[dict[Line, dict[Any, list[float]]], set[Line]]:
    """``({(arm, *series values): {factor value: [metric per seed]}}, lines where factor does not act)``.

    A line in which ``factor`` does not act keeps its values under the key ``None``.
    """
    lines: dict[Line, dict[Any, list[float]]] = {}
    constant: set[Line] = set()
    for r in records:
        cfg = TrialConfig.from_dict(r["config"])
        key = (cfg.arm, *(_config_value(r, s) for s in series))
        value = scalar_metrics(r["result"]).get(metric, math.nan)
        acts = _acts(cfg, factor)
        if not acts:
            constant.add(key)
        lines.setdefault(key, {}).setdefault(_config_value(r, factor) if acts else None, []).append(value)
    return lines, constant


def _draw_constant(ax: Any, iv: Interval, x_range: tuple[float, float], color: str | None, label: str) -> None:
    """A dashed horizontal line at the mean across the x range, its interval shaded."""
    (ln,) = ax.plot(list(x_range), [iv.mean, iv.mean], linestyle="--", color=color, label=label)
    if iv.n > 1:
        ax.fill_between(list(x_range), [iv.low] * 2, [iv.high] * 2, color=ln.get_color(), alpha=0.15)


def _draw_series(ax: Any, by_x: Mapping[Any, list[float]], pos: Mapping[Any, float], log_x: bool, k: float, color: str | None, label: str) -> None:
    """Means with interval error bars, dodged sideways by ``k`` steps (2% of a decade on a log axis, of the
    smallest gap otherwise) so that the error bars of neighbouring series do not hide each other."""
    xs = sorted(by_x, key=_sort_key)
    ivs = [mean_ci(by_x[x]) for x in xs]
    if log_x:
        px = [pos[x] * 10 ** (0.02 * k) for x in xs]
    else:
        ordered = sorted(pos.values())
        gap = min((b - a for a, b in zip(ordered, ordered[1:])), default=1.0)
        px = [pos[x] + 0.02 * gap * k for x in xs]
    err = [iv.half_width if iv.n > 1 else 0.0 for iv in ivs]
    ax.errorbar(px, [iv.mean for iv in ivs], yerr=err, marker="o", capsize=3, color=color, label=label)


def _sort_key(v: Any) -> tuple[int, float, str]:
    return (0, float(v), "") if _is_number(v) else (1, 0.0, str(v))
