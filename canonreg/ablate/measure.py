"""A user measurement of every trained model, run in the worker: ``"package.module:function"``.

The runner trains each run with :func:`canonreg.experiment.run_trial` and stores its JSON metrics;
a measurement adds what those metrics do not hold (representations on other data, attacks, refits
of the monitor's matrices) without sending the model back to the parent. It is named by an
importable path, so that it reaches worker processes and Ray tasks as a string:

    ``function(trained, split, **args) -> dict``

with ``trained`` the :class:`~canonreg.experiment.TrainedTrial` (``trained.model`` in eval mode,
``trained.config`` the resolved :class:`~canonreg.experiment.TrialConfig`, ``trained.report`` the
monitor's last window), ``split`` the run's :class:`~canonreg.data.Split` and ``args`` the JSON
mapping given to :func:`~canonreg.ablate.run_ablation` (after a JSON round trip: tuples arrive as
lists). The returned dict is stored in the run's record under ``"measure"`` (made JSON-ready by
:func:`canonreg.stats.jsonable`: tensors → numbers, NaN/±inf → None).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import CanonRegError

Measure = Callable[..., Mapping[str, Any]]


class MeasureError(CanonRegError):
    """The measurement of a trained run raised or returned something that is not a JSON-able dict."""


def resolve_measure(path: Any) -> Measure:
    """The function named by ``"package.module:function"`` (``function`` may be ``Class.attr``).

    Raises:
        ValueError: ``path`` is not such a string, the module cannot be imported, or it has no
            callable of that name (the message names the argument ``measure``).
    """
    if not isinstance(path, str) or path.count(":") != 1:
        raise ValueError(f"Expected `measure` to be an importable path 'package.module:function', but got {path!r}")
    module_name, qualname = path.split(":")
    if not _dotted(module_name) or not _dotted(qualname):
        raise ValueError(f"Expected `measure` to be an importable path 'package.module:function', but got {path!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"Expected `measure` {path!r} to name an importable module, but importing {module_name!r} failed: {e}") from None
    for part in qualname.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"Expected `measure` {path!r} to name a function, but {module_name!r} has no attribute {qualname!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"Expected `measure` {path!r} to name a callable, but got a {type(obj).__name__}")
    return obj  # type: ignore[no-any-return]


def measure_args_json(args: Any) -> dict[str, Any]:
    """``args`` after a JSON round trip (what the worker receives and the record stores).

    Raises:
        ValueError: ``args`` is not a mapping with string keys of finite JSON values.
    """
    if args is None:
        return {}
    if not isinstance(args, Mapping) or not all(isinstance(k, str) for k in args):
        raise ValueError(f"Expected `measure_args` to be a mapping with string keys, but got {args!r}")
    try:
        return json.loads(json.dumps(dict(args), allow_nan=False))  # type: ignore[no-any-return]
    except (TypeError, ValueError) as e:
        raise ValueError(f"Expected `measure_args` to hold finite JSON values (numbers, strings, lists, dicts), but {e}") from None


def bound_measure(path: str, args: Mapping[str, Any]) -> Callable[[Any, Any], Mapping[str, Any]]:
    """``measure(trained, split)`` for :func:`~canonreg.experiment.run_trial`: the function at ``path``
    with ``args``, whose failures (an exception, a result that is not a JSON-able dict) raise
    :class:`MeasureError` naming ``path``."""
    from ..stats import jsonable

    fn = resolve_measure(path)

    def measure(trained: Any, split: Any) -> Mapping[str, Any]:
        try:
            out = fn(trained, split, **args)
        except Exception as e:
            raise MeasureError(f"measure {path!r} raised {type(e).__name__}: {e}") from e
        if not isinstance(out, Mapping):
            raise MeasureError(f"Expected measure {path!r} to return a dict, but got {type(out).__name__}")
        try:
            json.dumps(jsonable(out), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise MeasureError(f"Expected measure {path!r} to return a JSON-able dict, but {e}") from None
        return out

    return measure


def _dotted(name: str) -> bool:
    return bool(name) and all(part.isidentifier() for part in name.split("."))
