"""What the recipes share: training one arm (with a model cache), the hidden representations of
a trained model, the seed statistics, the command-line layer and the result writers.

The four arms (baseline, AlignmentLoss, NoiseCalibrated, both) are defined once, in
:mod:`canonreg.experiment`; :func:`train` calls its :func:`~canonreg.experiment.train_trial` (the
loop every ablation shares, so a recipe's model is the model an ablation trains) and keeps the
trained model, which the compactness and robustness recipes evaluate further.

Interval over seeds (:func:`mean_ci`): with ``n`` seeds, mean ``m`` and sample standard deviation
``s``, the 95% interval is ``m ± t_{0.975, n−1} · s / √n`` (Student t; NaN half-width for ``n = 1``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import inspect
import json
import math
import os
import platform
import sys
import tempfile
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import numpy as np
import torch
from torch import Tensor, nn

from canonreg.data import Split
from canonreg.experiment import ARMS, TrialConfig, build_model, config_id, inner_layers, train_trial
from canonreg.layers import select_layers
from canonreg.measure import measure_crh, min_alignment

__all__ = [
    "STUDY_ARMS",
    "ARM_COLORS",
    "TRIAL_FIELDS",
    "Trained",
    "trial_config",
    "train",
    "hidden_representations",
    "mean_ci",
    "fmt_ci",
    "fmt_diff",
    "markdown_table",
    "parse_config",
    "environment",
    "write_json",
    "check_arms",
    "check_seeds",
    "progress_line",
]

#: The arms the γ-scaling, PAH, universality and transformer studies compare by default: the four of
#: the original ablation. The ``crh`` arm (the joint CRH objective, ~10× a plain step) is added with
#: ``--arms ... crh``; the compactness and robustness recipes run every arm.
STUDY_ARMS: tuple[str, ...] = ("baseline", "loss", "noise", "both")

#: One colour per arm in every figure.
ARM_COLORS: dict[str, str] = {"baseline": "tab:gray", "loss": "tab:blue", "noise": "tab:orange", "both": "tab:green", "crh": "tab:red"}

#: The :class:`~canonreg.experiment.TrialConfig` fields a recipe config may carry (same names).
TRIAL_FIELDS: tuple[str, ...] = (
    "num_samples", "data_seed", "width", "depth", "optimizer", "lr", "momentum", "weight_decay",
    "noise", "loss_weight", "relations", "loss_metric", "batch_size", "steps", "preprocess", "metric",
    "eval_every", "monitor_every",
)  # fmt: skip

C = TypeVar("C")


def trial_config(cfg: object, arm: str, seed: int) -> TrialConfig:
    """The MLP-on-mnist1d :class:`TrialConfig` of ``arm`` and ``seed`` under a recipe config ``cfg``.

    Every field of :data:`TRIAL_FIELDS` that ``cfg`` has is copied, so all arms share one budget
    (steps × batch size), one dataset and one initialisation per seed. ``loss_weight`` is the
    ``loss``/``both`` arms' λ; the ``crh`` arm runs the :func:`canonreg.crh_loss` preset at its own
    weight (``crh_weight`` when ``cfg`` has one, else the preset's).
    """
    kw = {f: getattr(cfg, f) for f in TRIAL_FIELDS if hasattr(cfg, f)}
    if arm == "crh":
        kw["loss_weight"] = getattr(cfg, "crh_weight", None)
    return TrialConfig(arm=arm, seed=seed, dataset="mnist1d", model="mlp", n_bootstrap=0, **kw)


@dataclass(frozen=True)
class Trained:
    """A trained arm.

    Attributes:
        model: the trained network (eval mode).
        mean_alpha: mean CRH alignment α over layers and relations, measured after training over the
            whole training split with the task loss's gradient only (:func:`canonreg.measure_crh`;
            ``preprocess`` and ``metric`` of the config).
        alpha: ``alpha[layer][relation]`` of that report (NaN where undefined).
        min_alpha_inner: minimum α over the six relations and the inner layers (all but the first
            and the head), same measurement.
        train_loss: mean task (cross-entropy) loss over that window.
        seconds: wall time of the training loop (of the original run when ``cached``).
        cached: whether the model was loaded from the model cache instead of trained.
    """

    model: nn.Module
    mean_alpha: float
    alpha: dict[str, dict[str, float]]
    train_loss: float
    seconds: float
    min_alpha_inner: float = float("nan")
    cached: bool = False


def train(cfg: TrialConfig, split: Split, *, cache: bool = True) -> Trained:
    """Train one arm with :func:`canonreg.experiment.train_trial` (the loop every ablation and recipe
    shares: ``steps`` optimizer steps on ``CE(f(x), y) (+ align(task))``, the same data, initialisation
    and batch order in every arm) and keep what the recipes need.

    Model cache: the compactness and robustness recipes train identical arms, so with ``cache`` the
    trained weights and window statistics are stored under ``$CANONREG_CACHE_DIR/models`` (default
    ``~/.cache/canonreg/models``; ``CANONREG_CACHE_DIR=off`` disables it) and reused, keyed by the
    resolved config (:func:`~canonreg.experiment.config_id`), the data, the torch version, the
    thread count and the source code of the canonreg modules training uses and of this function, so
    that a change to any of them retrains.

    Args:
        cfg: the trial (resolved first).
        split: the data of ``cfg`` (``canonreg.experiment.load_data(cfg)``).
        cache: read and write the model cache.

    Raises:
        FloatingPointError: when the task loss becomes non-finite.
    """
    cfg = cfg.resolved()
    path = _cache_file(cfg, split) if cache else None
    if path is not None and path.exists():
        try:
            return _load_trained(cfg, path)
        except Exception:  # a corrupt or foreign cache entry is retrained
            pass
    t = train_trial(cfg, data=split)
    post = measure_crh(t.model, split.x, split.y, preprocess=cfg.preprocess, metric=cfg.metric)  # type: ignore[arg-type]
    inner = inner_layers(post.layers)
    min_inner = min_alignment(post, inner) if inner else float("nan")
    trained = Trained(t.model, post.mean_alignment(), post.alignment, t.train_loss, t.seconds, min_inner)
    if path is not None:
        _save_trained(trained, path)
    return trained


#: The canonreg modules whose source decides what :func:`train` computes (part of the cache key).
_TRAINING_MODULES: tuple[str, ...] = tuple(
    f"canonreg.{m}" for m in ("experiment", "measure", "losses", "optim", "models", "monitor", "report", "functional", "layers", "taps", "errors")
)


def _cache_file(cfg: TrialConfig, split: Split) -> Path | None:
    root = os.environ.get("CANONREG_CACHE_DIR", str(Path.home() / ".cache" / "canonreg"))
    if root.lower() == "off":
        return None
    h = hashlib.sha256()
    h.update(config_id(cfg).encode())
    h.update(f"{torch.__version__}|{torch.get_num_threads()}|{tuple(split.x.shape)}".encode())
    for t in (split.x, split.y, split.x_test, split.y_test):
        h.update(t.contiguous().numpy().tobytes())
    for module in _TRAINING_MODULES:
        h.update(inspect.getsource(importlib.import_module(module)).encode())
    h.update(inspect.getsource(train).encode())
    return Path(root) / "models" / f"{h.hexdigest()[:24]}.pt"


def _save_trained(trained: Trained, path: Path) -> None:
    record = {
        "state_dict": trained.model.state_dict(),
        "mean_alpha": trained.mean_alpha,
        "alpha": trained.alpha,
        "train_loss": trained.train_loss,
        "seconds": trained.seconds,
        "min_alpha_inner": trained.min_alpha_inner,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        torch.save(record, tmp)
        os.replace(tmp, path)
    except OSError:  # an unwritable cache only costs time
        pass


def _load_trained(cfg: TrialConfig, path: Path) -> Trained:
    record = torch.load(path, weights_only=True)
    model = build_model(cfg)
    model.load_state_dict(record["state_dict"])
    model.eval()
    return Trained(
        model, float(record["mean_alpha"]), record["alpha"], float(record["train_loss"]), float(record["seconds"]),
        float(record["min_alpha_inner"]), cached=True,
    )


@torch.no_grad()
def hidden_representations(model: nn.Module, x: Tensor, *, logits: bool = False) -> dict[str, Tensor]:
    """The hidden representations of ``model`` on ``x``: the input ``h_a`` of every weight layer
    after the first, keyed ``"h1", "h2", …`` in forward order (for the MLP ``Linear → ReLU → …`` these
    are the post-ReLU activations of hidden layers 1, 2, …, the ``H_a`` of spec §1).

    Args:
        model: a network whose weight layers canonreg can tap.
        x: ``(n, d_in)`` inputs.
        logits: also return the model output under the key ``"logits"``.

    Returns:
        ``{name: (n, d) float32 tensor}``.
    """
    layers, taps, _ = select_layers(model, None)
    names = list(layers)[1:]
    captured: dict[str, Tensor] = {}
    handles = []
    for i, name in enumerate(names, start=1):

        def pre_hook(module: nn.Module, inputs: tuple[object, ...], _key: str = f"h{i}", _tap: Any = taps[name]) -> None:
            captured[_key] = _tap.input_rows(module, inputs).detach().float()

        handles.append(layers[name].register_forward_pre_hook(pre_hook))
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    if logits:
        captured["logits"] = out.detach().float()
    return captured


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and 95% Student-t half-width over seeds, ``t_{0.975, n−1} · s / √n``.

    Non-finite values are dropped first. Returns ``(nan, nan)`` without finite values and
    ``(mean, nan)`` for a single one.
    """
    from scipy import stats

    v = np.asarray([float(a) for a in values], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan
    if v.size == 1:
        return float(v[0]), math.nan
    half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return float(v.mean()), half


def fmt_ci(values: Sequence[float], digits: int = 3, scale: float = 1.0) -> str:
    """``"m ± h"`` of :func:`mean_ci` (values multiplied by ``scale``), ``"m"`` for one seed."""
    m, h = mean_ci([scale * float(v) for v in values])
    if math.isnan(m):
        return "nan"
    return f"{m:.{digits}f}" if math.isnan(h) else f"{m:.{digits}f} ± {h:.{digits}f}"


def fmt_diff(values: Sequence[float], reference: Sequence[float], digits: int = 3, scale: float = 1.0) -> str:
    """Paired difference over seeds, ``"m ± h"`` of :func:`mean_ci` of ``scale·(v_s − r_s)``.

    ``values`` and ``reference`` are per-seed results in the same seed order (same initialisation
    and batch order in every arm, so the pairing removes the seed-to-seed spread). A trailing ``*``
    marks an interval that excludes 0.
    """
    if len(values) != len(reference):
        raise ValueError(f"Expected `values` and `reference` of equal length, but got {len(values)} and {len(reference)}")
    d = [scale * (float(a) - float(b)) for a, b in zip(values, reference)]
    m, h = mean_ci(d)
    if math.isnan(m):
        return "nan"
    if math.isnan(h):
        return f"{m:+.{digits}f}"
    return f"{m:+.{digits}f} ± {h:.{digits}f}" + (" *" if abs(m) > h else "")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def parse_config(cls: type[C], argv: Sequence[str] | None, quick: Mapping[str, Any], description: str) -> C:
    """Build the frozen recipe config ``cls`` from the command line.

    One option per dataclass field (``--field-name``), typed from the field's annotation: ``bool``
    gets ``--x/--no-x`` (``BooleanOptionalAction``), ``tuple[T, ...]`` takes one or more values,
    ``Literal[...]`` restricts the choices, ``float | str`` (e.g. ``noise``: a float or ``"auto"``)
    parses a number when it can. ``--quick`` replaces the defaults by ``quick`` (the CI setting);
    options given explicitly win over both. The dataclass validates the result.
    """
    hints = get_type_hints(cls)
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        flag = "--" + f.name.replace("_", "-")
        hint, default = hints[f.name], f.default
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        if hint is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"(default {shown})")
        elif get_origin(hint) is tuple:
            item, choices = _arg_type(get_args(hint)[0] if get_args(hint) else str, None)
            p.add_argument(flag, nargs="+", type=item, choices=choices, default=None, help=f"(default {shown})")
        else:
            kind, choices = _arg_type(hint, default)
            p.add_argument(flag, type=kind, choices=choices, default=None, help=f"(default {shown})")
    args = vars(p.parse_args(argv))
    values: dict[str, Any] = {}
    if args.get("quick"):
        values.update(quick)
        values["quick"] = True
    for name, v in args.items():
        if v is not None:
            values[name] = tuple(v) if isinstance(v, list) else v
    return cls(**values)


def _arg_type(hint: Any, default: Any) -> tuple[Callable[[str], Any], list[Any] | None]:
    """``(parser, choices)`` for one annotation (see :func:`parse_config`)."""
    origin = get_origin(hint)
    if origin is Literal:
        return str, list(get_args(hint))
    if origin in (Union, types.UnionType):
        members = [a for a in get_args(hint) if a is not type(None)]
        if len(members) == 1:
            return _arg_type(members[0], default)
        if float in members and str in members:
            return _float_or_str, None
    if hint in (int, float, str):
        return hint, None
    return type(default), None


def _float_or_str(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def environment() -> dict[str, Any]:
    """Versions and thread count, stored beside every result."""
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON (NaN/inf written as null)."""
    path.write_text(json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")


def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(dataclasses.asdict(x))
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic,)):
        return _jsonable(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def check_arms(arms: Sequence[str]) -> None:
    """Raise a ValueError naming ``arms`` unless it is a non-empty subset of ``ARMS`` without repeats."""
    if not arms or any(a not in ARMS for a in arms) or len(set(arms)) != len(arms):
        raise ValueError(f"Expected `arms` to be distinct names from {list(ARMS)}, but got {list(arms)!r}")


def check_seeds(seeds: Sequence[int]) -> None:
    """Raise a ValueError naming ``seeds`` unless they are distinct non-negative ints."""
    if not seeds or any(not isinstance(s, int) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"Expected `seeds` to be distinct non-negative ints, but got {list(seeds)!r}")


def progress_line(arm: str, seed: int, trained: Trained, extra: Callable[[], str] = lambda: "") -> str:
    """One line per finished arm/seed for the console."""
    how = "cached" if trained.cached else f"{trained.seconds:.1f}s"
    return (
        f"  {arm:<8} seed={seed}  train-loss={trained.train_loss:.3f}  α={trained.mean_alpha:.3f}  "
        f"min α inner={trained.min_alpha_inner:.3f}  {extra()}  ({how})"
    )
