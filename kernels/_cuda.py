"""CuPy implementations of the kernels: shared-memory histograms and a cuBLAS + fused arg-min nearest centroid.

Imported only on the GPU path, by the public functions in :mod:`.histogram` and :mod:`.nearest`, after the
inputs are CuPy arrays on the current device and the current stream is the caller's (torch's for torch
inputs). Kernels are compiled by NVRTC on first use; CuPy caches the binaries on disk and loads them once per
device. Everything here is launched on the current stream and only synchronises to report input errors.
"""

from __future__ import annotations

import functools
from typing import Any

import cupy
import numpy as np

from . import _checks
from ._cuda_source import LABEL_TYPES, OPTIONS, SOURCE, hist_name, hist_names

__all__ = ["histogram", "nearest"]

_THREADS = 256
_SHARED_BYTES = 48 * 1024  # dynamic shared memory every CUDA GPU gives a block without opting in
_TILE_ELEMS = 1 << 26  # float32 elements in one GEMM tile (256 MiB)
_MAX_COLS = 8192  # centroids per tile when K is larger: keeps tiles tall enough for an efficient GEMM


@functools.cache
def _module() -> Any:
    return cupy.RawModule(code=SOURCE, options=OPTIONS, name_expressions=hist_names())


@functools.cache
def _sm_count(device_id: int) -> int:
    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])


_sqnorm = cupy.ReductionKernel(
    "T x", "float64 y", "static_cast<double>(x) * static_cast<double>(x)", "a + b", "y = a", "0", "dptool_sqnorm"
)


def histogram(a: Any, b: Any, w: Any, n_a: int, n_b: int) -> tuple[Any, bool]:
    """Flat (n_a * n_b,) int64 counts (float64 sums with ``w``) of ``a`` or of the pairs (a, b); and a bad flag."""
    n = int(a.shape[0])
    bins = n_a * n_b
    weighted = w is not None
    out = cupy.zeros(bins, dtype=np.float64 if weighted else np.uint64)
    bad = cupy.zeros(1, dtype=np.int32)
    if n == 0:
        return (out if weighted else out.view(np.int64)), False
    local_bytes = bins * (8 if weighted else 4)
    shared = local_bytes <= _SHARED_BYTES
    name = hist_name(LABEL_TYPES[a.dtype], b is not None, weighted, shared)
    kernel = _module().get_function(name)
    blocks = min(-(-n // _THREADS), 8 * _sm_count(cupy.cuda.Device().id))
    blocks = max(blocks, -(-n // (1 << 31)))  # per-block shared counters (uint32) cannot overflow
    args = (a, a if b is None else b, w if weighted else out, np.int64(n), np.int64(n_a),
            np.int64(n_b if b is not None else 1), out, bad)
    kernel((blocks,), (_THREADS,), args, shared_mem=local_bytes if shared else 0)
    return (out if weighted else out.view(np.int64)), int(bad[0]) != 0


def nearest(x: Any, c: Any, cosine: bool) -> tuple[Any, Any]:
    """(N,) int64 index and float32 distance of the nearest row of ``c`` for each row of ``x`` (see nearest.py)."""
    _checks.as_features(cupy, x[:0], "x")
    cf = _checks.as_features(cupy, c, "centroids")
    cnorm = _sqnorm(cf, axis=1)
    cbad = ~cupy.isfinite(cnorm.astype(np.float32))
    if cf.shape[0] and bool(cbad.any()):
        raise _checks.bad_row_error(cupy, c, int(cbad.argmax()), "centroids")
    if cosine:
        inv = cupy.where(cnorm > 0, 1.0 / cupy.sqrt(cupy.where(cnorm > 0, cnorm, 1.0)), 0.0)
        cf = (cf * inv[:, None]).astype(np.float32)  # a new array: the caller's centroids stay as they are
        cb = cupy.zeros(cf.shape[0], np.float32)
    else:
        cb = cnorm.astype(np.float32)
    n, k = int(x.shape[0]), int(cf.shape[0])
    index = cupy.zeros(n, np.int64)
    dist = cupy.zeros(n, np.float32)
    if n == 0:
        return index, dist
    kernel = _module().get_function("argmin_tile")
    rows = max(1, min(n, _TILE_ELEMS // max(min(k, _MAX_COLS), x.shape[1], 1)))
    cols = min(k, max(1, _TILE_ELEMS // rows))
    tile = cupy.empty(rows * cols, np.float32)
    best = cupy.empty(rows, np.float32)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        xb = cupy.ascontiguousarray(x[r0:r1], dtype=np.float32)
        xnorm = _sqnorm(xb, axis=1)
        xbad = ~cupy.isfinite(xnorm.astype(np.float32))
        if bool(xbad.any()):
            raise _checks.bad_row_error(cupy, x, r0 + int(xbad.argmax()), "x")
        if cosine:
            a = cupy.ones(r1 - r0, np.float32)
            s = cupy.where(xnorm > 0, -1.0 / cupy.sqrt(cupy.where(xnorm > 0, xnorm, 1.0)), 0.0).astype(np.float32)
        else:
            a = xnorm.astype(np.float32)
            s = cupy.full(r1 - r0, -2.0, np.float32)
        best[:] = np.inf
        for c0 in range(0, k, cols):
            c1 = min(k, c0 + cols)
            g = tile[: (r1 - r0) * (c1 - c0)].reshape(r1 - r0, c1 - c0)
            cupy.matmul(xb, cf[c0:c1].T, out=g)
            grid = -(-(r1 - r0) * 32 // _THREADS)
            kernel((grid,), (_THREADS,), (g, np.int64(r1 - r0), np.int64(c1 - c0), s, cb[c0:c1],
                                          np.int64(c0), best, index[r0:r1]))
        dist[r0:r1] = cupy.clip(a + best[: r1 - r0], 0.0, 2.0 if cosine else np.inf)
    return index, dist
