"""FM (feature mapping): source features clustered into K groups; score of a group = target images nearest to it.

1. Features (the input of the surrogate's classifier) of at most ``source_sample`` source images per class.
2. Centroids: faiss k-means on those features (``groups="clusters"``, K = ``clusters``, default the number of
   source classes with samples), or the per-class mean feature (``groups="labels"``, the supervised variant:
   class-level).
3. k-means only: every source image is assigned to its nearest centroid (sampled images reuse their features,
   the rest are streamed), one int32 per image, saved beside the scores file.
4. Every target training image votes for its nearest centroid (L2, ties to the smallest index, as the
   `dptool.kernels.nearest_centroid` kernel and a brute-force NumPy reference agree).

Steps 1-3 depend on the source and the surrogate only, not on the target: ``centroids_from`` (``--centroids-from``)
takes their result, the centroids and assignment beside an earlier FM scores file, and runs step 4 alone.

Ties between equal vote counts (most groups get no vote on a small target) go to the group whose centroid is
closest to any target feature, then to the smaller id. Every per-sample step is one batch at a time; what is
kept is the sampled features, K x D centroids and a cluster id per source image (the whole command grew by
160-240 bytes per source sample from 25k to 400k samples in `benchmarks/bench_scale.py`, loader tables included).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..distributed import is_main, shard_rows
from ..errors import InputError
from ..features import inference_precision, stream
from ..scores import Scores
from ._collective import all_reduce, broadcast, gather_interleaved
from .kmeans import distinct_rows, kmeans
from .registry import register_method
from .run import Context, MethodResult

__all__ = ["feature_mapping", "sample_rows", "nearest", "TIE_BREAK", "CLUSTERING_OPTIONS", "refuse_clustering_options",
           "read_groups_file"]

log = logging.getLogger(__name__)

TIE_BREAK = ("score (target images whose nearest centroid is the group's), then squared L2 distance from the "
             "group's centroid to its nearest target feature (closer first; tiebreak = minus that distance), "
             "then group id (lower first)")
_NAMES_BUDGET = 1 << 25  # K x C joint-histogram cells above which clusters are not named by majority class


def sample_rows(labels: np.ndarray, n_classes: int, per_class: int, seed: int) -> np.ndarray:
    """Sorted file rows of at most `per_class` images of each class, chosen at random (seeded); 0 = all rows."""
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if per_class <= 0:
        return np.arange(n, dtype=np.int64)
    key = np.random.default_rng(seed).random(n)
    order = np.lexsort((key, labels))  # grouped by class, random within
    counts = np.bincount(labels, minlength=n_classes)
    starts = np.cumsum(counts) - counts
    within = np.arange(n) - starts[labels[order]]
    return np.sort(order[within < per_class]).astype(np.int64)


def nearest(x, centroids) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row of torch `x` (B, D): (B,) int64 index and float32 squared distance.

    Computed where `x` lives when the GPU kernels can run there, else on the CPU; `centroids` is a torch
    tensor on the same device as `x` (or a NumPy array for the CPU).
    """
    from ..kernels import cuda_available, nearest_centroid

    if getattr(x, "is_cuda", False) and cuda_available():
        idx, dist = nearest_centroid(x.contiguous(), centroids)
        return idx.cpu().numpy(), dist.cpu().numpy()
    c = centroids.cpu().numpy() if hasattr(centroids, "cpu") else centroids
    idx, dist = nearest_centroid(x.cpu().numpy(), c)
    return np.asarray(idx), np.asarray(dist)


def _sample_features(ctx: Context, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """This rank's sampled rows and their (n, D) float32 features."""
    n = len(shard_rows(rows))
    got_rows, feats, pos = np.zeros(n, np.int64), None, 0
    for b in stream(ctx.surrogate, ctx.source, rows, options=ctx.options.inference, logits=False,
                    features=True, progress=ctx.options.progress, desc="FM: source sample"):
        f = b.features.cpu().numpy()
        if feats is None:  # filled in place: a list of batches plus its concatenation held the sample twice
            feats = np.empty((n, f.shape[1]), np.float32)
        feats[pos:pos + len(f)] = f
        got_rows[pos:pos + len(f)] = b.rows
        pos += len(f)
    if feats is None:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return got_rows, feats


def _class_means(ctx: Context, rows: np.ndarray, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C, D) float32 mean feature of each class over the sampled rows of all ranks, and (C,) sample counts."""
    from ..kernels import class_histogram

    n_cls = ctx.source.num_classes
    labels = ctx.source.labels[rows]
    import torch

    sums = torch.zeros((n_cls, feats.shape[1]), dtype=torch.float64)
    for lo in range(0, len(rows), 1 << 16):  # index_add_ (np.add.at is ~50x slower), in float64, by chunks
        hi = lo + (1 << 16)
        sums.index_add_(0, torch.from_numpy(labels[lo:hi]), torch.from_numpy(feats[lo:hi]).double())
    sums = sums.numpy()
    counts = all_reduce(np.asarray(class_histogram(labels, n_cls), dtype=np.int64))
    sums = all_reduce(sums)
    return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32), counts


def _feature_width(feats: np.ndarray) -> int:
    """Feature width D, agreed over ranks (a rank with no rows has none of its own)."""
    return int(all_reduce(np.array([feats.shape[1] if feats.size else 0], np.int64), "max")[0])


def _assign_all(ctx: Context, rows: np.ndarray, feats: np.ndarray, centroids: np.ndarray,
                sampled: np.ndarray) -> np.ndarray:
    """(N_source,) int32 nearest centroid of every source image (same on every rank)."""
    n = ctx.source.num_samples
    assign = np.full(n, -1, dtype=np.int32)
    if len(rows):
        assign[rows] = nearest_np(feats, centroids)
    rest = np.setdiff1d(np.arange(n, dtype=np.int64), sampled, assume_unique=True)
    if len(rest):
        cent = _on(centroids, ctx.options.inference.device)
        for b in stream(ctx.surrogate, ctx.source, rest, options=ctx.options.inference, logits=False,
                        features=True, progress=ctx.options.progress, desc="FM: assign source",
                        check_each_batch=True):
            assign[b.rows] = nearest(b.features, cent)[0]
    return all_reduce(assign, "max")


def nearest_np(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(N,) int32 nearest-centroid index of NumPy rows `x` (CPU kernel)."""
    from ..kernels import nearest_centroid

    return np.asarray(nearest_centroid(x, centroids)[0], dtype=np.int32)


def _on(centroids: np.ndarray, device: str):
    import torch

    return torch.from_numpy(np.ascontiguousarray(centroids)).to(device)


def _target_votes(ctx: Context, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(G,) int64 votes and (G,) float64 squared distance from each centroid to its nearest target feature."""
    from ..kernels import class_histogram

    g = len(centroids)
    votes = np.zeros(g, np.int64)
    closest = np.full(g, np.inf, np.float64)
    cent = _on(centroids, ctx.options.inference.device)
    tgt = ctx.target
    for b in stream(ctx.surrogate, tgt, np.arange(tgt.num_samples), options=ctx.options.inference,
                    logits=False, features=True, progress=ctx.options.progress, desc="FM: target",
                    check_each_batch=True):
        idx, _ = nearest(b.features, cent)
        votes += np.asarray(class_histogram(idx, g), dtype=np.int64)
        _, dist = nearest(cent, b.features)  # each centroid's nearest feature in this batch
        np.minimum(closest, dist.astype(np.float64), out=closest)
    return all_reduce(votes), all_reduce(closest, "min")


def _cluster_names(ctx: Context, assign: np.ndarray, k: int) -> tuple[tuple[str, ...], list[int], list[int]]:
    """Each cluster named by its majority source class; also cluster sizes and majority class ids."""
    from ..kernels import class_histogram, joint_histogram

    sizes = np.asarray(class_histogram(assign, k), dtype=np.int64)
    n_cls = ctx.source.num_classes
    if k * n_cls > _NAMES_BUDGET:
        return tuple(f"cluster {i}" for i in range(k)), sizes.tolist(), []
    joint = np.asarray(joint_histogram(assign, ctx.source.labels, k, n_cls))
    major = joint.argmax(axis=1)
    names = ctx.source.class_names
    out = tuple(f"cluster {i}: {names[m]} {joint[i, m] / s:.0%}" if s else f"cluster {i}: empty"
                for i, (m, s) in enumerate(zip(major, sizes)))
    return out, sizes.tolist(), major.tolist()


def _fitted_groups(ctx: Context) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Centroids from the source: k-means of the sampled features (and every source image's nearest centroid),
    or the per-class mean features (no assignment). Returns (centroids, assignment or None, params)."""
    opts = ctx.options
    src = ctx.source
    n_cls = src.num_classes
    # by default one cluster per class that has samples (a pruned file keeps its label range, a foreign file
    # may have gaps in it)
    k = int(np.count_nonzero(src.class_counts())) if opts.clusters is None else opts.clusters
    if opts.groups == "labels" and opts.clusters is not None:
        raise InputError(f"--clusters applies to --groups clusters; with --groups labels the groups are the "
                         f"{n_cls} source classes.")
    if not (ctx.surrogate.scripted and hasattr(ctx.surrogate.model, "forward_features")):
        ctx.surrogate.feature_module()  # an unknown --feature-layer fails here, before any image is read
    sampled = sample_rows(src.labels, n_cls, opts.source_sample, opts.seed)
    # Checked here, on every rank, before any image is read: k-means runs on rank 0 alone, so a refusal there
    # would leave the other ranks waiting in its broadcast.
    if opts.groups == "clusters" and not 1 <= k <= len(sampled):
        given = f"got {k}" if opts.clusters is not None else f"its default is the {k} classes with samples"
        raise InputError(f"--clusters must be between 1 and the {len(sampled)} sampled source images (raise "
                         f"--source-sample for more), {given}.")
    with ctx.stage("source features"):
        rows, feats = _sample_features(ctx, sampled)
        width = _feature_width(feats)
        feats = feats.reshape(len(rows), width)
    params = {"groups": opts.groups, "source_sample": opts.source_sample, "sampled_images": int(len(sampled)),
              "seed": opts.seed, "metric": "l2"}
    if opts.groups == "labels":
        with ctx.stage("class means"):
            centroids, counts = _class_means(ctx, rows, feats)
        _check_distinct_means(centroids[counts > 0])  # the same on every rank: the means are summed over ranks
        return centroids, None, params
    with ctx.stage("k-means"):
        everything = gather_interleaved(feats, len(sampled))
        cent = None
        # counted on rank 0, which holds every sampled feature, and refused on every rank alike
        distinct = int(broadcast(distinct_rows(everything, k) if is_main() else None))
        if distinct < k:
            del everything
            raise InputError(_too_few_distinct(distinct, len(sampled), k))
        if is_main():
            cent = kmeans(everything, k, niter=opts.kmeans_iters, seed=opts.seed, progress=opts.progress,
                          distinct=distinct)
        del everything
        centroids = broadcast(cent)
    with ctx.stage("source assignment"):
        assignment = _assign_all(ctx, rows, feats, centroids, sampled)
    params.update(clusters=k, kmeans_iters=opts.kmeans_iters, kmeans="faiss")
    return centroids, assignment, params


def _too_few_distinct(distinct: int, n: int, k: int) -> str:
    """The refusal of k-means into `k` clusters of `n` sampled features of which only `distinct` differ."""
    advice = ("they do not depend on the image: check --feature-layer and the surrogate" if distinct == 1 else
              f"lower --clusters to at most {distinct}, or check --feature-layer and the surrogate")
    return (f"The surrogate's features of the {n} sampled source images take only {distinct} distinct value(s), "
            f"fewer than the {k} clusters (k-means would leave {k - distinct} of them empty or split copies of one "
            f"point); {advice}.")


def _check_distinct_means(means: np.ndarray) -> None:
    """Refuse class means (of the classes with samples) that coincide: target images would all vote for the lowest
    class id among equal centroids, a ranking made by the tie rule rather than by the features."""
    distinct = distinct_rows(means, len(means))
    if distinct < len(means):
        why = "the features do not depend on the image" if distinct == 1 else "some classes' means are equal"
        raise InputError(f"The surrogate's mean features of the {len(means)} source classes with samples take only "
                         f"{distinct} distinct value(s) ({why}), so FM cannot tell those classes apart; check "
                         "--feature-layer and the surrogate.")


# What `--centroids-from` takes from its file: refused when given (the CLI), or when not at its default (library).
CLUSTERING_OPTIONS = {"groups": "--groups", "clusters": "--clusters", "source_sample": "--source-sample",
                      "seed": "--seed", "kmeans_iters": "--kmeans-iters"}
_CLUSTERING_PARAMS = ("groups", "source_sample", "sampled_images", "seed", "metric", "clusters", "kmeans_iters",
                      "kmeans")


def refuse_clustering_options(given: Iterable[str], path) -> None:
    """Refuse the first of `given` (`ScoreOptions` names of `CLUSTERING_OPTIONS`) that is one: with `centroids_from`
    `path`, the groups and how they were made come from that file."""
    for name in given:
        if name in CLUSTERING_OPTIONS:
            flag = CLUSTERING_OPTIONS[name]
            raise InputError(f"{flag} cannot be combined with --centroids-from: the groups, and how they were made, "
                             f"come from {path}; leave {flag} out.")


def read_groups_file(path) -> Scores:
    """The scores file `path` that `centroids_from` names, refused unless it holds FM scores."""
    from ..scores import read_scores

    old = read_scores(path)
    if old.method != "fm":
        raise InputError(f"--centroids-from takes an FM scores file; {path} holds {old.method} scores.")
    return old


def _reused_groups(ctx: Context) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """The centroids (and assignment) of an earlier FM scores file (`centroids_from`), checked to be points in this
    surrogate's feature space of this source, at this resolution and normalisation. Same return as `_fitted_groups`."""
    from ..beton import known_fingerprints
    from ..scores import fingerprint_file, load_assignment, load_centroids

    opts, src, path = ctx.options, ctx.source, ctx.options.centroids_from
    defaults = type(opts)()
    refuse_clustering_options([n for n in CLUSTERING_OPTIONS if getattr(opts, n) != getattr(defaults, n)], path)
    old = read_groups_file(path)
    with ctx.stage("load centroids"):
        centroids = load_centroids(path, old)
        assignment = load_assignment(path, old) if old.level == "cluster" else None
    same_source = (old.source["fingerprint"] in known_fingerprints(src, ctx.source_fingerprint)
                   and int(old.source["num_samples"]) == src.num_samples)
    if not same_source:
        raise InputError(f"Scores file {path} was made from source {old.source['path']} "
                         f"({old.source['fingerprint']}), not from {src.path}; its groups are not this source's.")
    theirs, sur = old.surrogate or {}, ctx.surrogate
    # equal weights mean equal modules: a file that names no layer used the one this surrogate defaults to,
    # so `--feature-layer fc` and no --feature-layer are the same layer of a ResNet
    default = sur.default_feature_name()
    for what, recorded, mine in (("weights fingerprint", theirs.get("weights"), sur.identity.get("weights")),
                                 ("--feature-layer", theirs.get("feature_layer") or default,
                                  sur.feature_name or default)):
        if recorded != mine:
            raise InputError(f"Scores file {path} was made with another surrogate ({what} {recorded}, "
                             f"this one has {mine}); its centroids are points in that model's feature space.")
    inference = ctx.options.inference
    precision = inference_precision(inference)
    for key, flag, ours_value in (("res", "--res", inference.res), ("mean", "--mean", list(inference.mean)),
                                  ("std", "--std", list(inference.std))):
        if old.params.get(key) != ours_value:
            raise InputError(f"Scores file {path} was made with {flag} {old.params.get(key)}, this run has "
                             f"{ours_value}; give the same (or leave {flag} out to take its value).")
    params = {k: old.params[k] for k in _CLUSTERING_PARAMS if k in old.params}
    params["centroids_from"] = {"path": str(Path(path).resolve()), "sha256": fingerprint_file(path)}
    # another --precision is accepted (the same features, rounded otherwise: groups made in fp16 on a GPU serve a
    # target whose features overflow there, scored in fp32) and recorded
    if old.params.get("precision", precision) != precision:
        params["centroids_precision"] = old.params["precision"]
    return centroids, assignment, params


@register_method("fm", reads=(*CLUSTERING_OPTIONS, "centroids_from"),
                 help="feature mapping: k-means clusters (or class means) of source features, scored by target votes "
                      "for the nearest centroid")
def feature_mapping(ctx: Context) -> MethodResult:
    """FM scores per cluster (or per class with groups="labels"), the proximity tie-break and the assignment."""
    src = ctx.source
    reused = ctx.options.centroids_from is not None
    centroids, assignment, params = _reused_groups(ctx) if reused else _fitted_groups(ctx)
    extra: dict = {}
    if assignment is None:  # class means: the classes without samples have no centroid and get no vote
        n_cls = src.num_classes
        present = np.nonzero(src.class_counts())[0]
        with ctx.stage("target votes"):
            v, c = _target_votes(ctx, centroids[present])
        votes = np.zeros(n_cls, np.int64)
        votes[present] = v
        closest = np.full(n_cls, np.nan)
        closest[present] = c
        level, names = "class", tuple(src.class_names)
    else:
        with ctx.stage("target votes"):
            votes, closest = _target_votes(ctx, centroids)
        names, sizes, major = _cluster_names(ctx, assignment, len(centroids))
        extra.update(cluster_sizes=sizes, majority_class=major)
        level = "cluster"
    tiebreak = -np.where(np.isfinite(closest), closest, np.nan)
    floor = np.nanmin(tiebreak) - 1.0 if np.isfinite(tiebreak).any() else 0.0
    tiebreak = np.where(np.isnan(tiebreak), floor, tiebreak)  # groups without a centroid go last among ties
    extra["target_images"] = int(votes.sum())
    return MethodResult(level=level, ids=np.arange(len(votes)), names=names, scores=votes.astype(np.float64),
                        tiebreak=tiebreak, tie_break=TIE_BREAK, params=params, extra=extra, assignment=assignment,
                        centroids=centroids)
