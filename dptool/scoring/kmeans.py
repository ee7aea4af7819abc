"""k-means with faiss: array in, centroids out; on all GPUs when faiss sees one, else faiss-cpu.

The Lloyd iterations run one `faiss.Clustering.train` call at a time (each call starts from the previous
centroids, which is what faiss does inside one call), so that a progress bar can advance per iteration and
the objective is logged. Inputs are already sampled per class by the caller, so faiss' own subsampling
(`max_points_per_centroid`) is switched off.
"""

from __future__ import annotations

import logging
import sys

import numpy as np

from ..errors import InputError

__all__ = ["kmeans", "faiss_gpus"]

log = logging.getLogger(__name__)


def faiss_gpus() -> int:
    """Number of GPUs faiss can use (0 with faiss-cpu)."""
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def _index(d: int, gpus: int):
    import faiss

    index = faiss.IndexFlatL2(d)
    return faiss.index_cpu_to_all_gpus(index) if gpus > 0 else index


def kmeans(x: np.ndarray, k: int, *, niter: int = 20, seed: int = 0, gpu: bool | None = None,
           progress: bool = False) -> np.ndarray:
    """Cluster the rows of `x` into `k` groups with faiss k-means (L2, k-means++-free random init as faiss).

    Parameters
    ----------
    x : (N, D) float array (converted to contiguous float32), N >= k, finite.
    k : number of centroids.
    niter : Lloyd iterations.
    seed : faiss' random seed (initial centroids, splitting of empty clusters).
    gpu : use faiss' GPU index; None = when `faiss.get_num_gpus() > 0`.

    Returns
    -------
    (k, D) float32 centroids.
    """
    import faiss
    from tqdm import tqdm

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if k < 1:
        raise InputError(f"--clusters must be at least 1, got {k}.")
    if n < k:
        raise InputError(f"k-means into {k} clusters needs at least {k} source features, got {n}; raise "
                         "--source-sample or lower --clusters.")
    if not np.isfinite(x).all():
        raise InputError("The surrogate produced non-finite features; k-means cannot run on them.")
    gpus = faiss_gpus() if gpu is None else (faiss_gpus() if gpu else 0)
    cp = faiss.ClusteringParameters()
    cp.niter = 1
    cp.seed = int(seed)
    cp.verbose = False
    cp.min_points_per_centroid = 1
    cp.max_points_per_centroid = max(256, -(-n // k) + 1)  # never subsample: the caller sampled already
    clus = faiss.Clustering(d, k, cp)
    index = _index(d, gpus)
    log.info("k-means: %d x %d into %d clusters, %d iterations, %s", n, d, k, niter,
             f"{gpus} GPU(s)" if gpus else "CPU")
    with tqdm(total=niter, desc="k-means", unit="it", file=sys.stderr, disable=not progress, leave=False) as bar:
        for it in range(niter):
            clus.train(x, index)
            stats = clus.iteration_stats
            obj = stats.at(stats.size() - 1).obj if stats.size() else float("nan")
            log.debug("k-means iteration %d: objective %.6g", it, obj)
            bar.set_postfix(obj=f"{obj:.4g}")
            bar.update(1)
    return faiss.vector_to_array(clus.centroids).reshape(k, d).astype(np.float32)
