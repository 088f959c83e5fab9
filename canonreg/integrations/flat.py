"""A :class:`~canonreg.CRHReport` as a flat ``{key: float}`` dict for experiment trackers.

Keys are ``/``-separated paths over the characters ``[A-Za-z0-9_./-]`` only:

    {prefix}/alpha/{layer}/{relation}          α of one relation of one layer
    {prefix}/alpha_mean/all                    mean α over layers and relations (NaN entries ignored)
    {prefix}/alpha_mean/{relation}             mean α of one relation over layers
    {prefix}/alpha_min/all                     min α over layers and relations (NaN if any is NaN)
    {prefix}/samples/{layer}                   sample rows the layer's moments hold
    {prefix}/kappa/{layer}/{relation}          PAH exponent κ (only when the report has fits)
    {prefix}/kappa_r2/{layer}/{relation}       R² of that fit
    {prefix}/rank/{layer}/{matrix}_{kind}      effective ranks (participation, entropy) when present
    {prefix}/balance/{layer}/{term}            decay, drift, noise, signal, noise_share when present

``layer`` is the qualified module name (``"root"`` for the model itself) with every character outside
``[A-Za-z0-9_.-]`` replaced by ``_``. So that every tracker accepts them:

* MLflow rejects names outside ``[\\w/.\\- ]`` and names that ``normpath`` changes (``//``, ``..``, a
  leading ``/``), and its file store keeps a metric as a file at its key's path, so no key may be
  a path prefix of another (``crh/alpha_mean`` beside ``crh/alpha_mean/f-RGA`` would fail): the
  keys above are prefix-free.
* TensorBoard replaces characters outside ``[-/\\w.]``; none occur.
* W&B accepts any of them and groups panels by the part before the first ``/``. (Its UI sorts and
  filters only identifier-like names ``[_a-zA-Z][_a-zA-Z0-9]*``; the logged values are unaffected.)

Values are Python floats; an undefined α stays NaN (the report's ``nan_reasons`` say why).
"""

from __future__ import annotations

import math
import re

from ..report import CRHReport

__all__ = ["flat_metrics", "metric_key"]

_SEGMENT_BAD = re.compile(r"[^A-Za-z0-9_.\-]")
_PREFIX_OK = re.compile(r"^[A-Za-z0-9_\-]+(?:[./][A-Za-z0-9_\-]+)*$")


def metric_key(*segments: str) -> str:
    """Join ``segments`` with ``/`` after replacing characters outside ``[A-Za-z0-9_.-]`` by ``_``.

    An empty segment becomes ``root``; a segment made only of dots (``.``, ``..``) becomes ``_``,
    so ``normpath`` leaves the key unchanged.

    Example:
        >>> metric_key("crh", "alpha", "blocks.0.attn<q>", "f-RGA")
        'crh/alpha/blocks.0.attn_q_/f-RGA'
    """
    out = []
    for s in segments:
        s = _SEGMENT_BAD.sub("_", str(s)) if s else "root"
        out.append("_" if set(s) <= {"."} else s)
    return "/".join(out)


def flat_metrics(report: CRHReport, prefix: str = "crh") -> dict[str, float]:
    """The scalars of ``report`` as ``{key: float}`` (keys: see :mod:`canonreg.integrations.flat`).

    Args:
        report: what :meth:`~canonreg.CRHMonitor.compute` or :func:`~canonreg.measure_crh` returned.
        prefix: first key segment(s): letters, digits, ``_`` and ``-``, optionally joined by ``/`` or
            ``.`` (e.g. ``"crh"``, ``"train/crh"``).

    Returns:
        A new dict; layers whose sanitised names collide get ``_2``, ``_3``… appended in report order.

    Raises:
        TypeError: ``report`` is not a :class:`~canonreg.CRHReport`.
        ValueError: ``prefix`` is empty or has other characters.

    Example:
        >>> metrics = flat_metrics(monitor.compute(exponents=False))  # doctest: +SKIP
        >>> mlflow.log_metrics(metrics, step=step); wandb.log(metrics, step=step)  # doctest: +SKIP
    """
    if not isinstance(report, CRHReport):
        raise TypeError(f"Expected `report` to be a CRHReport, but got {type(report).__name__}")
    if not isinstance(prefix, str) or not _PREFIX_OK.match(prefix):
        raise ValueError(
            "Expected `prefix` to be segments of [A-Za-z0-9_-] joined by '/' or '.' (e.g. 'crh' or 'train/crh'), "
            f"but got {prefix!r}"
        )
    names: dict[str, str] = {}
    used: set[str] = set()
    for layer in report.layers:
        base = metric_key(layer)
        seg, k = base, 1
        while seg in used:
            k += 1
            seg = f"{base}_{k}"
        used.add(seg)
        names[layer] = seg

    out: dict[str, float] = {}
    relations: list[str] = []
    for layer in report.layers:
        for rel in report.alignment[layer]:
            if rel not in relations:
                relations.append(rel)
    values = [float(v) for a in report.alignment.values() for v in a.values()]
    finite = [v for v in values if not math.isnan(v)]
    out[f"{prefix}/alpha_mean/all"] = sum(finite) / len(finite) if finite else math.nan
    out[f"{prefix}/alpha_min/all"] = math.nan if (not values or len(finite) < len(values)) else min(values)
    for rel in relations:
        vals = [float(a[rel]) for a in report.alignment.values() if rel in a and not math.isnan(float(a[rel]))]
        out[f"{prefix}/alpha_mean/{metric_key(rel)}"] = sum(vals) / len(vals) if vals else math.nan
    for layer, seg in names.items():
        for rel, value in report.alignment[layer].items():
            out[f"{prefix}/alpha/{seg}/{metric_key(rel)}"] = float(value)
        if layer in report.samples:
            out[f"{prefix}/samples/{seg}"] = float(report.samples[layer])
        for rel, fit in report.exponents.get(layer, {}).items():
            out[f"{prefix}/kappa/{seg}/{metric_key(rel)}"] = float(fit.exponent)
            out[f"{prefix}/kappa_r2/{seg}/{metric_key(rel)}"] = float(fit.r2)
        for matrix, kinds in report.effective_rank.get(layer, {}).items():
            for kind, value in kinds.items():
                out[f"{prefix}/rank/{seg}/{metric_key(f'{matrix}_{kind}')}"] = float(value)
        terms = report.balance.get(layer)
        if terms is not None:
            for term in ("decay", "drift", "noise", "signal", "noise_share"):
                out[f"{prefix}/balance/{seg}/{term}"] = float(getattr(terms, term))
    return out

