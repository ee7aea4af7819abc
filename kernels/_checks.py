"""Argument checks shared by the kernels: one-sentence ``KernelInputError`` (a ``ValueError``) per mistake.

Every check works on NumPy and CuPy arrays alike (``xp`` is the array module of the input). Checks that need
a pass over the data (label range, finite features) are fused into the kernels; the helpers here only build
their messages once a kernel reports a problem.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from ._device import KernelInputError

__all__ = [
    "as_features",
    "as_labels",
    "as_weights",
    "bad_row_error",
    "check_bins",
    "check_count",
    "label_range_error",
    ]

# Integer dtypes the compiled kernels take as they are; every other integer dtype is widened to int64.
NATIVE_LABEL_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


def check_count(name: str, value: Any) -> int:
    """Return ``value`` as an int if it is a non-negative integer (not a bool)."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral) or value < 0:
        raise KernelInputError(f"{name} must be a non-negative integer, got {value!r}.")
    return int(value)


MAX_BINS = 2**31  # 16 GiB of int64 counts: far beyond any class count, and short of overflowing index math


def check_bins(what: str, bins: int) -> None:
    """Refuse a histogram of more than `MAX_BINS` bins, which would not fit in memory (or overflow)."""
    if bins > MAX_BINS:
        raise KernelInputError(f"{what} = {bins} bins is more than the {MAX_BINS} a histogram may have "
                               f"({bins * 8 / 2**30:.3g} GiB of counts).")


def as_labels(xp: Any, labels: Any, name: str) -> Any:
    """Return ``labels`` as a contiguous 1-D int32 or int64 array (a copy only when needed)."""
    if labels.ndim != 1:
        raise KernelInputError(f"{name} must be 1-D with shape (N,), got shape {tuple(labels.shape)}.")
    if labels.shape[0] == 0 and labels.dtype.kind in "fb":  # np.asarray([]) is float64: accept, as bincount does
        labels = labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise KernelInputError(f"{name} must have an integer dtype, got {labels.dtype}.")
    if labels.dtype == np.uint64 and labels.shape[0] and int(labels.max()) > np.iinfo(np.int64).max:
        raise KernelInputError(f"{name} must be class indices, got {int(labels.max())}.")
    if labels.dtype not in NATIVE_LABEL_DTYPES:
        labels = labels.astype(np.int64)
    return xp.ascontiguousarray(labels)


def as_weights(xp: Any, weights: Any, n: int) -> Any:
    """Return ``weights`` as a contiguous 1-D float64 array of length ``n`` with finite values."""
    if weights.ndim != 1 or weights.shape[0] != n:
        raise KernelInputError(f"weights must have shape ({n},) like labels, got {tuple(weights.shape)}.")
    if not (np.issubdtype(weights.dtype, np.floating) or np.issubdtype(weights.dtype, np.integer)):
        raise KernelInputError(f"weights must have a real numeric dtype, got {weights.dtype}.")
    weights = xp.ascontiguousarray(weights, dtype=np.float64)
    if n and not bool(xp.isfinite(weights).all()):
        raise KernelInputError(f"weights must be finite, got {_first_nonfinite(xp, weights)}.")
    return weights


def as_features(xp: Any, x: Any, name: str) -> Any:
    """Return ``x`` as a contiguous 2-D float32 array (a copy only when the dtype or layout needs one)."""
    if x.ndim != 2:
        raise KernelInputError(f"{name} must be 2-D with shape (rows, dims), got shape {tuple(x.shape)}.")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise KernelInputError(f"{name} must have a real numeric dtype (float32 preferred), got {x.dtype}.")
    with np.errstate(over="ignore"):  # values beyond float32 become inf and are reported by the kernels
        return xp.ascontiguousarray(x, dtype=np.float32)


def label_range_error(labels: Any, n: int, name: str, count_name: str) -> KernelInputError:
    """Build the error for labels outside ``[0, n)``, naming the offending value."""
    low, high = int(labels.min()), int(labels.max())
    bad = low if low < 0 else high
    return KernelInputError(f"{name} must be in [0, {count_name}) = [0, {n}), got {bad}.")


def bad_row_error(xp: Any, x: Any, row: int, name: str) -> KernelInputError:
    """The error for row ``row`` of ``x``: it holds NaN or Inf, or its squared norm overflows float32."""
    values = xp.asarray(x[row], dtype=np.float64)
    if bool(xp.isfinite(values).all()):
        return KernelInputError(f"{name} row {row} is too large: its squared norm overflows float32 "
                                "(about 3.4e38); rescale the features.")
    return KernelInputError(f"{name} must be finite, got {_first_nonfinite(xp, values)} in row {row}.")


def _first_nonfinite(xp: Any, x: Any) -> str:
    flat = xp.ravel(x)
    bad = xp.flatnonzero(~xp.isfinite(flat))
    where = np.unravel_index(int(bad[0]), x.shape)
    index = where[0] if len(where) == 1 else tuple(int(i) for i in where)
    return f"{float(flat[int(bad[0])])} at index {index}"
