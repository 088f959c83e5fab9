"""CRHReport: the immutable record a monitor's ``compute()`` returns, and how it is built."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from . import functional as F
from .errors import CanonRegError, check_choice
from .layers import _display
from .moments import _absmax, _pow2_scale, symmetric_from_upper
from .stats import jsonable

__all__ = ["CRHReport", "ReportInputs", "ReportOptions", "build_report", "layer_matrices"]

NanPolicy = Literal["warn", "omit", "propagate", "error"]


def layer_matrices(
    sums: Mapping[str, Tensor],
    weight: Tensor,
    bias: Tensor | None,
    *,
    preprocess: F.Preprocess,
    direct: bool,
    gram_dtype: torch.dtype = torch.float64,
) -> dict[str, Tensor]:
    """The six matrices of one layer from its float64 running sums.

    ``raw``/``centered`` without direct sums use the exact identities (theory §1)

        H_b = W H_a Wᵀ (+ W μ_a bᵀ + b μ_aᵀ Wᵀ + b bᵀ in raw mode with a bias),   G_a = Wᵀ G_b W,

    with ``μ_a = E[h_a]``; centred moments need no bias term (it cancels).

    Sums: ``X_xx = Σ(x − o)(x − o)ᵀ`` and ``X_x = Σ(x − o)`` over the ``n`` rows. Raw mode needs the
    origin ``o = 0``; in centred modes any origin gives the same covariance
    ``X_xx/n − (X_x/n)(X_x/n)ᵀ``, and :class:`~canonreg.CRHMonitor` passes sums about the mean
    (``X_x ≈ 0``), so that subtraction cancels nothing.

    Every matrix is exactly symmetric: moments are read from the upper triangle of their sums (the
    monitor computes only that) and mirrored, in the same blocked pass that divides by ``n``; the products ``WᵀW``, ``WWᵀ``, ``W H_a Wᵀ``, ``Wᵀ G_b W`` are
    formed on the upper block triangle and mirrored (:func:`~canonreg.functional.symmetric_product`:
    about half the flops of a full product). The sums are not modified.

    ``gram_dtype=torch.float32`` forms those four products (the ``O(d³)`` part) in float32 from
    operands scaled by powers of two (:func:`_product`); the results are float64.
    """
    n = float(sums["n"])
    if not n > 0:
        raise ValueError(f"Expected the sample count `n` to be positive, but got {n!r}")
    centered = preprocess != "raw"
    w = weight.to(torch.float64)

    def moment(key: str) -> Tensor:  # the moments of F.moment_from_sums, symmetrised
        return symmetric_from_upper(sums[f"{key}_xx"], 1.0 / n, sums[f"{key}_x"] / n if centered else None)

    h_a, g_b = moment("Ha"), moment("Gb")
    if direct:
        h_b, g_a = moment("Hb"), moment("Ga")
    else:
        h_b = _product(w.T, h_a, gram_dtype)  # W H_a Wᵀ
        if not centered and bias is not None:
            b = bias.to(torch.float64)
            wmu = w @ (sums["Ha_x"] / n)
            h_b = symmetric_from_upper(h_b.addr_(wmu, b).addr_(b, wmu).addr_(b, b))
        g_a = _product(w, g_b, gram_dtype)  # Wᵀ G_b W
    return {"H_a": h_a, "H_b": h_b, "G_a": g_a, "G_b": g_b, "Z_a": _product(w, None, gram_dtype), "Z_b": _product(w.T, None, gram_dtype)}


def _pow2(x: Tensor) -> float:
    """A power of two near ``max|x|`` (:func:`canonreg.moments._pow2_scale`; 1 for a zero or non-finite ``x``)."""
    top = _absmax(x)
    return float(_pow2_scale(top, top))


def _product(a: Tensor, m: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``aᵀ a`` (``m`` None) or ``aᵀ M a`` (``M`` symmetric), exactly symmetric, float64 (:func:`F.symmetric_product`).

    In float64 from the float64 operands; with ``dtype=torch.float32`` the operands are first scaled by
    powers of two ``1/s_a``, ``1/s_m`` (:func:`_pow2`; no float32 overflow or underflow of the entries'
    scale, and the float64 rescaling by ``s_a² s_m`` is exact), so the only difference is float32
    rounding in the products (relative error ~1e-7 of the result's scale).
    """
    if dtype == torch.float64:
        return F.symmetric_product(a, a if m is None else m @ a)
    sa = _pow2(a)
    a32 = (a / sa).to(dtype)
    if m is None:
        return F.symmetric_product(a32, a32).to(torch.float64).mul_(sa * sa)
    sm = _pow2(m)
    return F.symmetric_product(a32, (m / sm).to(dtype) @ a32).to(torch.float64).mul_(sa * sa * sm)


def _nan_reason(a_name: str, a: Tensor, b_name: str, b: Tensor, metric: str, samples: float, preprocess: str) -> str:
    """Why ``α(A, B)`` is NaN, naming the matrix at fault."""
    pairs = ((a_name, a), (b_name, b))
    nonfinite = [nm for nm, m in pairs if not bool(torch.isfinite(m).all())]
    if nonfinite:
        why = " (the layer's weights are not finite)" if any(nm.startswith("Z") for nm in nonfinite) else ""
        return f"{' and '.join(nonfinite)} {'has' if len(nonfinite) == 1 else 'have'} non-finite entries{why}"
    if preprocess != "raw" and samples < 2:
        return f"only {int(samples)} sample recorded: a covariance ({preprocess} mode) needs at least 2, so every H and G is zero"

    def degenerate(m: Tensor) -> bool:  # the rule F.alignment applies (a spread at the rounding level is none)
        if metric != "pearson":
            return bool(m.abs().max() == 0)
        return bool(F._is_flat(m - m.mean(), m))

    bad = [nm for nm, m in pairs if degenerate(m)]
    if bad:
        verb = "has" if len(bad) == 1 else "have"
        what = f"{verb} constant entries (zero spread)" if metric == "pearson" else f"{'is the zero matrix' if len(bad) == 1 else 'are each the zero matrix'}"
        return f"{' and '.join(bad)} {what}; alignment is undefined"
    return "non-finite statistics"


@dataclass(frozen=True)
class CRHReport:
    """What :meth:`CRHMonitor.compute` measured.

    Attributes:
        alignment: ``alignment[layer][relation]`` → α (float; NaN with a reason in ``nan_reasons``).
        exponents: ``exponents[layer][relation]`` → :class:`~canonreg.functional.PowerLawFit` of ``A ∝ B^κ``.
        effective_rank: ``effective_rank[layer][matrix]`` → ``{"participation": …, "entropy": …}``.
        balance: ``balance[layer]`` → :class:`~canonreg.functional.BalanceTerms` (empty unless η, γ, S given).
        samples, steps, skipped: per layer, the sample rows (summed over ranks), the committed layer calls
            (calls whose backward pass reached the layer; mean over ranks) and the calls dropped by the
            non-finite policy (this rank).
        preprocess, metric: how the scores were measured.
        derived: whether ``H_b`` and ``G_a`` came from the exact identities.
        missing, excluded: layers without samples / left out of the default selection, with reasons.
        timings: seconds spent in each part of ``compute()``: ``reduce`` (folding the accumulators and
            the cross-rank reduction), ``matrices`` (the six matrices per layer), ``alignment``,
            ``exponents`` and ``ranks`` (eigendecompositions; 0 when skipped), ``total``.

    ``effective_rank`` is empty (no layer has an entry) when ``compute(ranks=False)``; ``exponents`` is
    empty when ``compute(exponents=False)``.
    """

    alignment: dict[str, dict[str, float]]
    nan_reasons: dict[str, dict[str, str]]
    exponents: dict[str, dict[str, F.PowerLawFit]]
    effective_rank: dict[str, dict[str, dict[str, float]]]
    balance: dict[str, F.BalanceTerms]
    samples: dict[str, int]
    steps: dict[str, int]
    skipped: dict[str, int]
    preprocess: str
    metric: str
    derived: bool
    missing: dict[str, str] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)
    _matrices: dict[str, dict[str, Tensor]] = field(default_factory=dict, repr=False)
    timings: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def layers(self) -> list[str]:
        return list(self.alignment)

    def matrices(self, layer: str) -> dict[str, Tensor]:
        """The six float64 matrices ``H_a, H_b, G_a, G_b, Z_a, Z_b`` of ``layer`` (copies)."""
        if layer in self.layers and layer not in self._matrices:
            raise KeyError(
                f"The report holds no matrices for layer {layer!r}: a report of CRHMonitor(sketch=k) keeps none "
                "(d × (k + 1) sketches of the moments, not the d × d matrices), a trimmed one only those of "
                f"{sorted(self._matrices)}"
            )
        if layer not in self._matrices:
            raise KeyError(f"Expected `layer` to be one of {self.layers}, but got {layer!r}")
        return {k: v.clone() for k, v in self._matrices[layer].items()}

    def mean_alignment(
        self,
        layers: Sequence[str] | None = None,
        relations: Sequence[str] = F.RELATIONS,
        *,
        on_nan: NanPolicy = "warn",
    ) -> float:
        """Mean α over ``layers`` (default all) and ``relations``.

        A NaN α (undefined alignment, see ``nan_reasons``: zero matrices, a single sample, non-finite
        weights after a diverged step…) never enters the mean silently. ``on_nan``:

        * ``"warn"`` (default): average the finite entries and emit a RuntimeWarning that lists the
          left-out ``layer/relation`` entries with their reasons (NaN when none is finite);
        * ``"omit"``: the same, without the warning (an explicit choice);
        * ``"propagate"``: NaN as soon as one chosen entry is NaN;
        * ``"error"``: raise :class:`~canonreg.CanonRegError` naming the entries.

        Raises:
            ValueError: an unknown layer, relation or ``on_nan``; no layer or no relation.
        """
        check_choice("on_nan", on_nan, ("warn", "omit", "propagate", "error"))
        chosen = self.layers if layers is None else ([layers] if isinstance(layers, str) else list(layers))
        for n in chosen:
            if n not in self.alignment:
                raise ValueError(f"Expected `layers` to contain layers of this report {self.layers}, but got {n!r}")
        if isinstance(relations, str):
            relations = (relations,)
        for r in relations:
            if r not in F.RELATIONS:
                raise ValueError(f"Expected `relations` to contain names from {list(F.RELATIONS)}, but got {r!r}")
        if not chosen or not relations:
            raise ValueError(
                f"Expected at least one layer and one relation, but got layers={list(chosen)!r} and relations={list(relations)!r}"
            )
        entries = [(n, r, self.alignment[n][r]) for n in chosen for r in relations]
        vals = [a for _, _, a in entries if not math.isnan(a)]
        bad = [(n, r) for n, r, a in entries if math.isnan(a)]
        if bad and on_nan != "omit":
            listed = "; ".join(
                f"{_display(n)}/{r}: {self.nan_reasons.get(n, {}).get(r, 'NaN')}" for n, r in bad[:8]
            ) + (f"; … ({len(bad) - 8} more)" if len(bad) > 8 else "")
            msg = f"{len(bad)} of {len(entries)} alignment entries are NaN — {listed}"
            if on_nan == "error":
                raise CanonRegError(f"mean_alignment: {msg}")
            if on_nan == "propagate":
                return float("nan")
            warnings.warn(
                f"mean_alignment averages the {len(vals)} finite entries only; {msg}. "
                "Pass on_nan='omit' to accept that, or 'propagate' to get NaN",
                RuntimeWarning,
                stacklevel=2,
            )
        return sum(vals) / len(vals) if vals else float("nan")

    def phase(self, layer: str, threshold: float = 0.9) -> tuple[str, ...]:
        """Relations of ``layer`` whose α reaches ``threshold`` (one of the 64 CRH phases)."""
        if layer not in self.alignment:
            raise KeyError(f"Expected `layer` to be one of {self.layers}, but got {layer!r}")
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not -1 <= threshold <= 1:
            raise ValueError(f"Expected `threshold` to be a float in [-1, 1], but got {threshold!r}")
        return tuple(r for r in F.RELATIONS if self.alignment[layer][r] >= threshold)

    def to_flat_dict(self, prefix: str = "crh") -> dict[str, float]:
        """Flat ``{key: float}`` for experiment trackers (W&B, MLflow, TensorBoard all accept the keys).

        See :func:`canonreg.integrations.flat_metrics`, which this calls.
        """
        from .integrations.flat import flat_metrics

        return flat_metrics(self, prefix)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python view (JSON-ready: NaN and inf become None)."""
        d = {
            "preprocess": self.preprocess,
            "metric": self.metric,
            "derived_by_identities": self.derived,
            "alignment": self.alignment,
            "nan_reasons": self.nan_reasons,
            "exponents": {n: {r: f.to_dict() for r, f in e.items()} for n, e in self.exponents.items()},
            "effective_rank": self.effective_rank,
            "balance": {n: b.to_dict() for n, b in self.balance.items()},
            "samples": self.samples,
            "steps": self.steps,
            "skipped": self.skipped,
            "missing": self.missing,
            "excluded": self.excluded,
        }
        return jsonable(d)

    def to_json(self, path: str | Path | None = None, *, indent: int = 2) -> str:
        """Serialise :meth:`to_dict` (strict JSON: NaN and inf become null); also write it to ``path``.

        The file is written atomically (a temporary file in the same directory, then renamed): an
        interrupted write leaves the previous file, never half of a new one.

        Raises:
            FileNotFoundError: the directory of ``path`` does not exist.
            IsADirectoryError: ``path`` is a directory.
        """
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            if not isinstance(path, (str, Path)):
                raise TypeError(f"Expected `path` to be a str or pathlib.Path, but got {type(path).__name__}")
            target = Path(path)
            if target.is_dir():
                raise IsADirectoryError(f"Expected `path` to name a file, but {str(target)!r} is a directory")
            if not target.parent.is_dir():
                raise FileNotFoundError(
                    f"Expected the directory of `path` to exist, but {str(target.parent)!r} does not (path {str(target)!r})"
                )
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(text)
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        return text

    def table(self, what: str = "alignment") -> str:
        """A fixed-width text table: ``"alignment"`` (α) or ``"exponents"`` (κ [95% CI])."""
        names = [_display(n) for n in self.layers]
        w = max([5] + [len(n) for n in names]) + 2
        if what == "alignment":
            head = f"{'layer':<{w}}{'samples':>9} " + "".join(f"{r:>8}" for r in F.RELATIONS)
            rows = [
                f"{_display(n):<{w}}{self.samples[n]:>9} " + "".join(f"{_fmt(self.alignment[n][r]):>8}" for r in F.RELATIONS)
                for n in self.layers
            ]
        elif what == "exponents":
            head = f"{'layer':<{w}}" + "".join(f"{r:>22}" for r in F.RELATIONS)
            rows = []
            for n in self.layers:
                cells = []
                for r in F.RELATIONS:
                    f = self.exponents.get(n, {}).get(r)
                    cells.append(f"{'—' if f is None else _fmt_fit(f):>22}")
                rows.append(f"{_display(n):<{w}}" + "".join(cells))
        else:
            raise ValueError(f"Expected `what` to be 'alignment' or 'exponents', but got {what!r}")
        return "\n".join([head, "-" * len(head), *rows])

    def __str__(self) -> str:
        lines = [
            f"CRH alignment ({self.metric} α; preprocess={self.preprocess}; "
            f"H_b, G_a {'derived by exact identities' if self.derived else 'accumulated directly'})",
            self.table("alignment"),
        ]
        if self.balance:
            lines.append("")
            lines.append("balance per unit lr (trace form): decay  drift  noise  noise/decay")
            for n, b in self.balance.items():
                lines.append(f"  {_display(n)}: {b.decay:.4g}  {b.drift:.4g}  {b.noise:.4g}  {b.noise_share:.3g}")
        for n, reasons in self.nan_reasons.items():
            by_reason: dict[str, list[str]] = {}
            for rel, why in reasons.items():
                by_reason.setdefault(why, []).append(rel)
            for why, rels in by_reason.items():
                lines.append(f"nan in {_display(n)!r} ({', '.join(rels)}): {why}")
        for n, reason in self.missing.items():
            lines.append(f"missing {_display(n)!r}: {reason}")
        for n, reason in self.excluded.items():
            lines.append(f"excluded {_display(n)!r}: {reason}")
        for n, k in self.skipped.items():
            if k:
                lines.append(f"skipped {k} non-finite step(s) in {_display(n)!r}")
        return "\n".join(lines)

    def plot(self, path: str | Path | None = None, *, pair: tuple[str, str] | None = None) -> Any:
        """Heatmap of layers × relations and the eigen-scatter of one ``(layer, relation)`` pair.

        Needs matplotlib (``pip install canonreg[recipes]``). Returns the figure; saves it to ``path``.
        """
        from .plotting import plot_report

        return plot_report(self, path=path, pair=pair)


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.3f}"


def _fmt_fit(f: F.PowerLawFit) -> str:
    if math.isnan(f.exponent):
        return "nan"
    return f"{f.exponent:.2f} [{f.ci_low:.2f},{f.ci_high:.2f}]"


@dataclass(frozen=True)
class ReportInputs:
    """A monitor's reduced state: what :func:`build_report` turns into a :class:`CRHReport`.

    Attributes:
        sums: per layer, the reduced float64 sums (``n``, ``steps``, ``Ha_xx``, ``Ha_x``, …; see
            :func:`layer_matrices`), all on one device; ``gh`` and ``gnhn`` when ``balance`` is given.
        weights, biases: per layer, ``W`` as ``(d_b, d_a)`` and ``b`` (or None).
        preprocess, metric, direct: how the sums were taken and how α is scored.
        skipped, missing, excluded: bookkeeping copied into the report.
        balance: ``{"lr", "weight_decay", "batch_size"}`` for the balance terms, or None.
    """

    sums: Mapping[str, Mapping[str, Tensor]]
    weights: Mapping[str, Tensor]
    biases: Mapping[str, Tensor | None]
    preprocess: F.Preprocess
    metric: F.Metric
    direct: bool
    skipped: Mapping[str, int] = field(default_factory=dict)
    missing: Mapping[str, str] = field(default_factory=dict)
    excluded: Mapping[str, str] = field(default_factory=dict)
    balance: Mapping[str, float] | None = None


@dataclass(frozen=True)
class ReportOptions:
    """What to compute beyond α (the arguments of :meth:`CRHMonitor.compute` of the same names).

    Attributes:
        exponents: PAH fits of all six relations (eigendecompositions of ``G_a, Z_a, G_b, Z_b``).
        ranks: effective ranks of ``H_a, H_b, G_a, G_b``.
        n_bootstrap: bootstrap resamples of each exponent interval (0: NaN intervals).
        floor: relative eigenvalue floor of the fits, in [0, 1).
        bootstrap_seed: seed of the bootstrap generator (drawn in layer, then relation order).
        gram_dtype: dtype of the weight products (:func:`layer_matrices`).
    """

    exponents: bool = True
    ranks: bool = True
    n_bootstrap: int = 200
    floor: float = 1e-6
    bootstrap_seed: int = 0
    gram_dtype: torch.dtype = torch.float64


@dataclass
class _Layer:
    """One layer's part of a report (filled by :func:`_analyse_layer`)."""

    matrices: dict[str, Tensor]
    alignment: dict[str, float]
    reasons: dict[str, str]
    fits: dict[str, F.PowerLawFit] | None = None
    ranks: dict[str, dict[str, float]] | None = None
    balance: F.BalanceTerms | None = None


_PARTS = ("reduce", "matrices", "alignment", "exponents", "ranks")


def build_report(inputs: ReportInputs, options: ReportOptions | None = None, *, timings: Mapping[str, float] | None = None) -> CRHReport:
    """Assemble a :class:`CRHReport` from reduced float64 sums (pure; used by the monitor).

    Everything runs on the device of the sums (the accumulators'), eigendecompositions included; the
    report keeps its matrices on the CPU. Per layer: the six matrices (:func:`layer_matrices`), the
    six α from two :func:`~canonreg.functional.pairwise_alignment` passes (``H_a, G_a, Z_a`` and
    ``H_b, G_b, Z_b``), then, if asked, the eigendecompositions of the fits, batched when shapes agree
    (``G_a``/``Z_a`` always; all four when ``d_a = d_b``), and the ranks, which reuse them for
    ``G_a``/``G_b``. ``timings`` (seconds already spent, e.g. ``{"reduce": …}``) is extended with this
    function's parts.
    """
    options = ReportOptions() if options is None else options
    clock = dict.fromkeys(_PARTS, 0.0)
    clock.update(timings or {})
    gen = torch.Generator().manual_seed(options.bootstrap_seed)
    layers = {name: _analyse_layer(name, inputs, options, gen, clock) for name in inputs.sums}
    return CRHReport(
        alignment={n: r.alignment for n, r in layers.items()},
        nan_reasons={n: r.reasons for n, r in layers.items() if r.reasons},
        exponents={n: r.fits for n, r in layers.items() if r.fits is not None},
        effective_rank={n: r.ranks for n, r in layers.items() if r.ranks is not None},
        balance={n: r.balance for n, r in layers.items() if r.balance is not None},
        samples={n: int(float(s["n"])) for n, s in inputs.sums.items()},
        steps={n: int(round(float(s["steps"]))) for n, s in inputs.sums.items()},
        skipped=dict(inputs.skipped),
        preprocess=inputs.preprocess,
        metric=inputs.metric,
        derived=not inputs.direct,
        missing=dict(inputs.missing),
        excluded=dict(inputs.excluded),
        _matrices={n: {k: v.cpu() for k, v in r.matrices.items()} for n, r in layers.items()},
        timings={**clock, "total": sum(clock.values())},
    )


def _analyse_layer(name: str, inputs: ReportInputs, options: ReportOptions, gen: torch.Generator, clock: dict[str, float]) -> _Layer:
    """Matrices, α, fits, ranks and balance of one layer; adds the seconds of each part to ``clock``."""
    s = inputs.sums[name]
    t0 = time.perf_counter()
    mats = layer_matrices(
        s, inputs.weights[name], inputs.biases[name], preprocess=inputs.preprocess, direct=inputs.direct, gram_dtype=options.gram_dtype
    )
    t1 = time.perf_counter()
    out = _Layer(mats, *_alignments(mats, inputs.metric, float(s["n"]), inputs.preprocess))
    t2 = time.perf_counter()
    eig: dict[str, tuple[Tensor, Tensor]] = {}
    if options.exponents:
        eig = _eigh(mats, sorted({pb for _, pb in F.RELATION_PAIRS.values()}))
        out.fits = {
            rel: F.power_law_fit(mats[pa], mats[pb], floor=options.floor, n_bootstrap=options.n_bootstrap, generator=gen, eig=eig.get(pb))
            for rel, (pa, pb) in F.RELATION_PAIRS.items()
        }
    t3 = time.perf_counter()
    if options.ranks:
        out.ranks = _effective_ranks(mats, eig)
    t4 = time.perf_counter()
    if inputs.balance is not None:
        n = float(s["n"])
        out.balance = F.balance_terms(
            float(inputs.weights[name].double().square().sum()),
            float(s["gh"]) / n,
            float(s["gnhn"]) / n,
            lr=inputs.balance["lr"],
            weight_decay=inputs.balance["weight_decay"],
            batch_size=int(inputs.balance["batch_size"]),
            mean_gradient_sq_norm=float("nan"),
        )
    for part, dt in zip(_PARTS[1:], (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
        clock[part] += dt
    return out


def _alignments(mats: Mapping[str, Tensor], metric: F.Metric, samples: float, preprocess: str) -> tuple[dict[str, float], dict[str, str]]:
    """The six α of one layer from one pairwise pass per side, and the reason of each NaN."""
    scores: dict[tuple[str, str], float] = {}
    for side in ("a", "b"):
        names = (f"H_{side}", f"G_{side}", f"Z_{side}")
        table = F.pairwise_alignment([mats[m] for m in names], metric).tolist()  # one host sync per side
        scores.update({(p, q): table[i][j] for i, p in enumerate(names) for j, q in enumerate(names)})
    alignment = {rel: float(scores[pair]) for rel, pair in F.RELATION_PAIRS.items()}
    reasons = {
        rel: _nan_reason(pa, mats[pa], pb, mats[pb], metric, samples, preprocess)
        for rel, (pa, pb) in F.RELATION_PAIRS.items()
        if math.isnan(alignment[rel])
    }
    return alignment, reasons


def _eigh(mats: Mapping[str, Tensor], names: Sequence[str]) -> dict[str, tuple[Tensor, Tensor]]:
    """``torch.linalg.eigh`` of the finite ones among ``mats[names]``, one batched call per shape."""
    return _by_shape(mats, names, torch.linalg.eigh)


def _by_shape(mats: Mapping[str, Tensor], names: Sequence[str], decompose: Any) -> dict[str, Any]:
    """``decompose`` of each finite matrix in ``names``; matrices of one shape go in one batched call."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for m in names:
        if bool(torch.isfinite(mats[m]).all()):
            groups.setdefault(tuple(mats[m].shape), []).append(m)
    out: dict[str, Any] = {}
    for group in groups.values():
        if len(group) == 1:
            out[group[0]] = decompose(mats[group[0]])
            continue
        result = decompose(torch.stack([mats[m] for m in group]))
        parts = zip(*result) if isinstance(result, tuple) else result
        out.update(zip(group, parts))
    return out


def _effective_ranks(mats: Mapping[str, Tensor], eig: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, dict[str, float]]:
    """``{"participation": (Σλ)²/Σλ², "entropy": exp(−Σ p log p)}`` of ``H_a, H_b, G_a, G_b``.

    The same definitions (negative eigenvalues clipped to 0; NaN for a zero or non-finite matrix) as
    :func:`canonreg.functional.participation_ratio` and :func:`~canonreg.functional.entropy_rank`,
    which each decompose the matrix again. Eigenvalues come from ``eig`` (the fits' ``eigh``) where it
    has them, the others from one batched ``eigvalsh`` per shape.
    """
    names = ("H_a", "H_b", "G_a", "G_b")
    values = {m: eig[m][0] for m in names if m in eig}
    values.update(_by_shape(mats, [m for m in names if m not in eig], torch.linalg.eigvalsh))
    nan = {"participation": float("nan"), "entropy": float("nan")}
    out = {}
    for m in names:
        if m not in values:  # not finite
            out[m] = dict(nan)
            continue
        lam = values[m].clamp_min(0)
        total = float(lam.sum())
        sq = float((lam * lam).sum())
        if not total > 0 or not sq > 0:
            out[m] = dict(nan)
            continue
        p = lam / total
        ent = -torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p)).sum()
        out[m] = {"participation": max(total * total / sq, 1.0), "entropy": float(torch.exp(ent))}
    return out
