"""The CUDA C++ source of the GPU kernels and the template instances CuPy compiles, without importing CuPy.

Kept apart from `_cuda.py` so that the source can be compiled by NVRTC (and so checked) on a machine without a
GPU or CuPy: see tests/test_kernels_cuda_source.py.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SOURCE", "OPTIONS", "LABEL_TYPES", "hist_name", "hist_names"]

SOURCE = r"""
template <bool C, typename A, typename B> struct pick { typedef A type; };
template <typename A, typename B> struct pick<false, A, B> { typedef B type; };

// Histogram of a (1-D) or of the pairs (a, b) (JOINT, bin a * n_b + b), counted (W = false) or summed (W = true).
// SHARED: each block counts into its own copy in shared memory, then adds it to the global result once.
// Labels outside the ranges are skipped and raise *bad, which the host turns into a ValueError.
template <typename T, bool JOINT, bool W, bool SHARED>
__global__ void hist(const T* __restrict__ a, const T* __restrict__ b, const double* __restrict__ w,
                     long long n, long long n_a, long long n_b, void* out, int* bad) {
    typedef typename pick<W, double, unsigned int>::type Local;
    extern __shared__ __align__(8) unsigned char shared_raw[];
    Local* local = reinterpret_cast<Local*>(shared_raw);
    const long long bins = n_a * n_b;
    if (SHARED) {
        for (long long j = threadIdx.x; j < bins; j += blockDim.x) local[j] = 0;
        __syncthreads();
    }
    int any_bad = 0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const long long u = (long long)a[i];
        const long long v = JOINT ? (long long)b[i] : 0;
        if (u < 0 || u >= n_a || v < 0 || v >= n_b) { any_bad = 1; continue; }
        const long long j = u * n_b + v;
        if (W) {
            double* dst = SHARED ? reinterpret_cast<double*>(local) : static_cast<double*>(out);
            atomicAdd(dst + j, w[i]);
        } else if (SHARED) {
            atomicAdd(reinterpret_cast<unsigned int*>(local) + j, 1u);
        } else {
            atomicAdd(static_cast<unsigned long long*>(out) + j, 1ull);
        }
    }
    if (any_bad) atomicOr(bad, 1);
    if (SHARED) {
        __syncthreads();
        for (long long j = threadIdx.x; j < bins; j += blockDim.x) {
            const Local c = local[j];
            if (c == 0) continue;
            if (W) atomicAdd(static_cast<double*>(out) + j, (double)c);
            else atomicAdd(static_cast<unsigned long long*>(out) + j, (unsigned long long)c);
        }
    }
}

// One warp per row of the (rows, cols) product tile g = x_block @ c_tile.T: v_j = cb[j] + s[row] * g[row, j],
// arg-min over j with ties to the smallest j, folded into (best, index) only if strictly smaller, so that
// earlier tiles (smaller centroid indices) keep ties. Rounded as the CPU kernel rounds (no FMA contraction).
extern "C" __global__ void argmin_tile(const float* __restrict__ g, long long rows, long long cols,
                                       const float* __restrict__ s, const float* __restrict__ cb,
                                       long long c0, float* best, long long* index) {
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;  // uniform across the warp: every lane has the same row
    const float* gr = g + row * cols;
    const float sr = s[row];
    float bv = __int_as_float(0x7f800000);  // +inf
    long long bi = 0x7fffffffffffffffLL;
    for (long long j = lane; j < cols; j += 32) {
        const float v = __fadd_rn(cb[j], __fmul_rn(sr, gr[j]));
        if (v < bv) { bv = v; bi = j; }
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float ov = __shfl_down_sync(0xffffffffu, bv, offset);
        const long long oi = __shfl_down_sync(0xffffffffu, bi, offset);
        if (ov < bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    if (lane == 0 && bv < best[row]) {
        best[row] = bv;
        index[row] = c0 + bi;
    }
}
"""

LABEL_TYPES = {np.dtype(np.int32): "int", np.dtype(np.int64): "long long"}


def hist_name(ctype: str, joint: bool, weighted: bool, shared: bool) -> str:
    """The name expression of one instance of the `hist` template."""
    flags = ", ".join("true" if f else "false" for f in (joint, weighted, shared))
    return f"hist<{ctype}, {flags}>"


OPTIONS = ("-std=c++17",)


def hist_names() -> list[str]:
    """The name expressions of every `hist` instance the GPU path launches (`argmin_tile` is extern "C")."""
    return [
        hist_name(ctype, joint, weighted, shared)
        for ctype in LABEL_TYPES.values()
        for joint in (False, True)
        for weighted in (False, True)
        for shared in (False, True)
        if not (joint and weighted)
    ]
