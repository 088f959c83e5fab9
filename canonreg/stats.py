"""Statistics over seeds and run metadata, shared by the ablation runner, the demo, recipes and benchmarks.

Interval over seeds: with ``n`` finite values ``x_1 … x_n``, mean ``m = Σx_i/n`` and sample standard
deviation ``s = √(Σ(x_i − m)²/(n − 1))``, the two-sided ``level`` Student-t interval is

    m ± t_{(1+level)/2, n−1} · s / √n        (:func:`mean_ci`; no interval for ``n = 1``)

with ``t_{p, ν}`` the ``p`` quantile of Student's t with ``ν`` degrees of freedom (:func:`t_quantile`,
``scipy.stats.t.ppf``). A *paired* difference (:func:`paired_ci`) applies the same interval to
``d_s = scale · (v_s − r_s)`` over seeds ``s`` run with the same initialisation and batch order in both
arms, which removes the seed-to-seed spread from the comparison.

Run metadata: :func:`environment` (versions, threads, CPU, load, git commit, a fingerprint of
canonreg's sources), :func:`jsonable` / :func:`write_json` (strict JSON of NumPy, torch, dataclasses and
paths; NaN/inf become ``null``) and :func:`progress_bar` (tqdm, or a no-op stand-in).

Example:
    >>> iv = mean_ci([1.0, 2.0, 3.0])
    >>> round(iv.half_width, 4)  # t_{0.975, 2} · 1 / √3
    2.4841
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "Interval",
    "t_quantile",
    "mean_ci",
    "mean_half_width",
    "paired_differences",
    "paired_ci",
    "format_interval",
    "fmt_ci",
    "fmt_diff",
    "code_fingerprint",
    "git_commit",
    "environment",
    "jsonable",
    "write_json",
    "NoBar",
    "progress_bar",
]


# ====================================================================== Student-t intervals
def t_quantile(p: float, df: int) -> float:
    """Quantile ``t_{p, ν}`` of Student's t distribution, ``p`` in (0, 1), integer ``ν = df >= 1``.

    ``t_quantile(0.975, 4) ≈ 2.7764`` (the 95% two-sided value for five samples).

    Raises:
        ValueError: ``p`` outside (0, 1) or ``df`` not a positive int.
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1:
        raise ValueError(f"Expected `p` to be a float in (0, 1), but got {p!r}")
    if not isinstance(df, int) or isinstance(df, bool) or df < 1:
        raise ValueError(f"Expected `df` to be a positive int, but got {df!r}")
    from scipy import stats

    return float(stats.t.ppf(float(p), df))


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` finite values with the Student-t interval ``[low, high]`` (NaN bounds for ``n < 2``)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        """``t · s/√n``; NaN without an interval."""
        return 0.5 * (self.high - self.low)

    def excludes_zero(self) -> bool:
        """True when the interval exists and does not contain 0 (a difference resolved from noise)."""
        return self.n >= 2 and (self.low > 0 or self.high < 0)


def _finite(values: Sequence[Any]) -> list[float]:
    out = []
    for v in values:
        if v is None:
            continue
        x = float(v)
        if math.isfinite(x):
            out.append(x)
    return out


def mean_ci(values: Sequence[Any], level: float = 0.95) -> Interval:
    """``m ± t_{(1+level)/2, n−1} · s/√n`` over the finite entries of ``values`` (NaN/inf/None are dropped).

    Args:
        values: per-seed results (floats, ints, NumPy or 0-d tensor scalars, ``None``).
        level: two-sided coverage in (0, 1).

    Returns:
        :class:`Interval`; ``n = 0`` gives NaN everywhere, ``n = 1`` the value with NaN bounds.
    """
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ValueError(f"Expected `level` to be a float in (0, 1), but got {level!r}")
    xs = _finite(values)
    n = len(xs)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    m = math.fsum(xs) / n
    if n == 1:
        return Interval(m, math.nan, math.nan, 1)
    s = math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (n - 1))
    h = t_quantile(0.5 + level / 2, n - 1) * s / math.sqrt(n)
    return Interval(m, m - h, m + h, n)


def mean_half_width(values: Sequence[Any], level: float = 0.95) -> tuple[float, float]:
    """``(mean, half-width)`` of :func:`mean_ci` (half-width NaN for one value, both NaN for none)."""
    iv = mean_ci(values, level)
    return iv.mean, iv.half_width


def paired_differences(values: Sequence[Any], reference: Sequence[Any], *, scale: float = 1.0) -> list[float]:
    """``[scale · (v_s − r_s)]`` over seeds ``s`` (both sequences in the same seed order).

    Raises:
        ValueError: the sequences differ in length.
    """
    if len(values) != len(reference):
        raise ValueError(f"Expected `values` and `reference` of equal length, but got {len(values)} and {len(reference)}")
    return [scale * (_as_float(a) - _as_float(b)) for a, b in zip(values, reference)]


def _as_float(v: Any) -> float:
    return math.nan if v is None else float(v)


def paired_ci(values: Sequence[Any], reference: Sequence[Any], level: float = 0.95, *, scale: float = 1.0) -> Interval:
    """:func:`mean_ci` of :func:`paired_differences` (a seed missing in either arm is dropped)."""
    return mean_ci(paired_differences(values, reference, scale=scale), level)


def format_interval(iv: Interval, digits: int = 3, *, signed: bool = False, mark: bool = False, significant: bool = False) -> str:
    """``"m ± h"`` (``"m"`` for one value, ``"nan"`` for none).

    Args:
        digits: decimals (or significant digits of ``m`` when ``significant``; ``h`` then gets 2).
        signed: always print the sign of ``m`` (differences).
        mark: append ``" *"`` when the interval excludes 0.
    """
    if math.isnan(iv.mean):
        return "nan"
    sign = "+" if signed else ""
    m = f"{iv.mean:{sign}.{digits}g}" if significant else f"{iv.mean:{sign}.{digits}f}"
    if math.isnan(iv.half_width):
        return m
    h = f"{iv.half_width:.2g}" if significant else f"{iv.half_width:.{digits}f}"
    return f"{m} ± {h}" + (" *" if mark and iv.excludes_zero() else "")


def fmt_ci(values: Sequence[Any], digits: int = 3, scale: float = 1.0) -> str:
    """:func:`format_interval` of :func:`mean_ci` of ``scale · values``."""
    return format_interval(mean_ci([scale * _as_float(v) for v in values]), digits)


def fmt_diff(values: Sequence[Any], reference: Sequence[Any], digits: int = 3, scale: float = 1.0) -> str:
    """Signed ``"m ± h"`` of :func:`paired_ci`, with a trailing ``" *"`` when the interval excludes 0."""
    return format_interval(paired_ci(values, reference, scale=scale), digits, signed=True, mark=True)


# ====================================================================== run metadata
def code_fingerprint() -> str:
    """SHA-256 (16 hex) of canonreg's own ``.py`` sources: which code produced a result.

    Stored with every ablation record; resuming warns when finished runs came from different code.
    """
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def git_commit(path: str | Path | None = None) -> str | None:
    """The commit checked out at ``path`` (default: canonreg's source tree), ``+dirty`` if modified; None without git."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(*, git: bool = True) -> dict[str, Any]:
    """Where a result was produced, stored beside it.

    Keys: ``python``, ``torch``, ``numpy``, ``canonreg``, ``code`` (:func:`code_fingerprint`),
    ``git`` (:func:`git_commit`, None outside a checkout or with ``git=False``), ``platform``,
    ``cpu``, ``cpu_count``, ``torch_threads``, ``load_average`` (1/5/15 min, None where unavailable),
    ``cuda_device`` (None without CUDA).
    """
    from . import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "canonreg": __version__,
        "code": code_fingerprint(),
        "git": git_commit() if git else None,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def jsonable(x: Any) -> Any:
    """``x`` as plain JSON data: mappings (keys as str), sequences → lists, dataclasses → dicts,
    tensors and NumPy arrays/scalars → Python numbers or nested lists, paths → str, enums → value,
    sets → sorted lists, NaN/±inf → None."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return jsonable(dataclasses.asdict(x))
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (set, frozenset)):
        return sorted((jsonable(v) for v in x), key=repr)
    if isinstance(x, torch.Tensor):
        return jsonable(x.item() if x.numel() == 1 and x.dim() == 0 else x.tolist())
    if isinstance(x, (np.ndarray, np.generic)):
        return jsonable(x.tolist())
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, enum.Enum):
        return jsonable(x.value)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> None:
    """Write :func:`jsonable` ``obj`` as strict JSON (``allow_nan=False``) with a trailing newline."""
    Path(path).write_text(json.dumps(jsonable(obj), indent=indent, allow_nan=False) + "\n", encoding="utf-8")


# ====================================================================== progress
class NoBar:
    """Stands in for a tqdm bar when progress is off (every method is a no-op)."""

    def update(self, n: float = 1) -> None: ...
    def set_postfix(self, *args: object, **kwargs: object) -> None: ...
    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None: ...
    def set_description(self, desc: str | None = None, refresh: bool = True) -> None: ...
    def close(self) -> None: ...

    def __enter__(self) -> NoBar:
        return self

    def __exit__(self, *exc: object) -> None: ...


def progress_bar(total: int, enabled: bool = True, *, desc: str = "", unit: str = "it", **kwargs: Any) -> Any:
    """A ``tqdm`` bar over ``total`` units (extra keywords go to tqdm), or :class:`NoBar` when not ``enabled``.

    Raises:
        ImportError: ``enabled`` without tqdm installed (before anything runs).
    """
    if not enabled:
        return NoBar()
    try:
        from tqdm import tqdm
    except ImportError as e:
        raise ImportError(f"progress bars need tqdm: pip install 'canonreg[recipes]' (or turn progress off); {sys.exc_info()[1]}") from e
    return tqdm(total=total, desc=desc, unit=unit, **kwargs)
