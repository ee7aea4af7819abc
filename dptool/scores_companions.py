"""The NumPy files beside a scores file: the per-sample cluster assignment and the group centroids of FM scores.

Each is named by the scores file (``<stem>.assign.npy``, ``<stem>.centroids.npy``) and tied to it by the sha256 of
its bytes, recorded when both were written (`npy_bytes`) and checked when it is read (`read_recorded_npy`, which the
digests file of a .beton uses too): a later `dptool score -o` with the same stem rewrites the file, and its name alone
would pair it with the wrong scores. `write_scores` and `read_scores` (dptool.scores) write and read the scores file
itself; this module finds, checks and loads the arrays beside it. `fingerprint_file` is the sha256 of any file.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import InputError
from .sidecar import companions_of

if TYPE_CHECKING:
    from .scores import Scores

__all__ = [
    "assignment_path",
    "centroids_path",
    "npy_bytes",
    "read_recorded_npy",
    "companion_path",
    "load_assignment",
    "load_centroids",
    "fingerprint_file",
]


def assignment_path(scores_path: str | os.PathLike) -> Path:
    """Where the cluster assignment of `scores_path` goes: ``<stem>.assign.npy`` beside it."""
    p = Path(scores_path)
    return p.with_name(f"{p.stem}.assign.npy")


def centroids_path(scores_path: str | os.PathLike) -> Path:
    """Where the group centroids of `scores_path` go: ``<stem>.centroids.npy`` beside it."""
    p = Path(scores_path)
    return p.with_name(f"{p.stem}.centroids.npy")


def _check_assignment(assignment: np.ndarray, scores: Scores, where: str) -> np.ndarray:
    a = np.asarray(assignment)
    n = int(scores.source["num_samples"])
    if a.ndim != 1 or len(a) != n:
        raise InputError(f"{where} must hold one cluster id per source sample ({n}), got shape {a.shape}.")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise InputError(f"{where} must hold integer cluster ids, got dtype {a.dtype}.")
    a = a.astype(np.int32, copy=False)
    unknown = np.setdiff1d(np.unique(a), scores.ids)
    if len(unknown):
        raise InputError(f"{where} holds cluster id {int(unknown[0])}, which has no score "
                         f"({len(unknown)} unknown ids in all).")
    return a


def _check_centroids(centroids: np.ndarray, scores: Scores, where: str) -> np.ndarray:
    c = np.asarray(centroids)
    g = scores.num_groups
    if c.ndim != 2 or len(c) != g or c.shape[1] < 1:
        raise InputError(f"{where} must hold one centroid row per group ({g}, D), got shape {c.shape}.")
    if not np.array_equal(scores.ids, np.arange(g)):
        raise InputError(f"{where}: centroid rows are indexed by group id, so the ids must be 0..{g - 1}.")
    if not np.issubdtype(c.dtype, np.floating):
        raise InputError(f"{where} must hold floating-point centroids, got dtype {c.dtype}.")
    if not np.isfinite(c).all():
        raise InputError(f"{where}: NaN or infinite values (from features that were not finite numbers); "
                         "check the surrogate's output on the source.")
    return c.astype(np.float32, copy=False)


def npy_bytes(a: np.ndarray) -> tuple[bytes, str]:
    """The .npy bytes of `a` and their ``sha256:<hex>``: fingerprinted before writing, so the file's hash is this."""
    buf = io.BytesIO()
    np.save(buf, a)
    data = buf.getvalue()
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


def read_recorded_npy(path: str | os.PathLike, sha256: str | None) -> np.ndarray | None:
    """The array of the `.npy` file `path`, read once and checked against the ``sha256:<hex>`` recorded when it was
    written (`npy_bytes`); None when its bytes' differs (the file was replaced), unchecked when `sha256` is None.
    OSError when the file cannot be read, ValueError when it is no `.npy` file."""
    data = Path(path).read_bytes()
    if sha256 is not None and "sha256:" + hashlib.sha256(data).hexdigest() != sha256:
        return None
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except EOFError as exc:  # an empty or cut-off file
        raise ValueError(f"the file ends early ({exc})") from exc


def companion_path(scores_path: str | os.PathLike, name: str) -> Path:
    """The path of the file `name` written beside `scores_path` (its assignment or centroids), found as
    `companions_of` finds a .beton's sidecar: beside a symbolic link, else beside the file the link points to."""
    return companions_of(scores_path, lambda p: p.with_name(name)).with_name(name)


def _load_companion(scores_path: str | os.PathLike, name: str, sha256: str | None, what: str) -> np.ndarray:
    """The array of the file `name` beside `scores_path` (found as `companions_of` says: for a symbolic link, beside
    the file it points to), checked against the `sha256` the scores file records."""
    path = companion_path(scores_path, name)
    if not path.is_file():
        raise InputError(f"Scores file {scores_path} names {what} {path.name}, but {path} does not exist.")
    # the name alone does not tie the file to these scores: a later `dptool score -o` with the same stem rewrites it
    try:
        array = read_recorded_npy(path, sha256 or None)
    except OSError as exc:  # unreadable (permissions, a failing disk), not replaced
        raise InputError(f"{what.capitalize()} file {path} of scores file {scores_path} cannot be read "
                         f"({exc.strerror or exc}); make it readable.") from exc
    except ValueError as exc:
        raise InputError(f"{what.capitalize()} file {path} is not a NumPy array file ({exc}).") from exc
    if array is None:
        raise InputError(f"{what.capitalize()} file {path} is not the one scores file {scores_path} was written with "
                         "(its sha256 differs): it was replaced since; score the source again.")
    return array


def load_assignment(scores_path: str | os.PathLike, scores: Scores) -> np.ndarray:
    """(N_source,) int32 cluster id of every source sample, from the file beside `scores_path`."""
    if scores.assignment is None:
        raise InputError(f"Scores file {scores_path} has no cluster assignment (its level is {scores.level!r}).")
    a = _load_companion(scores_path, scores.assignment, scores.assignment_sha256, "assignment")
    return _check_assignment(a, scores, f"Assignment file {companion_path(scores_path, scores.assignment)}")


def load_centroids(scores_path: str | os.PathLike, scores: Scores) -> np.ndarray:
    """(G, D) float32 centroid of every group (row = group id), from the file beside `scores_path` (FM)."""
    if scores.centroids is None:
        raise InputError(f"Scores file {scores_path} names no centroids file (only FM scores have one, and only "
                         "those written by a dptool that has `score --centroids-from`).")
    c = _load_companion(scores_path, scores.centroids, scores.centroids_sha256, "centroids")
    return _check_centroids(c, scores, f"Centroids file {companion_path(scores_path, scores.centroids)}")


def fingerprint_file(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of the file's bytes (provenance of a scores or assignment file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()
