"""The ablation spec: a validated grid of :class:`~canonreg.experiment.TrialConfig` trials.

:class:`AblationSpec` holds the fixed values, the grid factors, the metrics, the figures and how to
run them; :func:`load_spec` reads it from TOML (keys: :mod:`canonreg.ablate`). The helpers at the end
(:func:`_acts`, :func:`_show`…) describe config values for the tables and plots.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..experiment import LAYER_METRIC_PREFIXES, STATIC_METRICS, TrialConfig, config_id, trial_defaults

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
    repeated = sorted({m for m in spec.metrics if spec.metrics.count(m) > 1})
    if repeated:
        raise ValueError(f"Expected each metric once in `ablation.metrics`, but {repeated} repeat")
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
    configs = spec.configs()  # validates every combination (messages name the field)
    factors = spec.factors
    named = [("ablation.metrics", m) for m in spec.metrics]
    if spec.plots is not None:
        for i, p in enumerate(spec.plots):
            _check_metric(f"plot[{i}].metric", p.metric)
            named.append((f"plot[{i}].metric", p.metric))
            if p.factor not in factors or p.factor in ("arm", "seed"):
                raise ValueError(
                    f"Expected `plot[{i}].factor` to be a grid factor other than 'arm' and 'seed' "
                    f"({[f for f in factors if f not in ('arm', 'seed')]}), but got {p.factor!r}"
                )
    _check_layer_metrics(named, configs)
    if spec.quick:
        try:
            spec.with_quick()
        except (TypeError, ValueError) as e:
            raise type(e)(f"In [quick]: {e}") from None


def _check_layer_metrics(named: Sequence[tuple[str, str]], configs: Sequence[TrialConfig]) -> None:
    """Per-layer metrics (``alpha@<layer>``: any weight layer; ``erank@``/``pcs95@``: a hidden one, i.e. not the
    first) name a layer of at least one of the grid's models (built from the configs, random init)."""
    layered = [(where, m) for where, m in named if m not in STATIC_METRICS]
    if not layered:
        return
    from ..experiment import build_model
    from ..layers import select_layers

    shapes: dict[tuple[Any, ...], list[str]] = {}
    for cfg in configs:
        key = (cfg.dataset, cfg.model, cfg.width, cfg.depth)
        if key not in shapes:
            shapes[key] = list(select_layers(build_model(cfg), None)[0])
    for where, m in layered:
        prefix = next(p for p in LAYER_METRIC_PREFIXES if m.startswith(p))
        layer = m[len(prefix) :]
        allowed = sorted({n for names in shapes.values() for n in (names if prefix == "alpha@" else names[1:])}, key=str)
        if layer not in allowed:
            raise ValueError(
                f"Expected `{where}` to name a layer of the grid's models ({prefix}<layer> with layer in {allowed}), "
                f"but got {m!r}"
            )


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


# ====================================================================== config values
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

