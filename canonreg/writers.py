"""Logging of monitor reports and optimizer balance: CSV (long format) and TensorBoard.

Both writers turn what they are given into the same long-format records ``(layer, metric, value)``
(:func:`report_records`, :func:`balance_records`, the functional core) and differ only in where
the records go:

* :class:`CSVWriter` appends rows ``[constant fields…,] step, layer, metric, value`` to one CSV
  file, writing the header once (an existing file must carry the same header); every call is
  flushed, and a row left incomplete by a crash is dropped when the file is reopened.
* :class:`TensorBoardWriter` writes scalars with tag ``"{group}/{layer}/{name}"`` (e.g.
  ``"alpha/2/f-RWA"``, ``"balance/2/noise_share"``) through
  ``torch.utils.tensorboard.SummaryWriter``; it needs the optional ``tensorboard`` package
  (``pip install 'canonreg[tensorboard]'``).

Metric names (``layer`` is the monitored layer's name, ``"<root>"`` for the model itself, and
``"*"`` for model-level records):

=============================  ========================================================================
``alpha/<relation>``           α of the relation (theory §3), in the report's metric
``mean_alpha`` (layer ``*``)   mean α over layers and relations (:meth:`CRHReport.mean_alignment`)
``kappa/<relation>``           PAH exponent κ in ``A ∝ B^κ`` (theory §4); also ``kappa_ci_low/…``,
                               ``kappa_ci_high/…``, ``kappa_r2/…``
``participation/<M>``          participation ratio ``(Tr M)² / Tr M²`` of ``M ∈ {H_a, H_b, G_a, G_b}``
``entropy_rank/<M>``           entropy effective rank of ``M``
``samples``                    rows accumulated for the layer
``<prefix>/<term>``            balance terms (theory §5): ``decay, drift, noise, signal, noise_share, rho``
=============================  ========================================================================

``log_report`` writes the report's own balance terms (the monitor's SGD-form measurement) with
prefix ``"monitor_balance"``; ``log_balance`` writes a ``{layer: BalanceTerms}`` mapping (e.g.
``NoiseCalibrated.balance``) with prefix ``"balance"`` (configurable), so both fit in one file.

Example:
    >>> with CSVWriter("crh.csv", fields={"run": "baseline-0"}) as log:  # doctest: +SKIP
    ...     log.log_report(step, monitor.compute())
    ...     log.log_balance(step, opt.balance)
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .functional import RELATIONS, BalanceTerms
from .layers import _display

if TYPE_CHECKING:  # pragma: no cover
    from .report import CRHReport

__all__ = ["Record", "report_records", "balance_records", "CSVWriter", "TensorBoardWriter", "repair_partial_line"]

#: One long-format record: ``(layer, metric, value)``.
Record = tuple[str, str, float]

MODEL_LEVEL = "*"
_BALANCE_TERMS = ("decay", "drift", "noise", "signal", "noise_share", "rho")


def report_records(
    report: CRHReport,
    *,
    exponents: bool = True,
    ranks: bool = True,
    balance_prefix: str = "monitor_balance",
) -> list[Record]:
    """The long-format records of a :class:`~canonreg.CRHReport` (see the module table).

    Args:
        report: what ``CRHMonitor.compute()`` returned.
        exponents: include the PAH fits (when the report has them).
        ranks: include the effective ranks.
        balance_prefix: metric prefix of the report's balance terms (when it has them).
    """
    rows: list[Record] = [(MODEL_LEVEL, "mean_alpha", float(report.mean_alignment()))]
    for layer in report.layers:
        name = _display(layer)
        for r in RELATIONS:
            rows.append((name, f"alpha/{r}", float(report.alignment[layer][r])))
        if exponents and layer in report.exponents:
            for r, fit in report.exponents[layer].items():
                rows += [
                    (name, f"kappa/{r}", float(fit.exponent)),
                    (name, f"kappa_ci_low/{r}", float(fit.ci_low)),
                    (name, f"kappa_ci_high/{r}", float(fit.ci_high)),
                    (name, f"kappa_r2/{r}", float(fit.r2)),
                ]
        if ranks and layer in report.effective_rank:
            for m, d in report.effective_rank[layer].items():
                rows.append((name, f"participation/{m}", float(d["participation"])))
                rows.append((name, f"entropy_rank/{m}", float(d["entropy"])))
        rows.append((name, "samples", float(report.samples[layer])))
    if report.balance:
        rows += balance_records(report.balance, prefix=balance_prefix)
    return rows


def balance_records(balance: Mapping[str, BalanceTerms], *, prefix: str = "balance") -> list[Record]:
    """Records ``(layer, "<prefix>/<term>", value)`` for ``decay, drift, noise, signal, noise_share, rho``.

    Raises:
        TypeError: a value is not a :class:`~canonreg.BalanceTerms`.
    """
    if not isinstance(balance, Mapping):
        raise TypeError(f"Expected `balance` to be a mapping layer -> BalanceTerms, but got {type(balance).__name__}")
    rows: list[Record] = []
    for layer, terms in balance.items():
        if not isinstance(terms, BalanceTerms):
            raise TypeError(f"Expected `balance[{layer!r}]` to be a canonreg.BalanceTerms, but got {type(terms).__name__}")
        d = terms.to_dict()
        for t in _BALANCE_TERMS:
            rows.append((_display(str(layer)), f"{prefix}/{t}", float(d[t])))
    return rows


def _check_step(step: Any) -> int:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"Expected `step` to be a non-negative int, but got {step!r}")
    return step


def _check_scalars(scalars: Mapping[str, float]) -> list[Record]:
    if not isinstance(scalars, Mapping):
        raise TypeError(f"Expected `scalars` to be a mapping name -> float, but got {type(scalars).__name__}")
    rows = []
    for k, v in scalars.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise TypeError(f"Expected `scalars[{k!r}]` to be a float, but got {v!r}")
        rows.append((MODEL_LEVEL, str(k), float(v)))
    return rows


class _Writer:
    """Shared front end: every ``log_*`` call becomes records passed to ``_write``."""

    def _write(self, step: int, rows: Sequence[Record]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def log_report(self, step: int, report: CRHReport, *, exponents: bool = True, ranks: bool = True) -> None:
        """Write :func:`report_records` of ``report`` at ``step``."""
        self._write(_check_step(step), report_records(report, exponents=exponents, ranks=ranks))

    def log_balance(self, step: int, balance: Mapping[str, BalanceTerms], *, prefix: str = "balance") -> None:
        """Write :func:`balance_records` of ``balance`` (e.g. ``NoiseCalibrated.balance``) at ``step``."""
        self._write(_check_step(step), balance_records(balance, prefix=prefix))

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Write model-level scalars (layer ``"*"``), e.g. ``{"train_loss": 0.31}``."""
        self._write(_check_step(step), _check_scalars(scalars))

    def log_event(self, event: Any) -> None:
        """Write a :class:`canonreg.experiment.TrialEvent` (usable as ``run_trial``'s ``callback``):
        its report, the optimizer balance when present, and ``train_loss``."""
        self.log_report(event.step, event.report)
        if event.optimizer_balance:
            self.log_balance(event.step, event.optimizer_balance)
        self.log_scalars(event.step, {"train_loss": event.train_loss})

    def __call__(self, event: Any) -> None:
        self.log_event(event)

    def flush(self) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def repair_partial_line(path: str | Path) -> int:
    """Drop an incomplete last line (no trailing newline) of a text file, as a crash mid-write leaves it.

    Returns the number of bytes removed (0 when the file is absent, empty or ends with a newline).
    """
    p = Path(path)
    if not p.exists():
        return 0
    size = p.stat().st_size
    if size == 0:
        return 0
    with open(p, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # Scan back in blocks to the last newline and truncate after it.
        pos = size
        keep = 0
        while pos > 0:
            start = max(0, pos - 65536)
            f.seek(start)
            block = f.read(pos - start)
            i = block.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return size - keep


class CSVWriter(_Writer):
    """Append long-format rows ``[fields…,] step, layer, metric, value`` to a CSV file.

    Values are written with full precision (``repr`` of the float; ``nan``/``inf`` as such).

    Args:
        path: the CSV file (parent folders are created).
        fields: constant leading columns, e.g. ``{"run": "a1", "seed": 0}`` (to concatenate runs).
        append: keep an existing file and add to it (its header must match); ``False`` truncates it.

    Raises:
        ValueError: an existing file has a different header, or a field name clashes with a column.
    """

    COLUMNS = ("step", "layer", "metric", "value")

    def __init__(self, path: str | Path, *, fields: Mapping[str, object] | None = None, append: bool = True) -> None:
        self.path = Path(path)
        self.fields: dict[str, str] = {str(k): str(v) for k, v in (fields or {}).items()}
        clash = sorted(set(self.fields) & set(self.COLUMNS))
        if clash:
            raise ValueError(f"Expected `fields` names other than {list(self.COLUMNS)}, but got {clash}")
        self.header = [*self.fields, *self.COLUMNS]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if append and self.path.exists() and self.path.stat().st_size > 0:
            repair_partial_line(self.path)
            with open(self.path, newline="", encoding="utf-8") as f:
                existing = next(csv.reader(f), [])
            if existing and existing != self.header:
                raise ValueError(
                    f"Expected the existing CSV {str(self.path)!r} to have header {self.header}, but it has {existing}; "
                    "use another path or append=False"
                )
            self._file = open(self.path, "a", newline="", encoding="utf-8")
            if not existing:
                self._emit([self.header])
        else:
            self._file = open(self.path, "w", newline="", encoding="utf-8")
            self._emit([self.header])

    def _emit(self, rows: Sequence[Sequence[object]]) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        self._file.write(buf.getvalue())  # one write per call: rows of a call land together
        self._file.flush()

    def _write(self, step: int, rows: Sequence[Record]) -> None:
        if self._file.closed:
            raise ValueError(f"CSVWriter for {str(self.path)!r} is closed")
        lead = list(self.fields.values())
        self._emit([[*lead, step, layer, metric, _fmt(value)] for layer, metric, value in rows])

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> CSVWriter:
        return self


def _fmt(v: float) -> str:
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return repr(float(v))


class TensorBoardWriter(_Writer):
    """Write the records as TensorBoard scalars with tag ``"{group}/{layer}/{name}"``.

    A metric ``"alpha/f-RWA"`` of layer ``"2"`` becomes tag ``"alpha/2/f-RWA"``; a metric without a
    slash (``"samples"``) becomes ``"samples/2"``; model-level records keep their name
    (``"mean_alpha"``, ``"train_loss"``).

    Args:
        log_dir: the event-file folder (``SummaryWriter(log_dir)``).
        **kwargs: passed to ``torch.utils.tensorboard.SummaryWriter`` (``flush_secs``, ``comment``…).

    Raises:
        ImportError: the optional ``tensorboard`` package is not installed.
    """

    def __init__(self, log_dir: str | Path, **kwargs: Any) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(
                "TensorBoardWriter needs the optional tensorboard package: pip install 'canonreg[tensorboard]' "
                "(or pip install tensorboard); CSVWriter needs nothing extra"
            ) from e
        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir), **kwargs)
        self._closed = False

    @staticmethod
    def tag(layer: str, metric: str) -> str:
        """The TensorBoard tag of one record."""
        if layer == MODEL_LEVEL:
            return metric
        group, sep, name = metric.partition("/")
        return f"{group}/{layer}/{name}" if sep else f"{metric}/{layer}"

    def _write(self, step: int, rows: Sequence[Record]) -> None:
        if self._closed:
            raise ValueError(f"TensorBoardWriter for {str(self.log_dir)!r} is closed")
        for layer, metric, value in rows:
            self._writer.add_scalar(self.tag(layer, metric), value, global_step=step)

    def flush(self) -> None:
        if not self._closed:
            self._writer.flush()

    def close(self) -> None:
        if not self._closed:
            self._writer.close()
            self._closed = True

    def __enter__(self) -> TensorBoardWriter:
        return self
