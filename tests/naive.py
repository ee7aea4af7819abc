"""Plain NumPy references for the kernels in ``dptool.kernels``, computed in float64 / int64 the obvious way.

Slow on purpose and free of tricks: every kernel test compares against these. Only kernels live here.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "naive_class_histogram",
    "naive_distances",
    "naive_joint_histogram",
    "naive_nearest_centroid",
]


def naive_class_histogram(labels: np.ndarray, n_classes: int, weights: np.ndarray | None = None) -> np.ndarray:
    """(n_classes,) int64 counts, or float64 weight sums, of integer ``labels`` all in ``[0, n_classes)``."""
    labels = np.asarray(labels).astype(np.int64)
    if weights is None:
        out = np.zeros(n_classes, np.int64)
        np.add.at(out, labels, 1)
    else:
        out = np.zeros(n_classes, np.float64)
        np.add.at(out, labels, np.asarray(weights, np.float64))
    return out


def naive_joint_histogram(a: np.ndarray, b: np.ndarray, n_a: int, n_b: int) -> np.ndarray:
    """(n_a, n_b) int64 counts of the pairs ``(a[i], b[i])``."""
    out = np.zeros((n_a, n_b), np.int64)
    np.add.at(out, (np.asarray(a).astype(np.int64), np.asarray(b).astype(np.int64)), 1)
    return out


def naive_distances(x: np.ndarray, centroids: np.ndarray, metric: str = "l2") -> np.ndarray:
    """(N, K) float64 distances computed directly (no expansion): ``‖x − c‖²`` or ``1 − cos(x, c)``.

    For cosine, a zero vector has cosine 0 with everything (distance 1).
    """
    x = np.asarray(x, np.float64)
    c = np.asarray(centroids, np.float64)
    if metric == "l2":
        return ((x[:, None, :] - c[None, :, :]) ** 2).sum(axis=2)
    xn = np.linalg.norm(x, axis=1)
    cn = np.linalg.norm(c, axis=1)
    xu = np.divide(x, xn[:, None], out=np.zeros_like(x), where=xn[:, None] > 0)
    cu = np.divide(c, cn[:, None], out=np.zeros_like(c), where=cn[:, None] > 0)
    return 1.0 - xu @ cu.T


def naive_nearest_centroid(
    x: np.ndarray, centroids: np.ndarray, metric: str = "l2"
) -> tuple[np.ndarray, np.ndarray]:
    """(N,) int64 index of the nearest centroid (first one on exact ties) and its float64 distance."""
    n = np.asarray(x).shape[0]
    k, d = np.asarray(centroids).shape
    block = max(1, (1 << 22) // max(1, k * d))  # bounds the (block, K, D) float64 temporary at 32 MiB
    index = np.zeros(n, np.int64)
    dist = np.zeros(n, np.float64)
    for r0 in range(0, n, block):
        d = naive_distances(x[r0 : r0 + block], centroids, metric)
        index[r0 : r0 + block] = d.argmin(axis=1)  # argmin returns the first minimum
        dist[r0 : r0 + block] = d[np.arange(d.shape[0]), index[r0 : r0 + block]]
    return index, dist
