"""The scores file: one importance score per source class (or cluster), written once by `score`, read by `prune`.

A scores file is JSON (format ``dptool-scores``, version 1) with the method, its parameters, the surrogate's
identity, the source and target fingerprints, one row per group (id, name, score, tie-break value, rank; rank 0
is the most important) and the tie-break rule in words. Cluster-level scores (FM) also name a NumPy file beside
the JSON, ``<stem>.assign.npy``, holding the (N_source,) int32 cluster id of every source sample in file order.
FM scores also name ``<stem>.centroids.npy``, the (G, D) float32 centroid of every group in the surrogate's feature
space, so that `score --centroids-from` can score another target against the same groups without reading the
source again. dptool.scores_companions finds, checks and loads those two files (re-exported here).

Ranks order groups by score (descending), then the tie-break value (descending), then id (ascending), so that
the kept set for any ratio is deterministic even when most scores tie (LM on a small target).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_output, check_output_path, output_group
from .errors import InputError
from .scores_companions import (  # the .npy files beside a scores file, re-exported: import paths unchanged
    _check_assignment,
    _check_centroids,
    assignment_path,
    centroids_path,
    companion_path,
    fingerprint_file,
    load_assignment,
    load_centroids,
    npy_bytes,
    read_recorded_npy,
)

__all__ = [
    "companion_path",
    "SCORES_FORMAT",
    "SCORES_VERSION",
    "LEVELS",
    "Scores",
    "rank_groups",
    "write_scores",
    "read_scores",
    "load_assignment",
    "assignment_path",
    "load_centroids",
    "centroids_path",
    "npy_bytes",
    "read_recorded_npy",
    "select_groups",
    "removed_count",
    "fingerprint_file",
    "score_summary",
]

SCORES_FORMAT = "dptool-scores"
SCORES_VERSION = 1
LEVELS = ("class", "cluster")
_SOURCE_KEYS = ("path", "fingerprint", "num_samples", "num_classes")
_REQUIRED = ("method", "level", "source", "groups", "tie_break")


def rank_groups(scores: np.ndarray, tiebreak: np.ndarray, *, ids: np.ndarray | None = None) -> np.ndarray:
    """Rank groups: score descending, then tie-break descending, then id ascending; rank 0 = most important.

    Parameters
    ----------
    scores, tiebreak : (G,) float
        Finite values; `tiebreak` decides between equal scores.
    ids : (G,) int, optional
        Group ids, the last key (ascending); default ``arange(G)``.

    Returns
    -------
    (G,) int64 rank of each group, a permutation of ``0..G-1``.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    tiebreak = np.asarray(tiebreak, dtype=np.float64).reshape(-1)
    ids = np.arange(len(scores), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64).reshape(-1)
    if not len(scores) == len(tiebreak) == len(ids):
        raise InputError(f"scores, tiebreak and ids must have one value per group, got "
                         f"{len(scores)}, {len(tiebreak)} and {len(ids)}.")
    if not (np.isfinite(scores).all() and np.isfinite(tiebreak).all()):
        raise InputError("scores and tie-break values must be finite numbers (found NaN or infinity).")
    order = np.lexsort((ids, -tiebreak, -scores))  # last key is the primary one
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(len(order), dtype=np.int64)
    return ranks


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class Scores:
    """Importance of every source class or cluster, with the provenance needed to check it against a source.

    `ids`, `scores`, `tiebreak` and `ranks` are (G,) arrays (int64, float64, float64, int64), one entry per
    group, read-only; `ranks` is not an argument: it is always computed from the scores with `rank_groups`.
    `assignment` is the file name (beside the scores file) of the per-sample cluster ids, set by `write_scores`
    for cluster-level scores, and `assignment_sha256` its fingerprint, which `load_assignment` checks;
    `centroids` and `centroids_sha256` likewise name the (G, D) centroids of FM's groups (`load_centroids`).
    """

    method: str
    level: str
    ids: np.ndarray
    names: tuple[str, ...]
    scores: np.ndarray
    tiebreak: np.ndarray
    source: dict
    tie_break: str
    ranks: np.ndarray = field(init=False)
    params: dict = field(default_factory=dict)
    surrogate: dict | None = None
    target: dict | None = None
    extra: dict = field(default_factory=dict)
    assignment: str | None = None
    created: str | None = None
    assignment_sha256: str | None = None
    centroids: str | None = None
    centroids_sha256: str | None = None

    def __post_init__(self) -> None:
        ids = np.asarray(self.ids).reshape(-1)
        if ids.size and not np.issubdtype(ids.dtype, np.integer) and not np.array_equal(ids, np.round(ids)):
            raise InputError("group ids must be integers.")
        ids = ids.astype(np.int64)
        g = len(ids)
        scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        tiebreak = np.asarray(self.tiebreak, dtype=np.float64).reshape(-1)
        names = tuple(str(n) for n in self.names)
        if g == 0:
            raise InputError("scores must have at least one group.")
        if len(np.unique(ids)) != g or ids.min() < 0:
            raise InputError("group ids must be unique non-negative integers.")
        if not len(scores) == len(tiebreak) == len(names) == g:
            raise InputError(f"ids, names, scores and tiebreak must have one entry per group ({g}), got "
                             f"{len(names)} names, {len(scores)} scores and {len(tiebreak)} tie-break values.")
        if self.level not in LEVELS:
            raise InputError(f"level must be one of {', '.join(LEVELS)}, got {self.level!r}.")
        if not isinstance(self.method, str) or not self.method:
            raise InputError(f"method must be a non-empty string, got {self.method!r}.")
        if not isinstance(self.source, dict) or any(k not in self.source for k in _SOURCE_KEYS):
            raise InputError(f"source must be a dict with keys {', '.join(_SOURCE_KEYS)}.")
        if self.level == "class" and ids.max() >= int(self.source["num_classes"]):
            raise InputError(f"class id {int(ids.max())} is out of range for a source with "
                             f"{int(self.source['num_classes'])} classes.")
        ranks = rank_groups(scores, tiebreak, ids=ids)
        for name, value in (("ids", ids), ("scores", scores), ("tiebreak", tiebreak), ("ranks", ranks)):
            object.__setattr__(self, name, _readonly(value))
        object.__setattr__(self, "names", names)

    @property
    def num_groups(self) -> int:
        """Number of scored groups G."""
        return len(self.ids)

    def order(self) -> np.ndarray:
        """(G,) int64 group ids, most important first."""
        return self.ids[np.argsort(self.ranks, kind="stable")]

    def to_dict(self) -> dict:
        """The JSON document of the scores file (without the `created` time filled in)."""
        groups = [
            {"id": int(i), "name": n, "score": float(s), "tiebreak": float(t), "rank": int(r)}
            for i, n, s, t, r in zip(self.ids, self.names, self.scores, self.tiebreak, self.ranks)
        ]
        return {
            "format": SCORES_FORMAT, "version": SCORES_VERSION, "method": self.method, "level": self.level,
            "params": self.params, "surrogate": self.surrogate, "source": self.source, "target": self.target,
            "tie_break": self.tie_break, "groups": groups, "assignment": self.assignment, "extra": self.extra,
            "created": self.created,
            **({"assignment_sha256": self.assignment_sha256} if self.assignment_sha256 else {}),
            **({"centroids": self.centroids, "centroids_sha256": self.centroids_sha256} if self.centroids else {}),
        }


def write_scores(path: str | os.PathLike, scores: Scores, *, assignment: np.ndarray | None = None,
                 centroids: np.ndarray | None = None, force: bool = False) -> Path:
    """Write `scores` to `path` (JSON), and `assignment` and `centroids` beside it when given; all atomically.

    Parameters
    ----------
    path : path of the JSON file; the assignment goes to ``<stem>.assign.npy`` beside it.
    scores : the scores to write; its `created` time is filled in when empty.
    assignment : (N_source,) int cluster id of every source sample in source-file order; required for
        cluster-level scores, refused for class-level ones.
    centroids : optional (G, D) float centroid of every group, row = group id (FM), to ``<stem>.centroids.npy``.
    force : overwrite an existing scores file.
    """
    out = check_output_path(path, force=force)
    if scores.level == "cluster" and assignment is None:
        raise InputError("cluster-level scores need the per-sample cluster assignment (assignment=...).")
    if scores.level == "class" and assignment is not None:
        raise InputError("class-level scores take no assignment: samples are kept by their label.")
    doc_scores = dataclasses.replace(scores, created=scores.created or time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    companions = []  # (path, .npy bytes), placed together with the scores file
    if assignment is not None:
        apath = check_output_path(assignment_path(out), force=force)
        npy, sha = npy_bytes(_check_assignment(assignment, scores, "assignment"))
        companions.append((apath, npy))
        doc_scores = dataclasses.replace(doc_scores, assignment=apath.name, assignment_sha256=sha)
    if centroids is not None:
        cpath = check_output_path(centroids_path(out), force=force)
        npy, sha = npy_bytes(_check_centroids(centroids, scores, "centroids"))
        companions.append((cpath, npy))
        doc_scores = dataclasses.replace(doc_scores, centroids=cpath.name, centroids_sha256=sha)
    try:  # before anything is written: a refusal leaves nothing behind
        text = json.dumps(doc_scores.to_dict(), indent=1, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"scores cannot be written as JSON ({exc}); params, surrogate, target and extra "
                         "must hold plain JSON values.") from exc
    with output_group():  # all or none: a scores file is never left beside another run's assignment
        with atomic_output(out) as tmp:
            tmp.write_text(text + "\n")
        for cpath, npy in companions:
            with atomic_output(cpath, companion_of=out) as tmp:
                tmp.write_bytes(npy)
    return out


def read_scores(path: str | os.PathLike) -> Scores:
    """Read and validate a scores file; every problem is one sentence naming the file (InputError)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"Scores file {p} does not exist.")
    try:
        doc = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"Scores file {p} is not valid JSON ({exc}).") from exc
    if not isinstance(doc, dict) or doc.get("format") != SCORES_FORMAT:
        raise InputError(f"{p} is not a dptool scores file (its format is not {SCORES_FORMAT!r}).")
    if doc.get("version") != SCORES_VERSION:
        raise InputError(f"Scores file {p} has version {doc.get('version')!r}; this dptool reads version "
                         f"{SCORES_VERSION}.")
    missing = [k for k in _REQUIRED if k not in doc]
    if missing:
        raise InputError(f"Scores file {p} is missing {', '.join(repr(k) for k in missing)}.")
    groups = doc["groups"]
    try:
        if not isinstance(groups, list):
            raise TypeError("'groups' is not a list")
        cols = {k: [g[k] for g in groups] for k in ("id", "name", "score", "tiebreak", "rank")}
        scores = Scores(
            method=doc["method"], level=doc["level"], ids=np.asarray(cols["id"]), names=tuple(cols["name"]),
            scores=np.asarray(cols["score"], dtype=np.float64), tiebreak=np.asarray(cols["tiebreak"], np.float64),
            params=doc.get("params") or {}, surrogate=doc.get("surrogate"), source=doc["source"],
            target=doc.get("target"), tie_break=str(doc["tie_break"]), extra=doc.get("extra") or {},
            assignment=doc.get("assignment"), created=doc.get("created"),
            assignment_sha256=doc.get("assignment_sha256"), centroids=doc.get("centroids"),
            centroids_sha256=doc.get("centroids_sha256"),
        )
        stored = np.asarray(cols["rank"], dtype=np.float64)
        g = scores.num_groups
        if not np.array_equal(np.sort(stored), np.arange(g)):
            raise InputError(f"ranks must be a permutation of 0..{g - 1}.")
    except InputError as exc:
        raise InputError(f"Scores file {p} is invalid: {exc}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"Scores file {p} has malformed groups ({type(exc).__name__}: {exc}).") from exc
    if not np.array_equal(stored, scores.ranks):
        raise InputError(f"Scores file {p} has ranks that do not follow from its scores and tie-break values, so "
                         "prune would keep the wrong groups; score the source again instead of editing the file.")
    return scores


def score_summary(scores: Scores, top: int = 10) -> dict:
    """Plain-JSON summary: method, level, group count, zero-score count, tie rule and the `top` groups, best first
    (rank, id, name, score and tie-break value of each)."""
    order = np.argsort(scores.ranks, kind="stable")[:top]
    return {
        "method": scores.method, "level": scores.level, "groups": scores.num_groups,
        "zero_score_groups": int((scores.scores == 0).sum()), "tie_break": scores.tie_break,
        "top": [{"rank": int(scores.ranks[i]), "id": int(scores.ids[i]), "name": scores.names[i],
                 "score": float(scores.scores[i]), "tiebreak": float(scores.tiebreak[i])} for i in order],
    }


def removed_count(ratio: float, n_groups: int) -> int:
    """Groups removed at `ratio`: ratio·G rounded half up (after rounding away float noise)."""
    return int(math.floor(round(ratio * n_groups, 9) + 0.5))


def select_groups(scores: Scores, *, ratio: float | None = None, keep: int | None = None,
                  sizes: np.ndarray | None = None, ratio_flag: str = "--ratio") -> np.ndarray:
    """Ids of the kept groups, most important first: remove the fraction `ratio` of groups, or keep `keep`.

    With G groups, ``K = G - round_half_up(ratio * G)`` groups of lowest rank are kept (ratio in [0, 1), as in
    the paper: ratio 0.6 removes 60% of the classes). Ties are resolved by the ranks. `sizes` (samples per group
    id) leaves the groups without samples out before counting: an empty class folder, or a class a file was
    pruned of, is neither kept nor counted in G. `ratio_flag` names the ratio in a refusal (a value of --ratios).
    Returns (K,) int64.
    """
    order = scores.order()
    if sizes is not None:
        order = order[np.asarray(sizes)[order] > 0]
    g = len(order)
    some_empty = g < scores.num_groups
    if (ratio is None) == (keep is None):
        raise InputError("Give exactly one of --ratio and --keep.")
    if ratio is not None:
        if not isinstance(ratio, numbers.Real) or isinstance(ratio, bool) or not 0.0 <= float(ratio) < 1.0:
            raise InputError(f"{ratio_flag} must be a number in [0, 1), got {ratio!r}." if isinstance(ratio, str)
                             else f"{ratio_flag} must be in [0, 1), got {ratio}.")
        k = g - removed_count(float(ratio), g)
        if k < 1:
            raise InputError(f"{ratio_flag} {ratio} removes all {g} groups{' with samples' if some_empty else ''}; "
                             "use a smaller ratio.")
    else:
        if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or not 1 <= keep <= g:
            raise InputError(f"--keep must be in [1, {g}]{' (the groups with samples)' if some_empty else ''}, got "
                             f"{keep}.")
        k = int(keep)
    return order[:k].astype(np.int64)


