"""k-means with faiss: array in, centroids out; on all GPUs when faiss sees one, else faiss-cpu.

Initial centroids: k-means++ seeding (Arthur & Vassilvitskii 2007) on a random subsample of at most
`PLUSPLUS_POINTS_PER_CENTROID` x k rows (NumPy, k passes over the subsample), or faiss' own uniform random
pick (``init="random"``). Random seeding leaves well-separated groups merged or split (with 8 clearly
separated classes and k = 8, 19 of 20 seeds did), which is exactly the structure FM relies on.

The Lloyd iterations run one `faiss.Clustering.train` call at a time (each call starts from the previous
centroids, which is what faiss does inside one call), so that a progress bar can advance per iteration and
the objective is logged; like faiss, the loop stops early once the objective no longer changes. Inputs are
already sampled per class by the caller, so faiss' own subsampling (`max_points_per_centroid`) is switched off.
"""

from __future__ import annotations

import logging
import sys

import numpy as np

from ..errors import InputError

__all__ = ["kmeans", "kmeans_plusplus", "faiss_gpus", "distinct_rows", "PLUSPLUS_POINTS_PER_CENTROID"]

log = logging.getLogger(__name__)

PLUSPLUS_POINTS_PER_CENTROID = 16


def faiss_gpus() -> int:
    """Number of GPUs faiss can use (0 with faiss-cpu)."""
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def kmeans_plusplus(x: np.ndarray, k: int, *, seed: int = 0) -> np.ndarray:
    """(k, D) float32 k-means++ seeds from the rows of `x` (N >= k): each next seed drawn with probability
    proportional to the squared distance to the nearest seed so far; a subsample of at most 16 k rows is used."""
    rng = np.random.default_rng(seed)
    n = len(x)
    if n > PLUSPLUS_POINTS_PER_CENTROID * k:
        x = x[np.sort(rng.choice(n, PLUSPLUS_POINTS_PER_CENTROID * k, replace=False))]
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.einsum("ij,ij->i", x, x)
    seeds = np.empty(k, dtype=np.int64)
    seeds[0] = rng.integers(len(x))
    closest = np.maximum(norms - 2 * (x @ x[seeds[0]]) + norms[seeds[0]], 0).astype(np.float64)
    for i in range(1, k):
        total = closest.sum()
        if total > 0:
            pick = int(np.searchsorted(np.cumsum(closest), rng.random() * total, side="right"))
            pick = min(pick, len(x) - 1)
        else:  # every row coincides with a seed: any unused row will do
            pick = int(np.setdiff1d(np.arange(len(x)), seeds[:i])[0])
        seeds[i] = pick
        np.minimum(closest, np.maximum(norms - 2 * (x @ x[pick]) + norms[pick], 0), out=closest)
    return x[seeds].copy()


def distinct_rows(x: np.ndarray, enough: int) -> int:
    """Number of distinct rows of `x` (N, D), exact when it is below `enough`; at or above it, some number >= `enough`.

    A projection on a random direction first (one float32 matrix-vector product): equal rows project equally, so its
    distinct values are a lower bound, enough whenever the features are healthy; only below `enough` are the rows
    compared byte for byte (with -0.0 made 0.0)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        return len(x)
    direction = np.random.default_rng(0).standard_normal(x.shape[1]).astype(np.float32)
    found = len(np.unique(x @ direction))
    if found >= enough:
        return found
    rows = np.ascontiguousarray(x + np.float32(0))
    return len(np.unique(rows.view(np.dtype((np.void, rows.itemsize * rows.shape[1]))).ravel()))


def _index(d: int, gpus: int):
    """A flat L2 index on all GPUs faiss sees, else (or where the GPU index cannot be made) on the CPU; and
    whether it is on the GPU."""
    import faiss

    index = faiss.IndexFlatL2(d)
    if gpus > 0:
        try:
            return faiss.index_cpu_to_all_gpus(index), True
        except Exception as exc:  # noqa: BLE001 - faiss-gpu without a usable GPU: whatever it raises, use the CPU
            log.warning("faiss could not place the k-means index on the GPU (%s: %s); k-means runs on the CPU",
                        type(exc).__name__, exc)
    return index, False


def _lloyd(x: np.ndarray, k: int, cp, seeds: np.ndarray | None, index, niter: int, progress: bool) -> np.ndarray:
    """`niter` Lloyd iterations (fewer once the objective stops changing) from `seeds` (None: faiss' random pick)
    with `index` for the assignments; (k, D) float32 centroids."""
    import faiss
    from tqdm import tqdm

    d = x.shape[1]
    clus = faiss.Clustering(d, k, cp)
    if seeds is not None:
        faiss.copy_array_to_vector(seeds.ravel(), clus.centroids)
    previous = None
    with tqdm(total=niter, desc="k-means", unit="it", file=sys.stderr, disable=not progress, leave=False) as bar:
        for it in range(niter):
            clus.train(x, index)
            stats = clus.iteration_stats
            obj = stats.at(stats.size() - 1).obj if stats.size() else float("nan")
            log.debug("k-means iteration %d: objective %.6g", it, obj)
            bar.set_postfix(obj=f"{obj:.4g}")
            bar.update(1)
            if obj == previous:  # converged: faiss stops here too (early_stop_threshold 0)
                log.info("k-means converged after %d iterations", it + 1)
                break
            previous = obj
    return faiss.vector_to_array(clus.centroids).reshape(k, d).astype(np.float32)


def kmeans(x: np.ndarray, k: int, *, niter: int = 20, seed: int = 0, init: str = "k-means++",
           progress: bool = False, distinct: int | None = None) -> np.ndarray:
    """Cluster the rows of `x` into `k` groups: k-means++ (or faiss' random) seeds, then faiss Lloyd iterations.

    Parameters
    ----------
    x : (N, D) float array (converted to contiguous float32), N >= k, finite.
    k : number of centroids.
    niter : Lloyd iterations.
    seed : seed of the initial centroids and of faiss (splitting of empty clusters).
    init : "k-means++" or "random" (faiss' default: k distinct random rows).
    distinct : `distinct_rows(x, k)` when the caller has counted it already (else counted here).

    Returns
    -------
    (k, D) float32 centroids.
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if k < 1:
        raise InputError(f"--clusters must be at least 1, got {k}.")
    if n < k:
        raise InputError(f"k-means into {k} clusters needs at least {k} source features, got {n}; raise "
                         "--source-sample or lower --clusters.")
    if init not in ("k-means++", "random"):
        raise InputError(f"k-means init must be k-means++ or random, got {init!r}.")
    if not np.isfinite(x).all():
        raise InputError("The surrogate produced non-finite features; k-means cannot run on them.")
    distinct = distinct_rows(x, k) if distinct is None else distinct
    if distinct < k:
        raise InputError(f"k-means into {k} clusters needs at least {k} distinct features, got {distinct} among "
                         f"{n}; lower --clusters to at most {distinct}, or check the surrogate's features.")
    gpus = faiss_gpus()
    cp = faiss.ClusteringParameters()
    cp.niter = 1
    cp.seed = int(seed)
    cp.verbose = False
    cp.min_points_per_centroid = 1
    cp.max_points_per_centroid = max(256, -(-n // k) + 1)  # never subsample: the caller sampled already
    seeds = kmeans_plusplus(x, k, seed=seed) if init == "k-means++" else None
    index, on_gpu = _index(d, gpus)
    log.info("k-means: %d x %d into %d clusters, %s init, %d iterations, %s", n, d, k, init, niter,
             f"{gpus} GPU(s)" if on_gpu else "CPU")
    try:
        return _lloyd(x, k, cp, seeds, index, niter, progress)
    except RuntimeError as exc:  # a GPU error (out of memory, a CUDA error) part way: start again on the CPU
        if not on_gpu:
            raise
        log.warning("k-means on the GPU failed (%s); running it again on the CPU", exc)
        return _lloyd(x, k, cp, seeds, faiss.IndexFlatL2(d), niter, progress)
