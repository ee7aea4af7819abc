"""Exception types: what the user can fix (InputError) versus everything else (DptoolError)."""

import math
import numbers

__all__ = ["DptoolError", "InputError", "check_number"]


class DptoolError(Exception):
    """Base class of dptool's errors; the CLI prints the message in one sentence and exits 1."""


class InputError(DptoolError):
    """A bad file, value or option that the user can fix; the CLI exits 2."""


def check_number(flag: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """Refuse a value that is not a finite number within [low, high] (ends open as asked), naming `flag`.

    Click's ranges let NaN through (every comparison with it is false); so would a plain `value <= 0` test."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        left = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        right = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        bound = " and ".join(b for b in (left, right) if b)
        got = repr(value) if isinstance(value, str) else value
        raise InputError(f"{flag} must be a finite number{' ' + bound if bound else ''}, got {got}.")
