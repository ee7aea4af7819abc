"""Class histograms: counts per class (1-D) and per (source class, target class) pair (2-D).

The CPU path is a Numba ``prange`` over contiguous chunks of the labels, each chunk counting into its own
row of a partial-histogram matrix (no atomics, no false sharing between threads), reduced at the end. The
GPU path (:mod:`._cuda`) privatises the histogram in shared memory. Out-of-range labels are detected in the
same single pass and reported afterwards, so checking costs no extra read of the data.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import njit, prange

from . import _checks
from ._device import on_device

__all__ = ["class_histogram", "joint_histogram"]

_MIN_CHUNK = 1 << 16  # labels per thread below which another thread costs more than it saves
_PARTIALS_BUDGET = 256 << 20  # bytes of per-thread partial histograms, whatever the thread count


def class_histogram(labels: Any, n_classes: int, *, weights: Any = None, device: str = "auto") -> Any:
    """Count how many labels fall in each class (or sum their weights), like ``np.bincount`` with checks.

    Parameters
    ----------
    labels : (N,) integer array, NumPy / CuPy / torch (CPU or CUDA)
        Class of each sample; every value must be in ``[0, n_classes)``. Any integer dtype; N may be 0.
    n_classes : int
        Number of classes (length of the result).
    weights : (N,) real array on the same device as ``labels``, optional
        Per-sample weight to sum instead of counting; must be finite.
    device : {"auto", "cpu", "cuda"}
        Where to compute; "auto" computes where ``labels`` lives.

    Returns
    -------
    (n_classes,) int64 counts, or float64 sums with ``weights``, as the same kind of array and on the same
    device as ``labels`` (NumPy in, NumPy out; CuPy in, CuPy out; torch in, torch out).

    Raises
    ------
    ValueError (``KernelInputError``)
        A label out of range, non-integer or non-1-D ``labels``, ``weights`` of another length or not finite.
    TypeError
        ``labels`` and ``weights`` on different devices.
    """
    n_classes = _checks.check_count("n_classes", n_classes)
    _checks.check_bins("n_classes", n_classes)
    with on_device({"labels": labels, "weights": weights}, device) as (where, arrays):
        xp = _xp(where)
        lab = _checks.as_labels(xp, arrays["labels"], "labels")
        w = None if weights is None else _checks.as_weights(xp, arrays["weights"], lab.shape[0])
        if where.target == "cuda":
            from . import _cuda

            counts, bad = _cuda.histogram(lab, None, w, n_classes, 1)
        else:
            counts, bad = _histogram_cpu(lab, None, w, n_classes, 1)
        if bad:
            raise _checks.label_range_error(lab, n_classes, "labels", "n_classes")
        return where.give_back(counts)


def joint_histogram(a: Any, b: Any, n_a: int, n_b: int, *, device: str = "auto") -> Any:
    """Count the pairs ``(a[i], b[i])``: a contingency table of source prediction × target label.

    Parameters
    ----------
    a : (N,) integer array, NumPy / CuPy / torch (CPU or CUDA)
        Row class of each sample, in ``[0, n_a)`` (e.g. the source class a surrogate predicts).
    b : (N,) integer array on the same device as ``a``
        Column class of each sample, in ``[0, n_b)`` (e.g. the target label).
    n_a, n_b : int
        Number of row and column classes.
    device : {"auto", "cpu", "cuda"}
        Where to compute; "auto" computes where ``a`` lives.

    Returns
    -------
    (n_a, n_b) int64 counts, as the same kind of array and on the same device as ``a``.

    Raises
    ------
    ValueError (``KernelInputError``)
        A value out of range, non-integer or non-1-D inputs, or ``a`` and ``b`` of different lengths.
    TypeError
        ``a`` and ``b`` on different devices.
    """
    n_a = _checks.check_count("n_a", n_a)
    n_b = _checks.check_count("n_b", n_b)
    _checks.check_bins("n_a x n_b", n_a * n_b)
    with on_device({"a": a, "b": b}, device) as (where, arrays):
        xp = _xp(where)
        left = _checks.as_labels(xp, arrays["a"], "a")
        right = _checks.as_labels(xp, arrays["b"], "b")
        if left.shape[0] != right.shape[0]:
            raise _checks.KernelInputError(
                f"a and b must have the same length, got {left.shape[0]} and {right.shape[0]}."
            )
        if left.dtype != right.dtype:  # one compiled variant per dtype, not per pair of dtypes
            left, right = left.astype(np.int64, copy=False), right.astype(np.int64, copy=False)
        if where.target == "cuda":
            from . import _cuda

            counts, bad = _cuda.histogram(left, right, None, n_a, n_b)
        else:
            counts, bad = _histogram_cpu(left, right, None, n_a, n_b)
        if bad:
            if left.shape[0] and (int(left.min()) < 0 or int(left.max()) >= n_a):
                raise _checks.label_range_error(left, n_a, "a", "n_a")
            raise _checks.label_range_error(right, n_b, "b", "n_b")
        return where.give_back(counts.reshape(n_a, n_b))


def _xp(where: Any) -> Any:
    if where.target == "cuda":
        from ._device import import_cupy

        return import_cupy()
    return np


# ------------------------------------------------------------------------------------------------- CPU path


def _histogram_cpu(a: np.ndarray, b: np.ndarray | None, w: np.ndarray | None, n_a: int, n_b: int):
    """Dispatch to the compiled kernels; returns (flat counts of length n_a * n_b, any label out of range)."""
    n = a.shape[0]
    bins = n_a * n_b
    itemsize = 8 * (bins + 1)
    chunks = max(1, min(numba.get_num_threads(), n // _MIN_CHUNK, _PARTIALS_BUDGET // itemsize))
    if b is None and w is None:
        counts, bad = _count_1d(a, n_a, chunks)
    elif b is None:
        counts, bad = _sum_1d(a, w, n_a, chunks)
    else:
        counts, bad = _count_2d(a, b, n_a, n_b, chunks)
    return counts, bad > 0


@njit(cache=True, parallel=True, nogil=True)
def _reduce(partial):  # pragma: no cover - compiled
    """Sum the rows of a (chunks, bins + 1) partial histogram; return the (bins,) totals and the last slot."""
    chunks, width = partial.shape
    out = np.zeros(width, partial.dtype)
    for j in prange(width):
        total = partial[0, j]
        for c in range(1, chunks):
            total += partial[c, j]
        out[j] = total
    return out[: width - 1], out[width - 1]


@njit(cache=True, parallel=True, nogil=True)
def _count_1d(labels, n, chunks):  # pragma: no cover - compiled
    size = labels.shape[0]
    step = (size + chunks - 1) // chunks
    partial = np.zeros((chunks, n + 1), np.int64)  # column n counts labels outside [0, n)
    for c in prange(chunks):
        row = partial[c]
        for i in range(c * step, min(size, (c + 1) * step)):
            v = np.int64(labels[i])
            row[v if (v >= 0 and v < n) else n] += 1
    return _reduce(partial)


@njit(cache=True, parallel=True, nogil=True)
def _sum_1d(labels, weights, n, chunks):  # pragma: no cover - compiled
    size = labels.shape[0]
    step = (size + chunks - 1) // chunks
    partial = np.zeros((chunks, n + 1), np.float64)
    bad = np.zeros(chunks, np.int64)
    for c in prange(chunks):
        row = partial[c]
        for i in range(c * step, min(size, (c + 1) * step)):
            v = np.int64(labels[i])
            if v >= 0 and v < n:
                row[v] += weights[i]
            else:
                bad[c] += 1
    sums, _ = _reduce(partial)
    return sums, bad.sum()


@njit(cache=True, parallel=True, nogil=True)
def _count_2d(a, b, n_a, n_b, chunks):  # pragma: no cover - compiled
    size = a.shape[0]
    step = (size + chunks - 1) // chunks
    bins = n_a * n_b
    partial = np.zeros((chunks, bins + 1), np.int64)
    for c in prange(chunks):
        row = partial[c]
        for i in range(c * step, min(size, (c + 1) * step)):
            u = np.int64(a[i])
            v = np.int64(b[i])
            ok = u >= 0 and u < n_a and v >= 0 and v < n_b
            row[u * n_b + v if ok else bins] += 1
    return _reduce(partial)
