"""One-line errors for numeric options, config fields and command-line flags alike, before any work starts.

A negative epoch count or a zero repeat count should not surface minutes later as an assertion inside timm or a
``statistics`` error after a benchmark's first pass; these checks name the option, the allowed range and the value.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from numbers import Integral, Real
from typing import Any


def check_int(name: str, value: Any, minimum: int = 0) -> None:
    """ValueError unless ``value`` is an integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_number(
    name: str, value: Any, low: float = 0.0, high: float = math.inf, *, low_open: bool = False, high_open: bool = False
) -> None:
    """ValueError unless ``value`` is a finite number in the interval from ``low`` to ``high`` (closed unless
    ``low_open`` / ``high_open``)."""
    ok = not isinstance(value, bool) and isinstance(value, Real) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        raise ValueError(f"{name} must be a finite number {_interval(low, high, low_open, high_open)}, got {value!r}")


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    lower = f"{'>' if low_open else '>='} {low:g}"
    return lower if high == math.inf else f"{lower} and {'<' if high_open else '<='} {high:g}"


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum``, else argparse's one-line usage error naming the flag."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # what argparse shows if it ever names the type
    return parse
