"""Exception types: what the user can fix (InputError) versus everything else (DptoolError)."""

import math
import numbers

__all__ = ["DptoolError", "InputError", "check_number", "check_seed", "MAX_SEED"]


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


#: the largest seed every consumer takes (NumPy's generators, torch.manual_seed after dptool's arithmetic on it)
MAX_SEED = 2**32 - 1


def check_seed(flag: str, value) -> None:
    """Refuse a seed that is not an integer in [0, MAX_SEED], naming `flag` (NumPy refuses negative seeds, and
    torch and Numba overflow on very large ones, both deep inside a run)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= int(value) <= MAX_SEED:
        got = repr(value) if isinstance(value, str) else value
        raise InputError(f"{flag} must be an integer from 0 to {MAX_SEED}, got {got}.")
