"""Ablation runner: a grid of :class:`~canonreg.experiment.TrialConfig` trials, run in parallel, resumable,
summarised over seeds as tables and plots.

A config (TOML file or the equivalent Python dict) has these tables; every key is checked before
anything runs, and a bad one is rejected with a message naming it:

.. code-block:: toml

    [ablation]                       # all optional
    name = "wd-arms"
    out = "runs/wd-arms"             # output folder (default "runs/<name>"; --quick adds "-quick")
    workers = 2                      # worker processes (default: all CPUs; 0 = in this process)
    backend = "local"                # "local" (ProcessPoolExecutor, spawn) or "ray"
    logs = "none"                    # per-run logs: "none" | "csv" | "tensorboard" (canonreg.writers)
    metrics = ["test_acc", "mean_alpha", "erank_penultimate", "nc1"]   # summary columns

    [fixed]                          # TrialConfig fields shared by every run (else their defaults)
    steps = 400
    width = 64

    [grid]                           # factors: TrialConfig fields, each a non-empty list of values
    arm = ["baseline", "loss", "noise", "both"]
    weight_decay = [1e-4, 1e-3]
    seed = [0, 1, 2]
    # relations = [["f-RWA", "b-RWA"], ["f-RGA"]]   (each value is a list of relation names)

    [[plot]]                         # optional; default: every metric against every numeric factor
    metric = "mean_alpha"
    factor = "weight_decay"

    [quick]                          # applied by --quick: a scalar fixes a field, a list sets a factor
    steps = 60
    seed = [0]

The runs are the Cartesian product of the grid over the fixed values, each resolved
(:meth:`TrialConfig.resolved`: factors that do not act in an arm take their neutral value) and
de-duplicated, so ``arm × noise`` runs the baseline once, not once per noise level. **Same budget**:
every arm of one grid cell shares ``steps`` and ``batch_size`` (and data, initialisation and batch
order per seed); the runner never lets an arm change them.

Outputs in ``out``: ``results.jsonl`` (one line per finished run: run id, resolved config, results,
environment), ``errors.jsonl`` (failed runs with tracebacks; they are retried on the next start),
``summary.md`` and ``summary.csv`` (mean and 95% Student-t interval over seeds, one row per
combination of the other varying factors), ``plots/<metric>_vs_<factor>.png``, ``spec.json`` and,
with ``logs``, ``logs/<run id>/``.

Resuming: a run's id is a hash of its resolved config (:func:`canonreg.experiment.config_id`). On
start, the ids already in ``results.jsonl`` are skipped. Each record is written with a single
``write`` and ``fsync``, so a crash can only leave the last line incomplete. Every line is checked
(:func:`load_results`): JSON, a ``run_id``, a ``config`` that is a valid TrialConfig whose id is the
``run_id``, a ``result`` table. A line that fails — an incomplete last line, corrupt text, a damaged
config — is moved to ``results.rejected.jsonl`` (line number, reason, text) with one warning naming
the line, and its run is recomputed; every valid record is kept byte for byte. A complete last
record that lacks only its final newline is valid: it is kept and the newline added.

Interrupts: SIGTERM (when the runner runs in the main thread with the default SIGTERM action) and
Ctrl-C stop the worker processes before the runner exits — no worker or resource tracker outlives
it; a worker also exits by itself if its parent dies. Finished runs stay in ``results.jsonl``; the
next start resumes. The CLI exits with status 143 after SIGTERM, 130 after Ctrl-C.

Determinism: every trial runs with ``torch.set_num_threads(1)`` (worker processes, Ray tasks and the
in-process mode alike) and is seeded from its config, so the same config gives the same numbers bit
for bit in one environment, whichever backend or worker count ran it.

Interval over seeds: with ``n`` finite values, mean ``m`` and sample standard deviation ``s``,
``m ± t_{0.975, n−1} · s / √n`` (:func:`mean_ci`; no interval for ``n = 1``).

Example:
    >>> result = run_ablation("examples/ablation.toml", workers=2)  # doctest: +SKIP
    >>> print(result.markdown)  # doctest: +SKIP

CLI: ``canonreg ablate CONFIG [--out DIR] [--workers N] [--backend local|ray] [--resume/--no-resume]
[--quick]`` (:func:`main`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import io
import itertools
import json
import math
import os
import platform
import shutil
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .experiment import (
    LAYER_METRIC_PREFIXES,
    STATIC_METRICS,
    TrialConfig,
    config_id,
    scalar_metrics,
    trial_defaults,
)
from .writers import CSVWriter, TensorBoardWriter

__all__ = [
    "PlotSpec",
    "AblationSpec",
    "AblationResult",
    "Interval",
    "load_spec",
    "run_ablation",
    "load_results",
    "summarize",
    "write_summaries",
    "summary_markdown",
    "summary_csv",
    "plot_metric",
    "mean_ci",
    "t_quantile",
    "code_fingerprint",
    "Terminated",
    "main",
]

Backend = Literal["local", "ray"]
LogKind = Literal["none", "csv", "tensorboard"]
BACKENDS: tuple[str, ...] = ("local", "ray")
LOG_KINDS: tuple[str, ...] = ("none", "csv", "tensorboard")
DEFAULT_METRICS: tuple[str, ...] = ("test_acc", "mean_alpha", "erank_penultimate", "nc1")
#: Result keys that measure time (excluded when results are compared for determinism).
TIMING_KEYS: tuple[str, ...] = ("wall_time_s", "train_time_s", "cpu_time_s")
ARM_COLORS: dict[str, str] = {"baseline": "tab:gray", "loss": "tab:blue", "noise": "tab:orange", "both": "tab:green"}

_TOP_KEYS = ("ablation", "fixed", "grid", "plot", "quick")
_ABLATION_KEYS = ("name", "out", "workers", "backend", "logs", "metrics")
_FIELDS: tuple[str, ...] = tuple(trial_defaults())


# ====================================================================== the spec
@dataclass(frozen=True)
class PlotSpec:
    """One figure: ``metric`` (mean and 95% interval over seeds) against grid factor ``factor``, per arm."""

    metric: str
    factor: str


@dataclass(frozen=True)
class AblationSpec:
    """A validated ablation: fixed values, the grid, and how to run and summarise it.

    Build it with :meth:`from_dict` or :func:`load_spec` (TOML); see the module docstring for the
    keys. ``fixed``, ``grid`` and ``quick`` are tuples of ``(field, value)`` pairs in config order
    (grid values are tuples).
    """

    name: str = "ablation"
    fixed: tuple[tuple[str, Any], ...] = ()
    grid: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    metrics: tuple[str, ...] = DEFAULT_METRICS
    plots: tuple[PlotSpec, ...] | None = None
    out: str | None = None
    workers: int | None = None
    backend: Backend = "local"
    logs: LogKind = "none"
    quick: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        _validate_spec(self)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> AblationSpec:
        """Validate a TOML-shaped mapping (module docstring) into a spec.

        Raises:
            ValueError / TypeError: an unknown table or key, an empty grid, a value of the wrong type
                or out of range; the message names the key (``grid.weight_decay``, ``fixed.steps``…).
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"Expected the ablation config to be a mapping (TOML tables), but got {type(config).__name__}")
        unknown = [k for k in config if k not in _TOP_KEYS]
        if unknown:
            raise ValueError(f"Unknown top-level key(s) {unknown} in the ablation config; expected tables from {list(_TOP_KEYS)}")
        head = _table(config, "ablation")
        bad = [k for k in head if k not in _ABLATION_KEYS]
        if bad:
            raise ValueError(f"Unknown key(s) {['ablation.' + k for k in bad]}; expected keys from {list(_ABLATION_KEYS)}")
        fixed = _table(config, "fixed")
        grid = _table(config, "grid")
        quick = _table(config, "quick")
        kw: dict[str, Any] = {}
        if "name" in head:
            kw["name"] = head["name"]
        if "out" in head:
            kw["out"] = head["out"]
        if "workers" in head:
            kw["workers"] = head["workers"]
        if "backend" in head:
            kw["backend"] = head["backend"]
        if "logs" in head:
            kw["logs"] = head["logs"]
        if "metrics" in head:
            m = head["metrics"]
            if not isinstance(m, list) or not m or not all(isinstance(x, str) for x in m):
                raise TypeError(f"Expected `ablation.metrics` to be a non-empty list of metric names, but got {m!r}")
            kw["metrics"] = tuple(m)
        plots = None
        if "plot" in config:
            raw = config["plot"]
            if not isinstance(raw, list) or not all(isinstance(p, Mapping) for p in raw):
                raise TypeError(f"Expected `plot` to be an array of tables ([[plot]] metric=…, factor=…), but got {raw!r}")
            plots = []
            for i, p in enumerate(raw):
                extra = sorted(set(p) - {"metric", "factor"})
                if extra or "metric" not in p or "factor" not in p:
                    raise ValueError(f"Expected `plot[{i}]` to have exactly the keys 'metric' and 'factor', but got {sorted(p)}")
                if not isinstance(p["metric"], str) or not isinstance(p["factor"], str):
                    raise TypeError(f"Expected `plot[{i}].metric` and `plot[{i}].factor` to be strings, but got {dict(p)!r}")
                plots.append(PlotSpec(p["metric"], p["factor"]))
            kw["plots"] = tuple(plots)
        kw["fixed"] = tuple((k, _freeze(v)) for k, v in fixed.items())
        kw["grid"] = tuple((k, _grid_values(f"grid.{k}", k, v)) for k, v in grid.items())
        kw["quick"] = tuple((k, _freeze(v)) for k, v in quick.items())
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """The TOML-shaped mapping of this spec (inverse of :meth:`from_dict`; JSON-ready)."""
        d: dict[str, Any] = {
            "ablation": {"name": self.name, "metrics": list(self.metrics), "backend": self.backend, "logs": self.logs},
            "fixed": {k: _thaw(v) for k, v in self.fixed},
            "grid": {k: [_thaw(v) for v in vals] for k, vals in self.grid},
        }
        if self.out is not None:
            d["ablation"]["out"] = self.out
        if self.workers is not None:
            d["ablation"]["workers"] = self.workers
        if self.plots is not None:
            d["plot"] = [{"metric": p.metric, "factor": p.factor} for p in self.plots]
        if self.quick:
            d["quick"] = {k: _thaw(v) for k, v in self.quick}
        return d

    def with_quick(self) -> AblationSpec:
        """The ``--quick`` variant: ``[quick]`` scalars fix a field (dropping it from the grid), lists set a factor."""
        fixed = dict(self.fixed)
        grid = dict(self.grid)
        for k, v in self.quick:
            if isinstance(v, tuple) and not (k == "relations" and all(isinstance(x, str) for x in v)):
                grid[k] = _grid_values(f"quick.{k}", k, _thaw(v))
                fixed.pop(k, None)
            else:
                fixed[k] = v
                grid.pop(k, None)
        return dataclasses.replace(self, fixed=tuple(fixed.items()), grid=tuple(grid.items()), quick=())

    # ------------------------------------------------------------------ the runs
    @property
    def factors(self) -> tuple[str, ...]:
        """The grid's factor names, in config order."""
        return tuple(k for k, _ in self.grid)

    def configs(self) -> list[TrialConfig]:
        """Every run: the grid's Cartesian product over the fixed values, resolved and de-duplicated.

        Raises:
            ValueError / TypeError: a combination is not a valid TrialConfig (the message names the
                field and shows the combination).
        """
        base = {k: _thaw(v) for k, v in self.fixed}
        names = [k for k, _ in self.grid]
        seen: set[str] = set()
        out: list[TrialConfig] = []
        for combo in itertools.product(*(vals for _, vals in self.grid)):
            kw = dict(base)
            kw.update({k: _thaw(v) for k, v in zip(names, combo)})
            try:
                cfg = TrialConfig(**kw).resolved()
            except (TypeError, ValueError) as e:
                shown = {k: _thaw(v) for k, v in zip(names, combo)}
                raise type(e)(f"In the grid combination {shown}: {e}") from None
            rid = config_id(cfg)
            if rid not in seen:
                seen.add(rid)
                out.append(cfg)
        return out

    def varying(self, configs: Sequence[TrialConfig] | None = None) -> tuple[str, ...]:
        """Grid factors that take more than one value among the resolved runs (config order)."""
        cfgs = self.configs() if configs is None else configs
        return tuple(f for f in self.factors if len({_key(getattr(c, f)) for c in cfgs}) > 1)

    def plot_specs(self, configs: Sequence[TrialConfig] | None = None) -> tuple[PlotSpec, ...]:
        """The figures to draw: ``plots`` if given, else every metric against every numeric varying factor."""
        if self.plots is not None:
            return self.plots
        cfgs = self.configs() if configs is None else configs
        numeric = [
            f
            for f in self.varying(cfgs)
            if f not in ("arm", "seed") and all(_is_number(getattr(c, f)) for c in cfgs if _acts(c, f))
        ]
        return tuple(PlotSpec(m, f) for f in numeric for m in self.metrics)


def _table(config: Mapping[str, Any], key: str) -> dict[str, Any]:
    t = config.get(key, {})
    if not isinstance(t, Mapping):
        raise TypeError(f"Expected `{key}` to be a table of keys, but got {t!r}")
    return dict(t)


def _freeze(v: Any) -> Any:
    return tuple(_freeze(x) for x in v) if isinstance(v, (list, tuple)) else v


def _thaw(v: Any) -> Any:
    return list(_thaw(x) for x in v) if isinstance(v, tuple) else v


def _grid_values(where: str, name: str, values: Any) -> tuple[Any, ...]:
    if name not in _FIELDS:
        raise ValueError(f"Unknown factor `{where}`; expected TrialConfig fields from {sorted(_FIELDS)}")
    if not isinstance(values, (list, tuple)) or isinstance(values, str):
        raise TypeError(f"Expected `{where}` to be a non-empty list of values, but got {values!r}")
    if not values:
        raise ValueError(f"Expected `{where}` to be a non-empty list of values, but got []")
    if name == "relations":
        for i, v in enumerate(values):
            if not isinstance(v, (list, tuple)):
                raise TypeError(
                    f"Expected each value of `{where}` to be a list of relation names "
                    f'(e.g. [["f-RWA", "b-RWA"], ["f-RGA"]]), but `{where}[{i}]` is {v!r}'
                )
    frozen = tuple(_freeze(v) for v in values)
    keys = [_key(v) for v in frozen]
    dup = sorted({repr(_thaw(v)) for v, k in zip(frozen, keys) if keys.count(k) > 1})
    if dup:
        raise ValueError(f"Expected `{where}` to list distinct values, but got duplicates {dup}")
    return frozen


def _validate_spec(spec: AblationSpec) -> None:
    if not isinstance(spec.name, str) or not spec.name or any(c in spec.name for c in "/\\\0"):
        raise ValueError(f"Expected `ablation.name` to be a non-empty string without path separators, but got {spec.name!r}")
    if spec.out is not None and (not isinstance(spec.out, str) or not spec.out):
        raise TypeError(f"Expected `ablation.out` to be a folder path (string), but got {spec.out!r}")
    if spec.workers is not None and (not isinstance(spec.workers, int) or isinstance(spec.workers, bool) or spec.workers < 0):
        raise ValueError(f"Expected `ablation.workers` to be a non-negative int (0 = in this process), but got {spec.workers!r}")
    if spec.backend not in BACKENDS:
        raise ValueError(f"Expected `ablation.backend` to be one of {list(BACKENDS)}, but got {spec.backend!r}")
    if spec.logs not in LOG_KINDS:
        raise ValueError(f"Expected `ablation.logs` to be one of {list(LOG_KINDS)}, but got {spec.logs!r}")
    for m in spec.metrics:
        _check_metric("ablation.metrics", m)
    for k, v in spec.fixed:
        if k not in _FIELDS:
            raise ValueError(f"Unknown key `fixed.{k}`; expected TrialConfig fields from {sorted(_FIELDS)}")
        if isinstance(v, tuple) and k != "relations":
            raise TypeError(f"Expected `fixed.{k}` to be a single value (lists of values to try belong in [grid]), but got {_thaw(v)!r}")
    if not spec.grid:
        raise ValueError("Expected `grid` to define at least one factor (e.g. seed = [0, 1, 2]), but the grid is empty")
    for k, vals in spec.grid:
        _grid_values(f"grid.{k}", k, _thaw(vals))
    both = sorted({k for k, _ in spec.fixed} & {k for k, _ in spec.grid})
    if both:
        raise ValueError(f"Expected each field in either [fixed] or [grid], but {both} appear in both")
    for k, _ in spec.quick:
        if k not in _FIELDS:
            raise ValueError(f"Unknown key `quick.{k}`; expected TrialConfig fields from {sorted(_FIELDS)}")
    spec.configs()  # validates every combination (messages name the field)
    factors = spec.factors
    if spec.plots is not None:
        for i, p in enumerate(spec.plots):
            _check_metric(f"plot[{i}].metric", p.metric)
            if p.factor not in factors or p.factor == "seed":
                raise ValueError(
                    f"Expected `plot[{i}].factor` to be a grid factor other than 'seed' ({[f for f in factors if f != 'seed']}), "
                    f"but got {p.factor!r}"
                )
    if spec.quick:
        try:
            spec.with_quick()
        except (TypeError, ValueError) as e:
            raise type(e)(f"In [quick]: {e}") from None


def _check_metric(where: str, m: Any) -> None:
    if not isinstance(m, str) or not (m in STATIC_METRICS or any(m.startswith(p) and len(m) > len(p) for p in LAYER_METRIC_PREFIXES)):
        raise ValueError(
            f"Expected `{where}` to name a trial metric from {list(STATIC_METRICS)} or "
            f"'<family><layer>' with family in {list(LAYER_METRIC_PREFIXES)} (e.g. 'erank@4'), but got {m!r}"
        )


def load_spec(source: str | Path | Mapping[str, Any] | AblationSpec) -> AblationSpec:
    """An :class:`AblationSpec` from a TOML path, a TOML-shaped mapping, or a spec (returned as is)."""
    if isinstance(source, AblationSpec):
        return source
    if isinstance(source, Mapping):
        return AblationSpec.from_dict(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            raise ValueError(f"Expected `config` to be a TOML file, but {str(path)!r} is a folder")
        if not path.is_file():
            raise FileNotFoundError(f"Expected `config` to be an existing TOML file, but {str(path)!r} does not exist")
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"Expected {str(path)!r} to be UTF-8 TOML text, but byte {e.start} is not UTF-8") from None
        except OSError as e:
            raise ValueError(f"Cannot read the config {str(path)!r}: {e.strerror or e}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"Invalid TOML in {str(path)!r}: {e}") from None
        try:
            return AblationSpec.from_dict(data)
        except (TypeError, ValueError) as e:
            raise type(e)(f"In {str(path)!r}: {e}") from None
    raise TypeError(f"Expected `config` to be a TOML path, a mapping or an AblationSpec, but got {type(source).__name__}")


# ====================================================================== statistics
def _t_two_sided_mass(t: float, df: int) -> float:
    """``A(t|ν) = P(|T| ≤ t)`` for Student's t with integer ``ν`` (Abramowitz & Stegun 26.7.3–4).

    With ``θ = atan(t/√ν)`` and ``c = cos θ``:
    ``ν`` odd: ``(2/π)(θ + sin θ · [c + (2/3)c³ + … + (2·4⋯(ν−3))/(1·3⋯(ν−2)) c^{ν−2}])`` (no bracket for ν = 1);
    ``ν`` even: ``sin θ · [1 + (1/2)c² + … + (1·3⋯(ν−3))/(2·4⋯(ν−2)) c^{ν−2}]``.
    """
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 1:
        series, term = 0.0, 0.0
        if df > 1:
            term = c
            series = c
            for k in range(1, (df - 1) // 2):
                term *= (2 * k) / (2 * k + 1) * c * c
                series += term
        return (2.0 / math.pi) * (theta + s * series)
    series, term = 1.0, 1.0
    for k in range(1, df // 2):
        term *= (2 * k - 1) / (2 * k) * c * c
        series += term
    return s * series


def t_quantile(p: float, df: int) -> float:
    """Quantile ``t_{p, ν}`` of Student's t distribution for ``p`` in (0.5, 1) and integer ``ν >= 1``.

    Inverts the exact integer-``ν`` CDF (:func:`_t_two_sided_mass`, ``F(t) = (1 + A(t|ν))/2``) by
    bisection in ``θ = atan(t/√ν) ∈ (0, π/2)`` to double precision. ``t_quantile(0.975, 2) ≈ 4.3027``.
    """
    if not (isinstance(p, float) and 0.5 < p < 1):
        raise ValueError(f"Expected `p` to be a float in (0.5, 1), but got {p!r}")
    if not isinstance(df, int) or isinstance(df, bool) or df < 1:
        raise ValueError(f"Expected `df` to be a positive int, but got {df!r}")
    target = 2.0 * p - 1.0
    lo, hi = 0.0, math.pi / 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_two_sided_mass(math.sqrt(df) * math.tan(mid), df) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-16:
            break
    return math.sqrt(df) * math.tan(0.5 * (lo + hi))


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` finite values with the 95% Student-t interval ``[low, high]`` (NaN bounds for n < 2)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return 0.5 * (self.high - self.low)


def mean_ci(values: Sequence[float], level: float = 0.95) -> Interval:
    """``m ± t_{(1+level)/2, n−1} · s/√n`` over the finite entries of ``values`` (NaN/None are dropped)."""
    if not 0 < level < 1:
        raise ValueError(f"Expected `level` to be a float in (0, 1), but got {level!r}")
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    m = math.fsum(xs) / n
    if n == 1:
        return Interval(m, math.nan, math.nan, 1)
    s = math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (n - 1))
    h = t_quantile(0.5 + level / 2, n - 1) * s / math.sqrt(n)
    return Interval(m, m - h, m + h, n)


# ====================================================================== results on disk
def code_fingerprint() -> str:
    """SHA-256 (16 hex) of canonreg's own ``.py`` sources: which code produced a result.

    Stored with every record; resuming warns when finished runs came from different code (their
    numbers may differ from what this code would compute; ``--no-resume`` reruns them).
    """
    import hashlib

    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _environment() -> dict[str, str]:
    import numpy

    from . import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "canonreg": __version__,
        "code": code_fingerprint(),
        "platform": platform.platform(),
    }


def _append_line(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line with a single write, then fsync: a crash can only truncate this line."""
    line = json.dumps(record, sort_keys=True, allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def load_results(path: str | Path, *, repair: bool = False) -> dict[str, dict[str, Any]]:
    """``{run_id: record}`` of the valid records of a ``results.jsonl`` (the last one wins for a repeated id).

    A line is a valid record when it is a JSON object with a string ``run_id``, a ``config`` that
    :meth:`TrialConfig.from_dict` accepts and whose :func:`~canonreg.experiment.config_id` is the
    ``run_id``, and a ``result`` table. A complete last record without its final newline is valid.
    Any other line (an incomplete last line left by a crash, corrupt text, a damaged config) is
    skipped with one ``RuntimeWarning`` naming the file and the line numbers; with ``repair=True``
    those lines are moved to ``results.rejected.jsonl`` beside the file (``{"line", "reason",
    "text", "at"}`` per line) and the file is rewritten atomically with the valid lines, byte for
    byte (a missing final newline is added). Nothing is ever deleted.
    """
    p = Path(path)
    if not p.exists():
        return {}
    data = p.read_bytes()
    pieces = data.split(b"\n")
    tail = pieces.pop()  # b"" when the file ends with a newline, else an unterminated last line
    good: list[tuple[bytes, dict[str, Any]]] = []
    bad: list[tuple[int, str, bytes]] = []
    for i, raw in enumerate([*pieces, tail] if tail else pieces, 1):
        if not raw.strip():
            continue
        rec, problem = _parse_record(raw)
        if problem is not None and raw is tail and problem.startswith("is not valid JSON"):
            problem = "is incomplete (no final newline and not valid JSON: an interrupted write)"
        if problem is None:
            good.append((raw, rec))
        else:
            bad.append((i, problem, raw))
    out = {str(rec["run_id"]): rec for _, rec in good}
    if bad:
        rejected = p.with_name(p.stem + ".rejected.jsonl")
        shown = "; ".join(f"line {n} of {str(p)!r} {why}" for n, why, _ in bad[:5])
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        action = f"moved to {str(rejected)!r}; their runs will be recomputed" if repair else "skipped"
        warnings.warn(f"{shown}{more} ({len(bad)} damaged line(s) {action})", RuntimeWarning, stacklevel=2)
    if repair and bad:
        stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        for n, why, raw in bad:
            _append_line(rejected, {"line": n, "reason": why, "text": raw.decode("utf-8", errors="replace"), "at": stamp})
        _atomic_write(p, b"".join(raw + b"\n" for raw, _ in good))
    elif repair and tail:
        with open(p, "ab") as f:  # a complete last record: only its newline was missing
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
    return out


def _parse_record(raw: bytes) -> tuple[dict[str, Any], str | None]:
    """``(record, None)`` for a valid results line, else ``({}, reason)`` (see :func:`load_results`)."""
    try:
        rec = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return {}, "is not UTF-8 text"
    except json.JSONDecodeError as e:
        return {}, f"is not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(rec, dict):
        return {}, f"is not a JSON object but a {type(rec).__name__}"
    rid = rec.get("run_id")
    if not isinstance(rid, str):
        return {}, f"has no string `run_id` (got {rid!r})"
    cfg = rec.get("config")
    if not isinstance(cfg, dict):
        return {}, f"has no `config` table (got {type(cfg).__name__})"
    try:
        trial = TrialConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        return {}, f"has a damaged config: {e}"
    missing = [f for f in _FIELDS if f not in cfg]
    if missing:  # records hold the complete resolved config; summaries read every field
        return {}, f"has a damaged config: missing field(s) {missing}"
    if config_id(trial) != rid:
        return {}, (
            f"has run id {rid!r}, which is not the id of its config ({config_id(trial)!r}): a damaged record, "
            "or one written by a canonreg with another result version"
        )
    if not isinstance(rec.get("result"), dict):
        return {}, f"has no `result` table (got {type(rec.get('result')).__name__})"
    if not isinstance(rec.get("env", {}), dict):
        return {}, "has an `env` that is not a table"
    return rec, None


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically (temporary file in the same folder, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ====================================================================== running
def _execute(cfg_dict: dict[str, Any], log_kind: str, log_dir: str | None) -> dict[str, Any]:
    """Run one trial (in a worker process, a Ray task or in-process); never raises.

    Returns ``{"run_id", "result"}`` or ``{"run_id", "error", "traceback"}``.
    """
    from .experiment import run_trial

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = TrialConfig.from_dict(cfg_dict)
    rid = config_id(cfg)
    writer: CSVWriter | TensorBoardWriter | None = None
    try:
        if log_kind != "none" and log_dir is not None:
            shutil.rmtree(log_dir, ignore_errors=True)  # a previous, interrupted attempt
            fields = {"run_id": rid, "arm": cfg.arm, "seed": cfg.seed}
            if log_kind == "csv":
                writer = CSVWriter(Path(log_dir) / "metrics.csv", fields=fields, append=False)
            else:
                writer = TensorBoardWriter(log_dir)
        callback = writer.log_event if writer is not None else None
        result = run_trial(cfg, callback=callback)
        return {"run_id": rid, "result": result}
    except Exception as e:  # reported to the parent, recorded in errors.jsonl
        return {"run_id": rid, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    finally:
        if writer is not None:
            writer.close()
        torch.set_num_threads(threads)


def _init_worker(parent: int | None = None) -> None:
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass
    if parent is not None:
        threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True, name="canonreg-orphan-watch").start()


def _exit_when_orphaned(parent: int, period: float = 0.5) -> None:
    """End this worker process as soon as its parent is gone (killed with a signal it cannot catch)."""
    while True:
        time.sleep(period)
        if os.getppid() != parent:
            os._exit(1)


class Terminated(SystemExit):
    """Raised in the runner's main thread on SIGTERM, so that workers are stopped before it exits.

    A ``SystemExit`` with code ``128 + signum`` (143): uncaught, the process exits quietly with
    that status, as the shell reports a process ended by SIGTERM.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


class _SigtermRaises:
    """Context manager: SIGTERM raises :class:`Terminated` in the main thread while inside.

    Only when called from the main thread and SIGTERM still has its default action (a handler
    the caller installed is left alone); the previous handler is restored on exit.
    """

    def __init__(self) -> None:
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> _SigtermRaises:
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self._previous = signal.signal(signal.SIGTERM, self._raise)
            self._installed = True
        return self

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False


Job = tuple[TrialConfig, str, str | None]


def _run_local(jobs: Sequence[Job], workers: int) -> Generator[tuple[TrialConfig, dict[str, Any]], None, None]:
    if workers == 0:
        for cfg, kind, log_dir in jobs:
            yield cfg, _execute(cfg.to_dict(), kind, log_dir)
        return
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = mp.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(),))
    try:
        futures = {pool.submit(_execute, cfg.to_dict(), kind, log_dir): cfg for cfg, kind, log_dir in jobs}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                cfg = futures[fut]
                try:
                    outcome = fut.result()
                except Exception as e:  # the worker process died (e.g. killed for memory)
                    outcome = {"run_id": config_id(cfg), "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                yield cfg, outcome
    except BaseException:
        # Interrupted (SIGTERM, Ctrl-C, an error in the parent) or the consumer stopped early:
        # a running trial would otherwise finish in its worker after the parent has gone.
        _terminate_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _terminate_workers(pool: Any, timeout: float = 5.0) -> None:
    """Terminate (then kill) a ``ProcessPoolExecutor``'s worker processes and wait for them."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join(timeout)


def _run_ray(jobs: Sequence[Job], workers: int) -> Generator[tuple[TrialConfig, dict[str, Any]], None, None]:
    try:
        import ray
    except ImportError as e:
        raise ImportError("backend='ray' needs the optional ray package: pip install 'canonreg[ray]'") from e
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False)
        started = True
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(_execute)
        refs = {remote.remote(cfg.to_dict(), kind, log_dir): cfg for cfg, kind, log_dir in jobs}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                cfg = refs[ref]
                try:
                    outcome = ray.get(ref)
                except Exception as e:  # the task or its worker failed outside _execute
                    outcome = {"run_id": config_id(cfg), "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                yield cfg, outcome
    finally:
        if started:
            ray.shutdown()


@dataclass(frozen=True)
class AblationResult:
    """What :func:`run_ablation` did and produced.

    Attributes:
        spec: the spec that ran (after ``--quick``).
        out: the output folder.
        configs: every run of the grid (resolved, in grid order).
        records: ``{run_id: record}`` of the finished runs of this grid (from ``results.jsonl``).
        summary: :func:`summarize` rows.
        markdown: the Markdown summary table (also in ``summary.md``).
        plots: paths of the written figures.
        new_runs: runs executed by this call. skipped_runs: runs found finished and skipped.
        stale_runs: ids of skipped runs produced by different canonreg code (:func:`code_fingerprint`).
        failures: ``{run_id: error}`` of runs that failed in this call.
    """

    spec: AblationSpec
    out: Path
    configs: tuple[TrialConfig, ...]
    records: dict[str, dict[str, Any]]
    summary: list[dict[str, Any]]
    markdown: str
    plots: tuple[Path, ...]
    new_runs: int
    skipped_runs: int
    failures: dict[str, str]
    stale_runs: tuple[str, ...] = ()


def run_ablation(
    config: str | Path | Mapping[str, Any] | AblationSpec,
    *,
    out: str | Path | None = None,
    workers: int | None = None,
    backend: Backend | None = None,
    resume: bool = True,
    quick: bool = False,
    progress: bool = True,
    plots: bool = True,
) -> AblationResult:
    """Run (or finish) an ablation grid and write its results, tables and figures.

    Everything is validated first; nothing runs and nothing is written for a bad config.

    Args:
        config: TOML path, TOML-shaped mapping or :class:`AblationSpec`.
        out: output folder (default: the spec's ``out``, else ``runs/<name>``; ``-quick`` is appended
            in quick mode when the folder comes from the spec).
        workers: worker processes (default: the spec's, else ``os.cpu_count()``, capped by the number
            of runs left); ``0`` runs in this process.
        backend: ``"local"`` or ``"ray"`` (default: the spec's).
        resume: skip runs already in ``results.jsonl``; ``False`` moves an existing file to
            ``results.jsonl.prev`` and runs everything again.
        quick: apply the spec's ``[quick]`` overrides.
        progress: show a tqdm bar over the runs (needs tqdm).
        plots: write the figures (needs matplotlib).

    Raises:
        ValueError / TypeError: a bad config or argument (before anything runs).
        ImportError: ``backend="ray"`` without ray, ``progress=True`` without tqdm.
    """
    spec, configs, out_dir, backend, nworkers = _prepare(config, out=out, workers=workers, backend=backend, quick=quick, progress=progress)
    return _run_prepared(spec, configs, out_dir, backend, nworkers, resume=resume, progress=progress, plots=plots)


def _prepare(
    config: str | Path | Mapping[str, Any] | AblationSpec,
    *,
    out: str | Path | None,
    workers: int | None,
    backend: Backend | None,
    quick: bool,
    progress: bool,
) -> tuple[AblationSpec, list[TrialConfig], Path, Backend, int | None]:
    """Every check of :func:`run_ablation` that comes before anything runs or is written."""
    spec = load_spec(config)
    if quick:
        if not spec.quick:
            raise ValueError(f"Expected a [quick] table in the config of ablation {spec.name!r} for quick mode (--quick), but it has none")
        spec = spec.with_quick()
    backend = spec.backend if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"Expected `backend` to be one of {list(BACKENDS)}, but got {backend!r}")
    nworkers = spec.workers if workers is None else workers
    if nworkers is not None and (not isinstance(nworkers, int) or isinstance(nworkers, bool) or nworkers < 0):
        raise ValueError(f"Expected `workers` to be a non-negative int (0 = in this process), but got {nworkers!r}")
    if backend == "ray" and nworkers == 0:
        raise ValueError("Expected `workers` >= 1 with backend='ray', but got 0")
    if backend == "ray":
        try:
            import ray  # noqa: F401
        except ImportError as e:
            raise ImportError("backend='ray' needs the optional ray package: pip install 'canonreg[ray]'") from e
    if progress:
        _tqdm()  # fail before anything is written
    if out is None:
        base = spec.out if spec.out is not None else str(Path("runs") / spec.name)
        out = base + "-quick" if quick else base
    out_dir = Path(out)
    probe = out_dir
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"Expected the output folder `out` to be a folder (created if missing), but {str(probe)!r} is a file")
    return spec, spec.configs(), out_dir, backend, nworkers


def _run_prepared(
    spec: AblationSpec,
    configs: list[TrialConfig],
    out_dir: Path,
    backend: Backend,
    nworkers: int | None,
    *,
    resume: bool,
    progress: bool,
    plots: bool,
) -> AblationResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "spec.json").write_text(json.dumps({"spec": spec.to_dict(), "runs": len(configs)}, indent=2))
    results_path = out_dir / "results.jsonl"
    errors_path = out_dir / "errors.jsonl"
    if not resume and results_path.exists():
        os.replace(results_path, out_dir / "results.jsonl.prev")
    ids = [config_id(c) for c in configs]
    finished = load_results(results_path, repair=True)
    todo = [c for c, rid in zip(configs, ids) if rid not in finished]
    skipped = len(configs) - len(todo)
    code = code_fingerprint()
    stale = tuple(rid for rid in ids if rid in finished and finished[rid].get("env", {}).get("code") != code)
    if stale:
        warnings.warn(
            f"{len(stale)} of the {skipped} finished runs in {str(results_path)!r} were produced by different canonreg "
            "code; their numbers may differ from what this code computes (rerun them with resume=False / --no-resume)",
            RuntimeWarning,
            stacklevel=2,
        )

    failures: dict[str, str] = {}
    new_runs = 0
    if todo:
        _prefetch_data(todo)
        n = min(os.cpu_count() or 1, len(todo)) if nworkers is None else min(nworkers, len(todo))
        log_root = out_dir / "logs"
        jobs: list[Job] = [(c, spec.logs, None if spec.logs == "none" else str(log_root / config_id(c))) for c in todo]
        env = _environment()
        bar = _tqdm()(total=len(configs), initial=skipped, desc=spec.name, unit="run", dynamic_ncols=True) if progress else _NoBar()
        runs = _run_ray(jobs, n) if backend == "ray" else _run_local(jobs, n)
        try:
            with _SigtermRaises():
                for cfg, outcome in runs:
                    rid = outcome["run_id"]
                    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
                    if "error" in outcome:
                        failures[rid] = outcome["error"]
                        _append_line(errors_path, {"run_id": rid, "config": cfg.to_dict(), "error": outcome["error"],
                                                   "traceback": outcome["traceback"], "at": stamp})  # fmt: skip
                        bar.set_postfix_str(f"FAILED {rid}: {outcome['error'][:60]}")
                    else:
                        result = {k: v for k, v in outcome["result"].items() if k not in ("config", "run_id")}
                        record = {"run_id": rid, "config": cfg.to_dict(), "result": result, "env": env, "finished_at": stamp}
                        _append_line(results_path, record)
                        finished[rid] = record
                        new_runs += 1
                        m = scalar_metrics(result)
                        bar.set_postfix_str(f"{cfg.arm} test_acc={m['test_acc']:.3f} α={m['mean_alpha']:.3f}")
                    bar.update(1)
        finally:
            runs.close()  # stops the workers now if the loop was left by an exception
            bar.close()

    records = {rid: finished[rid] for rid in ids if rid in finished}
    summary, markdown, written = write_summaries(spec, configs, list(records.values()), out_dir, plots=plots)
    return AblationResult(
        spec, out_dir, tuple(configs), records, summary, markdown, tuple(written), new_runs, skipped, failures, stale
    )


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


def _prefetch_data(configs: Sequence[TrialConfig]) -> None:
    """Generate each distinct dataset once in this process, so that workers read the disk cache."""
    from .experiment import load_data

    seen = set()
    for c in configs:
        key = (c.dataset, c.num_samples if c.dataset == "mnist1d" else 0, c.data_seed)
        if key not in seen:
            seen.add(key)
            load_data(c)


class _NoBar:
    """Stands in for the tqdm bar with ``progress=False``."""

    def update(self, k: int = 1) -> None: ...
    def set_postfix_str(self, s: str) -> None: ...
    def close(self) -> None: ...


def _tqdm() -> Any:
    try:
        from tqdm import tqdm
    except ImportError as e:
        raise ImportError("progress=True needs tqdm: pip install 'canonreg[recipes]' (or pass progress=False)") from e
    return tqdm


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


# ====================================================================== summaries
def _key(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _show(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "+".join(map(str, v)) if v else "—"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _acts(cfg: TrialConfig, factor: str) -> bool:
    """Whether ``factor`` acts in ``cfg``'s arm (resolved-away factors do not)."""
    if factor == "noise":
        return cfg.uses_noise
    if factor == "loss_weight":
        return cfg.uses_loss
    if factor in ("relations", "loss_metric"):
        return cfg.uses_loss and cfg.arm != "crh"  # the crh arm's joint objective has its own
    if factor == "momentum":
        return cfg.optimizer == "sgd"
    return True


def _config_value(record: Mapping[str, Any], factor: str) -> Any:
    return _key(record["config"][factor])


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


# ====================================================================== plots
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
    _check_metric("metric", metric)
    if not records:
        raise ValueError("Expected at least one finished run to plot, but got none")
    if factor not in records[0]["config"] or factor in ("arm", "seed"):
        raise ValueError(f"Expected `factor` to be a TrialConfig field other than 'arm' and 'seed', but got {factor!r}")
    for s in series:
        if s not in records[0]["config"] or s in ("arm", "seed", factor):
            raise ValueError(f"Expected `series` to name TrialConfig fields other than 'arm', 'seed' and {factor!r}, but got {s!r}")
    xs_all = sorted({_config_value(r, factor) for r in records if _acts(TrialConfig.from_dict(r["config"]), factor)}, key=_sort_key)
    numeric = all(_is_number(x) for x in xs_all)
    pos = {x: (float(x) if numeric else float(i)) for i, x in enumerate(xs_all)}
    lines: dict[tuple[Any, ...], dict[Any, list[float]]] = {}
    constant: set[tuple[Any, ...]] = set()
    for r in records:
        cfg = TrialConfig.from_dict(r["config"])
        key = (cfg.arm, *(_config_value(r, s) for s in series))
        value = scalar_metrics(r["result"]).get(metric, math.nan)
        if not _acts(cfg, factor):
            constant.add(key)
            lines.setdefault(key, {}).setdefault(None, []).append(value)
        else:
            lines.setdefault(key, {}).setdefault(_config_value(r, factor), []).append(value)
    fig = Figure(figsize=(6.4, 4.2)) if ax is None else ax.figure
    ax = fig.add_subplot(1, 1, 1) if ax is None else ax
    lo_x = min(pos.values()) if pos else 0.0
    hi_x = max(pos.values()) if pos else 1.0
    log_x = numeric and bool(xs_all) and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 10
    varied = [k for k in lines if k not in constant]
    for key, by_x in lines.items():
        arm = key[0]
        label = " ".join([arm, *(f"{s}={_show(v)}" for s, v in zip(series, key[1:]))])
        color = ARM_COLORS.get(arm) if not series else None
        if key in constant:
            iv = mean_ci(by_x[None])
            (ln,) = ax.plot([lo_x, hi_x], [iv.mean, iv.mean], linestyle="--", color=color, label=f"{label} ({factor} n/a)")
            if iv.n > 1:
                ax.fill_between([lo_x, hi_x], [iv.low] * 2, [iv.high] * 2, color=ln.get_color(), alpha=0.15)
            continue
        xs = sorted(by_x, key=_sort_key)
        ivs = [mean_ci(by_x[x]) for x in xs]
        means = [iv.mean for iv in ivs]
        err = [iv.half_width if iv.n > 1 else 0.0 for iv in ivs]
        # Dodge the series sideways (2% of a decade on a log axis, of the smallest gap otherwise)
        # so that their error bars do not hide each other.
        k = varied.index(key) - (len(varied) - 1) / 2
        if log_x:
            px = [pos[x] * 10 ** (0.02 * k) for x in xs]
        else:
            gap = min((b - a for a, b in zip(sorted(pos.values()), sorted(pos.values())[1:])), default=1.0)
            px = [pos[x] + 0.02 * gap * k for x in xs]
        ax.errorbar(px, means, yerr=err, marker="o", capsize=3, color=color, label=label)
    if log_x:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks([pos[x] for x in xs_all], [_show(x) for x in xs_all])
    ax.set_xlabel(factor)
    ax.set_ylabel(metric)
    seeds = sorted({r["config"]["seed"] for r in records})
    ax.set_title(f"{metric} vs {factor} (mean ± 95% t-interval over seeds {seeds})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if path is not None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(p, dpi=120)
    return fig


def _sort_key(v: Any) -> tuple[int, float, str]:
    return (0, float(v), "") if _is_number(v) else (1, 0.0, str(v))


# ====================================================================== CLI
PROG = "canonreg ablate"


def _workers_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative int (0 = in this process), but got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    from .cli import OneLineParser

    p = OneLineParser(
        prog=PROG,
        description="Run an ablation grid from a TOML config (see `python -c 'import canonreg.ablate as a; help(a)'`): "
        "parallel, resumable, summarised over seeds as Markdown/CSV tables and plots.",
    )
    p.add_argument("config", help="TOML file with [ablation], [fixed], [grid], [[plot]], [quick] tables")
    p.add_argument("--out", default=None, help="output folder (default: the config's ablation.out, else runs/<name>)")
    p.add_argument("--workers", type=_workers_arg, default=None, help="worker processes (default: the config's, else all CPUs; 0 = in this process)")
    p.add_argument("--backend", choices=list(BACKENDS), default=None, help="local processes or Ray (default: the config's, else local)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True, help="skip runs already in results.jsonl (default: on)")
    p.add_argument("--quick", action="store_true", help="apply the config's [quick] overrides (a smoke-test-sized grid)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="write the figures")
    p.add_argument("--debug", action="store_true", help="on an error, show the traceback instead of one line")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``canonreg ablate CONFIG [--out DIR] [--workers N] [--backend local|ray] [--resume/--no-resume] [--quick] [--debug]``.

    Prints the Markdown summary. Exit status: 0 when every run finished; 1 when some failed (see
    ``errors.jsonl``; they are retried on the next start); 2 for a bad flag, config or output folder
    (one line on stderr naming it; nothing ran or was written); 143 after SIGTERM, 130 after Ctrl-C
    (workers stopped; finished runs kept, the next start resumes). Warnings (e.g. damaged result
    lines moved aside) are one line each on stderr. ``--debug`` shows tracebacks instead.
    """
    from .cli import UsageError, check_out_dir, run_command

    argv = list(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        args = _parser().parse_args(argv)
        if args.out is not None:
            check_out_dir("--out", args.out, PROG)
        try:
            prepared = _prepare(args.config, out=args.out, workers=args.workers, backend=args.backend, quick=args.quick, progress=args.progress)
        except (ValueError, TypeError, OSError, ImportError) as e:
            raise UsageError(" ".join(str(e).split()), PROG) from e
        try:
            result = _run_prepared(*prepared, resume=args.resume, progress=args.progress, plots=args.plots)
        except Terminated as e:
            print(f"{PROG}: stopped by {signal.Signals(e.signum).name}; finished runs are kept, rerun to resume", file=sys.stderr)
            return int(e.code) if isinstance(e.code, int) else 143
        print(result.markdown)
        print()
        print(
            f"{len(result.configs)} runs: {result.new_runs} run now, {result.skipped_runs} already finished"
            + (f", {len(result.failures)} FAILED (see {result.out / 'errors.jsonl'})" if result.failures else "")
        )
        cpu = [r["result"].get("cpu_time_s") for r in result.records.values()]
        cpu_total = sum(c for c in cpu if isinstance(c, (int, float)))
        print(f"trial CPU time: {cpu_total:.0f} s in total over {len(result.records)} finished runs")
        if result.stale_runs:
            print(f"note: {len(result.stale_runs)} finished run(s) came from different canonreg code (--no-resume reruns them)")
        print(f"wrote {result.out / 'results.jsonl'}, {result.out / 'summary.md'}, {result.out / 'summary.csv'}"
              + (f" and {len(result.plots)} plot(s) in {result.out / 'plots'}" if result.plots else ""))  # fmt: skip
        return 1 if result.failures else 0

    return run_command(PROG, body, debug="--debug" in argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
