"""Nearest-centroid assignment: for every row of ``x``, the index of and distance to its closest centroid.

Distances expand as ``‖x‖² − 2 x·c + ‖c‖²`` (cosine: ``1 − x·c / (‖x‖‖c‖)``), so the heavy work is one
float32 matrix product per tile of ``block_rows`` rows × at most ``_TILE_ELEMS / block_rows`` centroids
(BLAS sgemm on the CPU, cuBLAS on the GPU), followed by a fused compiled pass that turns the tile into
distances and keeps a running arg-min per row. Memory is bounded by the tile, never by N × K, and ``x`` is
read (and, if needed, converted to float32) one block of rows at a time.

Ties go to the smallest centroid index: the arg-min keeps the first strictly smaller distance while scanning
the centroids in index order. Because the expansion is evaluated in float32, a row whose two best distances
differ by less than float32 rounding (about ``1e-6 × (‖x‖² + ‖c‖²)``) may pick either of them; every other
row gets the same centroid as an exact computation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange

from . import _checks
from ._device import on_device

__all__ = ["nearest_centroid"]

_METRICS = ("l2", "cosine")
_TILE_ELEMS = 1 << 22  # float32 elements in one distance tile (16 MiB): the bound on working memory
DEFAULT_BLOCK_ROWS = 2048


def nearest_centroid(
    x: Any,
    centroids: Any,
    *,
    metric: str = "l2",
    device: str = "auto",
    block_rows: int = DEFAULT_BLOCK_ROWS,
) -> tuple[Any, Any]:
    """Assign each row of ``x`` to its nearest centroid; ties go to the smallest centroid index.

    Parameters
    ----------
    x : (N, D) real array, NumPy / CuPy / torch (CPU or CUDA)
        Feature vectors; computed in float32 (float16, float64 and integer inputs are converted one block of
        rows at a time, non-contiguous inputs are copied the same way; ``x`` itself is never modified).
        Must be finite. N may be 0.
    centroids : (K, D) real array on the same device as ``x``
        Centroids, K ≥ 1 (K = 0 is accepted only when N = 0). Must be finite.
    metric : {"l2", "cosine"}
        "l2": squared Euclidean distance ``‖x − c‖²`` (what faiss' ``IndexFlatL2`` returns), clamped at 0.
        "cosine": ``1 − cos(x, c)`` in [0, 2]; a zero row or zero centroid has cosine 0 with everything.
    device : {"auto", "cpu", "cuda"}
        Where to compute; "auto" computes where ``x`` lives.
    block_rows : int
        Rows per tile on the CPU (the GPU picks its own, larger tiles); trades BLAS efficiency for memory.

    Returns
    -------
    index : (N,) int64
        Index of the nearest centroid of each row.
    distance : (N,) float32
        Its distance under ``metric``.
    Both come back as the same kind of array and on the same device as ``x``.

    Raises
    ------
    ValueError (``KernelInputError``)
        Wrong ndim, mismatched dimensions D, non-finite values, an unknown metric, no centroids.
    TypeError
        ``x`` and ``centroids`` on different devices.
    """
    if metric not in _METRICS:
        choices = ", ".join(map(repr, _METRICS))
        raise _checks.KernelInputError(f"metric must be one of {choices}, got {metric!r}.")
    block_rows = _checks.check_count("block_rows", block_rows)
    if block_rows == 0:
        raise _checks.KernelInputError("block_rows must be a positive integer, got 0.")
    with on_device({"x": x, "centroids": centroids}, device) as (where, arrays):
        xs, cs = arrays["x"], arrays["centroids"]
        for name, arr in (("x", xs), ("centroids", cs)):
            if arr.ndim != 2:
                raise _checks.KernelInputError(
                    f"{name} must be 2-D with shape (rows, dims), got shape {tuple(arr.shape)}."
                )
        if xs.shape[1] != cs.shape[1]:
            raise _checks.KernelInputError(
                f"x and centroids must have the same number of columns, got {xs.shape[1]} and {cs.shape[1]}."
            )
        if xs.shape[0] and not cs.shape[0]:
            raise _checks.KernelInputError("centroids must have at least one row (K >= 1), got shape "
                                           f"{tuple(cs.shape)}.")
        if where.target == "cuda":
            from . import _cuda

            index, dist = _cuda.nearest(xs, cs, metric == "cosine")
        else:
            index, dist = _nearest_cpu(xs, cs, metric == "cosine", block_rows)
        return where.give_back(index), where.give_back(dist)


# ------------------------------------------------------------------------------------------------- CPU path


def _nearest_cpu(x: np.ndarray, c: np.ndarray, cosine: bool, block_rows: int) -> tuple[np.ndarray, ...]:
    """Blocked arg-min over ``x`` (any real dtype and layout, converted per block) and ``c`` (K, D)."""
    _checks.as_features(np, x[:0], "x")  # dtype check without touching the data
    cf = _checks.as_features(np, c, "centroids")
    if cosine:
        cf = cf.copy()  # normalised in place below; the caller's array is never written
    cb, bad = _centroid_terms(cf, cosine)
    if bad >= 0:
        raise _checks.bad_row_error(np, c, bad, "centroids")
    n, k = x.shape[0], cf.shape[0]
    index = np.zeros(n, np.int64)
    dist = np.zeros(n, np.float32)
    if n == 0:
        return index, dist
    rows = min(block_rows, n)
    cols = min(k, max(1, _TILE_ELEMS // rows))
    tile = np.empty(rows * cols, np.float32)
    best = np.empty(rows, np.float32)
    cft = cf.T
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        with np.errstate(over="ignore"):  # a float64 value beyond float32 is reported just below
            xb = np.ascontiguousarray(x[r0:r1], dtype=np.float32)  # a view unless x needs converting
        a, s, bad = _row_terms(xb, cosine)
        if bad >= 0:
            raise _checks.bad_row_error(np, x, r0 + bad, "x")
        best[:] = np.inf
        for c0 in range(0, k, cols):
            c1 = min(k, c0 + cols)
            g = tile[: (r1 - r0) * (c1 - c0)].reshape(r1 - r0, c1 - c0)
            np.matmul(xb, cft[:, c0:c1], out=g)
            _argmin_tile(g, s, cb[c0:c1], c0, best[: r1 - r0], index[r0:r1])
        _finish(a, best[: r1 - r0], cosine, dist[r0:r1])
    return index, dist


@njit(cache=True, nogil=True)
def _centroid_terms(c, cosine):  # pragma: no cover - compiled
    """Per-centroid term ``‖c‖²`` (L2), or normalise ``c`` in place and return zeros (cosine).

    Also returns the first row whose squared norm is not finite in float32 (NaN, Inf or overflow), else -1.
    """
    k, d = c.shape
    out = np.zeros(k, np.float32)
    for j in range(k):
        total = 0.0
        for t in range(d):
            v = np.float64(c[j, t])
            total += v * v
        if not np.isfinite(np.float32(total)):
            return out, j
        if not cosine:
            out[j] = np.float32(total)
        elif total > 0.0:
            inv = 1.0 / np.sqrt(total)
            for t in range(d):
                c[j, t] = np.float32(c[j, t] * inv)
    return out, -1


@njit(cache=True, parallel=True, nogil=True)
def _row_terms(xb, cosine):  # pragma: no cover - compiled
    """Per-row terms: ``a`` added after the arg-min and ``s`` scaling ``x·c``; plus the first bad row or -1.

    L2: ``d = ‖x‖² + (‖c‖² − 2 x·c)``: a = ‖x‖², s = −2. Cosine: ``d = 1 − x·ĉ / ‖x‖``: a = 1, s = −1/‖x‖.
    Squares are summed in float64, so a row is bad exactly when it holds NaN or ±Inf or its squared norm
    overflows float32.
    """
    n, d = xb.shape
    a = np.empty(n, np.float32)
    s = np.empty(n, np.float32)
    bad = np.zeros(n, np.bool_)
    for i in prange(n):
        total = 0.0
        for t in range(d):
            v = np.float64(xb[i, t])
            total += v * v
        bad[i] = not np.isfinite(np.float32(total))
        if cosine:
            a[i] = 1.0
            s[i] = -1.0 / np.sqrt(total) if total > 0.0 else 0.0
        else:
            a[i] = total
            s[i] = -2.0
    for i in range(n):
        if bad[i]:
            return a, s, i
    return a, s, -1


@njit(cache=True, parallel=True, nogil=True, fastmath=False)
def _argmin_tile(g, s, cb, c0, best, index):  # pragma: no cover - compiled
    """Fold one (rows, cols) tile of products into the running arg-min (strict <: first index wins)."""
    rows, cols = g.shape
    for i in prange(rows):
        si = s[i]
        bv = best[i]
        bi = index[i]
        for j in range(cols):
            v = cb[j] + si * g[i, j]
            if v < bv:
                bv = v
                bi = c0 + j
        best[i] = bv
        index[i] = bi


@njit(cache=True, nogil=True)
def _finish(a, best, cosine, out):  # pragma: no cover - compiled
    for i in range(a.shape[0]):
        v = a[i] + best[i]
        out[i] = max(v, np.float32(0.0)) if not cosine else min(max(v, np.float32(0.0)), np.float32(2.0))
