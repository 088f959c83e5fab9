"""Errors and argument checks shared by every canonreg component.

Every check raises with the argument's name, what was expected and what was received, e.g.
``Expected `weight_decay` to be a non-negative float, but got -0.1``.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar, cast

__all__ = [
    "CanonRegError",
    "check_choice",
    "check_nonnegative",
    "check_positive",
    "check_positive_int",
    "check_fraction",
    "check_bool",
    "check_nonnegative_int",
    "renamed_arguments",
]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class CanonRegError(RuntimeError):
    """Misuse of a canonreg lifecycle or of a model it was attached to.

    Raised, for example, by ``compute()`` before any backward pass, by a layer that recorded no
    samples, by non-finite statistics under the ``"error"`` policy, by attaching two monitors to
    one model, by a zero-width layer or a model on the meta device, or by
    ``CRHReport.mean_alignment(on_nan="error")`` over NaN entries. Every message names the layer
    (or argument) at fault. Bad argument *values* raise ``ValueError``/``TypeError`` instead.
    """


def check_choice(name: str, value: T, choices: Iterable[T]) -> T:
    """Return ``value`` if it is one of ``choices``, else raise a ValueError naming ``name``."""
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"Expected `{name}` to be one of {list(options)!r}, but got {value!r}")
    return value


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_nonnegative(name: str, value: Any) -> float:
    """Return ``float(value)`` if it is a finite real >= 0, else raise naming ``name``."""
    if not _is_real(value) or value < 0:
        raise ValueError(f"Expected `{name}` to be a non-negative float, but got {value!r}")
    return float(value)


def check_positive(name: str, value: Any) -> float:
    """Return ``float(value)`` if it is a finite real > 0, else raise naming ``name``."""
    if not _is_real(value) or value <= 0:
        raise ValueError(f"Expected `{name}` to be a positive float, but got {value!r}")
    return float(value)


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an int >= 1 (a numpy integer too; not a bool), else raise naming ``name``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive int, but got {value!r}")
    return int(value)


def check_fraction(name: str, value: Any, *, open_low: bool = True) -> float:
    """Return ``float(value)`` if it lies in (0, 1] (or [0, 1] with ``open_low=False``)."""
    ok = _is_real(value) and (value > 0 if open_low else value >= 0) and value <= 1
    if not ok:
        interval = "(0, 1]" if open_low else "[0, 1]"
        raise ValueError(f"Expected `{name}` to be a float in {interval}, but got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a ``bool``, else raise naming ``name`` (no truthiness coercion)."""
    if not isinstance(value, bool):
        raise TypeError(f"Expected `{name}` to be a bool, but got {value!r}")
    return value


def check_nonnegative_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an int >= 0 (a numpy integer too; not a bool), else raise naming ``name``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
        raise ValueError(f"Expected `{name}` to be a non-negative int, but got {value!r}")
    return int(value)


def check_seed(name: str, value: Any, also: str = "") -> int:
    """Return ``value`` if it is an int in ``[0, 2**64)`` (what ``torch.Generator.manual_seed`` takes), else raise
    naming ``name`` (``also``: e.g. a former name, shown after it)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**64:
        raise ValueError(f"Expected `{name}`{also} to be an int in [0, 2**64), but got {value!r}")
    return value


def check_keywords(name: str, kwargs: Mapping[str, Any] | None, fn: Callable[..., Any], *, taken: tuple[str, ...] = ()) -> None:
    """Raise naming ``name`` when ``kwargs`` holds a keyword ``fn`` does not take (or one in ``taken``, which the caller sets itself):
    e.g. a callback's option dicts, checked when it is made rather than at the first window of a run."""
    if not kwargs:
        return
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(k for k in kwargs if k not in params or k in taken or k == "self")
    if unknown:
        allowed = sorted(k for k in params if k not in taken and k != "self" and params[k].kind is not inspect.Parameter.VAR_POSITIONAL)
        raise TypeError(f"Expected `{name}` to hold keyword arguments of {fn.__qualname__} from {allowed}, but got {unknown}")


def renamed_arguments(**renames: str) -> Callable[[F], F]:
    """Accept old keyword names of a function for one deprecation cycle: ``@renamed_arguments(old="new")``.

    A call with ``old=v`` runs as ``new=v`` and emits a ``FutureWarning`` naming both (shown to end users
    by default, unlike ``DeprecationWarning``); passing both names raises a TypeError naming them.
    Example: ``@renamed_arguments(mode="preprocess")`` keeps ``second_moment(x, mode="centered")`` working.
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__qualname__}() got both `{old}` and its new name `{new}`; pass only `{new}`")
                    warnings.warn(
                        f"{fn.__qualname__}(): `{old}` is renamed `{new}`; the old name will be removed in a later release",
                        FutureWarning,
                        stacklevel=2,
                    )
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return cast(F, wrapper)

    return decorate
