"""Checks of values that users give, and what they say when a value is wrong.

One definition of "a positive integer" or "a number in [0, 1)" for the training settings
(``cnn.config``, ``params.yaml``), the layers' sizes and the optimizers' hyperparameters.
A checker returns what is wrong with a value ("must be ...; got ...") or None;
:func:`require` turns that into a ValueError.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable

Checker = Callable[[Any], "str | None"]


def is_int(v) -> bool:
    """An int of any kind (NumPy's too), but not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A finite real number of any kind (NumPy's too), but not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def show(v) -> str:
    return repr(v) if not isinstance(v, str) else f"'{v}'"


def type_name(v) -> str:
    """The name of ``v``'s type, in full where it is neither the engine's nor built in:
    ``Linear``, ``list``, ``torch.nn.modules.linear.Linear``."""
    t = type(v)
    return t.__name__ if t.__module__.split(".")[0] in ("cnn", "builtins") else f"{t.__module__}.{t.__qualname__}"


def counted(n: int, noun: str) -> str:
    """``1 epoch``, ``3 epochs``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def require(value, what: str, check: Checker):
    """``value`` if ``check`` finds nothing wrong with it, else ValueError("<what> must be ...")."""
    problem = check(value)
    if problem:
        raise ValueError(f"{what} {problem}")
    return value


def choice(options) -> Checker:
    def check(v):
        return None if v in options else f"must be one of {', '.join(options)}; got {show(v)}"

    return check


def integer(minimum: int) -> Checker:
    def check(v):
        if is_int(v) and v >= minimum:
            return None
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        return f"must be {what}; got {show(v)}"

    return check


def number(low: float, *, low_open: bool, high: float | None = None, high_open: bool = True) -> Checker:
    def check(v):
        ok = is_number(v) and (v > low if low_open else v >= low)
        if ok and high is not None:
            ok = v < high if high_open else v <= high
        if ok:
            return None
        if high is None:
            what = "a positive number" if (low == 0 and low_open) else f"a number >= {low}"
        else:
            what = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        return f"must be {what}; got {show(v)}"

    return check


def boolean(v):
    return None if isinstance(v, bool) else f"must be true or false; got {show(v)}"
