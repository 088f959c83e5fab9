"""Summaries over seeds: rows of mean and 95% Student-t interval per grid cell, as Markdown and CSV."""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..experiment import TrialConfig, scalar_metrics
from ..stats import Interval, mean_ci
from .plots import plot_metric
from .spec import AblationSpec, _config_value, _show


def summarize(records: Sequence[Mapping[str, Any]], factors: Sequence[str], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Group finished runs by ``factors`` and reduce every metric over the group (the seeds).

    Returns one dict per group, in first-appearance order: the factor values, ``"n"`` (runs) and
    ``metric -> Interval`` (:func:`mean_ci` of :func:`~canonreg.experiment.scalar_metrics`).
    """
    groups: dict[tuple[Any, ...], list[dict[str, float]]] = {}
    for rec in records:
        key = tuple(_config_value(rec, f) for f in factors)
        groups.setdefault(key, []).append(scalar_metrics(rec["result"]))
    rows = []
    for key, ms in groups.items():
        row: dict[str, Any] = dict(zip(factors, key))
        row["n"] = len(ms)
        for m in metrics:
            row[m] = mean_ci([x.get(m, math.nan) for x in ms])
        rows.append(row)
    return rows


def _fmt_interval(iv: Interval, runs: int) -> str:
    if iv.n == 0:
        return "—"
    cell = f"{iv.mean:.4g}" if iv.n == 1 else f"{iv.mean:.4g} ± {iv.half_width:.2g}"
    return cell if iv.n == runs else f"{cell} (n={iv.n})"


def summary_markdown(rows: Sequence[Mapping[str, Any]], factors: Sequence[str], metrics: Sequence[str], *, title: str = "") -> str:
    """A Markdown table: factors, runs, then ``mean ± half-width`` of each metric (``(n=k)`` when some seeds gave no value)."""
    head = [*factors, "runs", *metrics]
    lines = []
    if title:
        lines += [title, ""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" if i < len(factors) else "---:" for i in range(len(head))) + "|")
    for r in rows:
        cells = [_show(r[f]) for f in factors] + [str(r["n"])] + [_fmt_interval(r[m], r["n"]) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_csv(rows: Sequence[Mapping[str, Any]], factors: Sequence[str], metrics: Sequence[str]) -> str:
    """CSV text: factors, ``runs``, then ``<metric>_mean, _ci_low, _ci_high, _n`` per metric (full precision)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*factors, "runs", *(f"{m}_{s}" for m in metrics for s in ("mean", "ci_low", "ci_high", "n"))])
    for r in rows:
        vals: list[Any] = [_csv_value(r[f]) for f in factors] + [r["n"]]
        for m in metrics:
            iv: Interval = r[m]
            vals += [repr(iv.mean), repr(iv.low), repr(iv.high), iv.n]
        w.writerow(vals)
    return buf.getvalue()


def _csv_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "+".join(map(str, v))
    return repr(v) if isinstance(v, float) else str(v)


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)

def write_summaries(
    spec: AblationSpec,
    configs: Sequence[TrialConfig],
    records: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    plots: bool = True,
) -> tuple[list[dict[str, Any]], str, list[Path]]:
    """Write ``summary.md``, ``summary.csv`` and the figures of finished ``records`` of ``spec``'s grid.

    Rows group the runs by every varying grid factor except ``seed``. Returns ``(rows, markdown,
    figure paths)``; figures are skipped with a warning when matplotlib is missing.
    """
    out_dir = Path(out_dir)
    varying = spec.varying(configs)
    factors = [f for f in varying if f != "seed"]
    summary = summarize(records, factors, spec.metrics)
    markdown = summary_markdown(summary, factors, spec.metrics, title=_title(spec, configs, varying))
    (out_dir / "summary.md").write_text(markdown + "\n", encoding="utf-8")
    (out_dir / "summary.csv").write_text(summary_csv(summary, factors, spec.metrics), encoding="utf-8")
    written: list[Path] = []
    if plots and records:
        try:
            for p in spec.plot_specs(configs):
                path = out_dir / "plots" / f"{_slug(p.metric)}_vs_{p.factor}.png"
                plot_metric(records, p.metric, p.factor, path, series=[f for f in factors if f not in (p.factor, "arm")])
                written.append(path)
        except ImportError as e:
            warnings.warn(f"Figures skipped: {e}", RuntimeWarning, stacklevel=2)
    return summary, markdown, written


def _title(spec: AblationSpec, configs: Sequence[TrialConfig], varying: Sequence[str]) -> str:
    seeds = sorted({c.seed for c in configs})
    first = configs[0]
    names = ("dataset", "model", "width", "depth", "optimizer", "lr", "batch_size", "steps")
    shared = {f: getattr(first, f) for f in names if f not in varying}
    shown = ", ".join(f"{k}={_show(v)}" for k, v in shared.items())
    return (
        f"Ablation `{spec.name}`: {len(configs)} runs; {shown}; seeds {seeds}. "
        f"Cells: mean ± 95% t-interval half-width over seeds (n = finite values)."
    )

