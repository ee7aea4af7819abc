"""Prune a source `.beton` with a scores file: keep the top-ranked classes (or FM clusters) and byte-copy their
samples into new `.beton` files, one per ratio, in one pass over the source.

Class-level scores keep every sample whose label is kept (the validation file can be pruned to the same classes);
cluster-level (FM) scores keep every sample whose cluster, from the assignment beside the scores, is kept. The
output keeps the source's labels and class list (the head stays as wide as the source's), and its sidecar records
what was kept and where it came from under ``pruning``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .atomic import output_group, stale_bytes
from .beton import (
    Beton,
    check_same_classes,
    classes_from_command,
    fingerprint,
    known_fingerprints,
    open_beton,
)
from .errors import InputError
from .integrity import record_digests, recorded_digests, sample_digests
from .scores import Scores, fingerprint_file, load_assignment, read_scores, select_groups
from .sidecar import check_beton_output, digests_path, sidecar_path, write_sidecar
from .subset import plan_subsets, write_subsets

__all__ = ["PrunedFile", "PruneResult", "PlannedFile", "PrunePlan", "prune", "check_scores_source", "cut_tie",
           "kept_samples", "output_paths"]

RATIO_PLACEHOLDER = "{ratio}"

log = logging.getLogger(__name__)


@dataclass
class PrunedFile:
    """One pruned `.beton`: what was kept and its size."""

    output: str
    split: str  # "train" (the source) or "val"
    ratio: float
    kept_groups: int
    num_samples: int
    num_classes_kept: int
    bytes: int
    # where the cut fell among groups of equal score (most do on a small target: LM's zeros): that score, how many
    # groups with samples have it, and how many of them the tie-break kept; None, 0, 0 when the score decided alone
    tie_score: float | None = None
    tied: int = 0
    tied_kept: int = 0


@dataclass
class PruneResult:
    """What `prune` wrote: the files, totals, and speed of the byte copy."""

    source: str
    scores: str
    method: str
    level: str
    empty_groups: int = 0  # groups without samples in the source: neither kept nor counted in the ratio
    tie_break: str = ""  # the scores file's rule for equal scores
    files: list[PrunedFile] = field(default_factory=list)
    bytes_written: int = 0
    # bytes read from the source (and the validation file): each kept sample's stored bytes once, however many
    # outputs keep it
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def mb_per_second(self) -> float:
        """Output bytes per second, in MB/s."""
        return self.bytes_written / 1e6 / max(self.seconds, 1e-9)

    def to_dict(self) -> dict:
        """Plain-JSON form for `--json`."""
        return {**asdict(self), "mb_per_second": self.mb_per_second}


@dataclass
class PlannedFile(PrunedFile):
    """One `.beton` a prune would write (`prune(..., dry_run=True)`): the numbers a prune reports for it, the share
    of its split's samples it keeps, the ideal epoch speed-up, and whether it exists already."""

    source_samples: int = 0  # samples of the file it is cut from (the source, or the validation file)
    share: float = 0.0  # num_samples / source_samples
    speedup: float = 0.0  # source_samples / num_samples: an epoch's samples, full over pruned
    exists: bool = False  # the output, its sidecar or its digests file is there: prune refuses it without --force


@dataclass
class PrunePlan:
    """What `prune` would write, from the tables alone (`dry_run=True`): nothing is read of the samples but the
    64 the fingerprint check hashes, and nothing is written."""

    source: str
    scores: str
    method: str
    level: str
    groups: int = 0  # groups with samples in the source: what the ratio counts
    empty_groups: int = 0
    tie_break: str = ""
    force: bool = False
    files: list[PlannedFile] = field(default_factory=list)
    bytes_to_write: int = 0  # the .beton files' bytes (sidecars and digests files, 4 bytes a sample, aside)
    bytes_to_read: int = 0  # the sources' bytes the byte copy reads, each kept sample's once
    # per file system the outputs go to: {"folder": one of its output folders, "bytes_to_write", "free_bytes",
    # "stale_bytes", "replaced_bytes"} (see `_space`)
    space: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain-JSON form for `--json`."""
        return {"dry_run": True, **asdict(self)}


def output_paths(template: str | os.PathLike, ratios: list[float]) -> list[Path]:
    """Output path per ratio: ``{ratio}`` in `template` becomes the ratio (``out_{ratio}.beton`` -> out_0.6.beton);
    several ratios need the placeholder."""
    text = str(template)
    if len(ratios) > 1 and RATIO_PLACEHOLDER not in text:
        raise InputError(f"Output {text} must contain {RATIO_PLACEHOLDER} when several ratios are given "
                         "(e.g. 'out_{ratio}.beton').")
    return [Path(text.replace(RATIO_PLACEHOLDER, f"{r:g}")) for r in ratios]


def _source_fingerprint(beton: Beton, computed: str | None = None) -> str:
    """The sidecar's fingerprint of `beton`, else one computed from the file (`computed`, when the caller has it)."""
    return (beton.sidecar or {}).get("fingerprint") or computed or fingerprint(beton)


def check_scores_source(scores: Scores, scores_path: str | os.PathLike, beton: Beton, *,
                        current: str | None = None) -> None:
    """Refuse scores computed on another source: class count, sample count or fingerprint differ (says which).
    `current`: `fingerprint(beton)` when the caller has it already."""
    src = scores.source
    if int(src["num_classes"]) != beton.num_classes:
        raise InputError(f"Scores file {scores_path} was computed for {int(src['num_classes'])} classes but "
                         f"{beton.path} has {beton.num_classes}; score this source first.")
    if int(src["num_samples"]) != beton.num_samples:
        raise InputError(f"Scores file {scores_path} was computed for {int(src['num_samples'])} samples but "
                         f"{beton.path} has {beton.num_samples}; score this source first.")
    have = known_fingerprints(beton, current)
    if src["fingerprint"] not in have:  # named by the fingerprint `dptool info` shows, not the older kind too
        raise InputError(f"Scores file {scores_path} belongs to another source: it was computed on "
                         f"{src.get('path', 'a file')} (fingerprint {src['fingerprint']}), not on {beton.path} "
                         f"(fingerprint {current or fingerprint(beton)}); score this source first.")
    if scores.level == "class" and not np.array_equal(np.sort(scores.ids), np.arange(beton.num_classes)):
        raise InputError(f"Scores file {scores_path} scores {scores.num_groups} groups, not each of the "
                         f"{beton.num_classes} classes of {beton.path}.")


def kept_samples(groups_of_samples: np.ndarray, kept_groups: np.ndarray) -> np.ndarray:
    """(K,) int64 indices, ascending (file order), of the samples whose group (label or cluster) is kept."""
    g = np.asarray(groups_of_samples, dtype=np.int64)
    top = int(max(g.max(initial=0), np.max(kept_groups, initial=0))) + 1
    keep = np.zeros(top, dtype=bool)
    keep[np.asarray(kept_groups, dtype=np.int64)] = True
    return np.flatnonzero(keep[g]).astype(np.int64)


def cut_tie(scores: Scores, kept: np.ndarray, sizes: np.ndarray) -> tuple[float, int, int] | None:
    """Where the cut fell among equal scores: (score of the last kept group, groups with samples at that score,
    kept ones among them), or None when every removed group scores below every kept one (the tie-break decided
    nothing). `kept`: kept group ids; `sizes`: samples per group id."""
    kept = np.asarray(kept, dtype=np.int64)
    ids = np.asarray(scores.ids, dtype=np.int64)
    values = np.asarray(scores.scores, dtype=np.float64)
    if len(kept) == 0 or len(ids) == 0:
        return None
    sizes = np.asarray(sizes)
    populated = np.zeros(len(ids), dtype=bool)
    inside = ids < len(sizes)
    populated[inside] = sizes[ids[inside]] > 0
    kept_values = values[np.isin(ids, kept)]
    low = float(kept_values.min())
    tied = int(np.count_nonzero(populated & (values == low)))
    tied_kept = int(np.count_nonzero(kept_values == low))
    return (low, tied, tied_kept) if tied > tied_kept else None


def _selections(scores: Scores, ratio, keep, ratios, sizes: np.ndarray) -> list[tuple[float, np.ndarray]]:
    """[(ratio, kept group ids)] for the options given: exactly one of ratio, keep, ratios; groups without
    samples (`sizes` 0) are left out of the count."""
    if sum(x is not None for x in (ratio, keep, ratios)) != 1:
        raise InputError("Give exactly one of --ratio, --keep and --ratios.")
    if keep is not None:
        kept = select_groups(scores, keep=keep, sizes=sizes)
        populated = int(np.count_nonzero(sizes))
        return [((populated - len(kept)) / populated, kept)]
    if ratio is None and (isinstance(ratios, (str, bytes)) or not hasattr(ratios, "__iter__")):
        raise InputError(f"--ratios must be a list of numbers such as [0.2, 0.4], got {ratios!r}.")
    ratios = [ratio] if ratio is not None else list(ratios)
    if not ratios:
        raise InputError("--ratios must list at least one ratio, got none.")
    dup = {r for r in ratios if ratios.count(r) > 1}
    if dup:
        raise InputError(f"--ratios lists {min(dup):g} more than once; give each ratio once.")
    flag = "--ratio" if ratio is not None else "--ratios value"
    return [(float(r), select_groups(scores, ratio=r, sizes=sizes, ratio_flag=flag)) for r in ratios]


def _sidecar(beton: Beton, source_fp: str, counts: np.ndarray, ratio: float, kept: np.ndarray, scores: Scores,
             scores_path: Path, scores_fp: str, written: Beton, digests: dict,
             tie: tuple[float, int, int] | None = None) -> dict:
    side = beton.sidecar or {}
    kept_list = sorted(int(k) for k in kept)
    pruning = {
        "ratio": ratio, "level": scores.level, "kept_groups": len(kept),
        ("kept_classes" if scores.level == "class" else "kept_clusters"): kept_list,
        "scores": str(scores_path.resolve()), "scores_fingerprint": scores_fp, "method": scores.method,
        "source": str(beton.path.resolve()), "source_fingerprint": source_fp,
    }
    if tie is not None:  # the cut fell among equal scores: the tie-break picked `kept` of `groups` at `score`
        pruning["tie_at_cut"] = {"score": tie[0], "groups": tie[1], "kept": tie[2]}
    return {
        **{k: side[k] for k in ("fields", "writer", "source") if k in side},
        "num_samples": int(counts.sum()), "num_classes": beton.num_classes, "class_names": beton.class_names,
        "class_counts": counts.tolist(), "fingerprint": fingerprint(written),
        "digests": digests, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pruning": pruning,
    }


def _write(beton: Beton, source_fp: str, split: str, jobs: list[tuple[Path, float, np.ndarray, np.ndarray]],
           scores: Scores, scores_path: Path, sizes: np.ndarray, force: bool,
           progress: bool) -> tuple[list[PrunedFile], float, int]:
    """Byte-copy one source's subsets in one pass and write their sidecars; returns files, seconds, bytes read."""
    scores_fp = fingerprint_file(scores_path)
    labels = beton.labels
    counts = [np.bincount(labels[idx], minlength=beton.num_classes) for _, _, _, idx in jobs]
    ties = [cut_tie(scores, kept, sizes) for _, _, kept, _ in jobs]  # for the sidecar and the result alike
    by_path = {os.path.abspath(p): (r, kept, c, idx, tie) for (p, r, kept, idx), c, tie in zip(jobs, counts, ties)}
    try:  # checked before any byte is copied
        source_digests = recorded_digests(beton)
    except InputError as exc:  # the source's record is lost, not its data: the outputs' digests are read back
        log.warning("%s The pruned files' digests are read from them instead.", exc)
        source_digests = None

    def finalize(final: Path, written: Path) -> None:
        r, kept, c, idx, tie = by_path[os.path.abspath(final)]
        out = open_beton(written, require_label=False)  # its tables, for the fingerprint (and a read-back)
        # the kept samples' bytes are copies of the source's, so are their digests; without the source's, read back
        digests = source_digests[idx] if source_digests is not None else sample_digests(out)
        write_sidecar(final, _sidecar(beton, source_fp, c, r, kept, scores, scores_path, scores_fp, out,
                                      record_digests(final, digests), tie))

    results = write_subsets(beton, {p: idx for p, _, _, idx in jobs}, force=force, progress=progress,
                            finalize=finalize)
    files = [PrunedFile(output=res.output, split=split, ratio=r, kept_groups=len(kept), num_samples=res.num_samples,
                        num_classes_kept=int(np.count_nonzero(c)), bytes=res.bytes)
             for res, (_, r, kept, _), c in zip(results, jobs, counts)]
    for f, tie in zip(files, ties):
        f.tie_score, f.tied, f.tied_kept = tie or (None, 0, 0)
    return files, results[0].seconds, results[0].bytes_read


def _planned(beton: Beton, split: str, jobs: list[tuple[Path, float, np.ndarray, np.ndarray]], scores: Scores,
             sizes: np.ndarray) -> tuple[list[PlannedFile], int]:
    """The files `_write` would write for one source, laid out as it lays them out; returns them and the source
    bytes the copy would read."""
    results = plan_subsets(beton, {p: idx for p, _, _, idx in jobs})
    files = []
    for res, (p, r, kept, idx) in zip(results, jobs):
        tie_score, tied, tied_kept = cut_tie(scores, kept, sizes) or (None, 0, 0)
        files.append(PlannedFile(
            output=res.output, split=split, ratio=r, kept_groups=len(kept), num_samples=res.num_samples,
            num_classes_kept=int(np.count_nonzero(np.bincount(beton.labels[idx]))), bytes=res.bytes,
            tie_score=tie_score, tied=tied, tied_kept=tied_kept, source_samples=beton.num_samples,
            share=res.num_samples / beton.num_samples, speedup=beton.num_samples / res.num_samples,
            exists=any(q.exists() for q in (p, sidecar_path(p), digests_path(p)))))
    return files, results[0].bytes_read


def _space(files: list[PlannedFile]) -> list[dict]:
    """Per file system the outputs go to (in the order first met): a folder of them on it, the `.beton` bytes bound
    for it, its free bytes now, the bytes of temporary files that interrupted runs left there and that prune
    removes before it writes (`stale_bytes`), and the bytes of the existing files --force replaces
    (`replaced_bytes`: freed only once every output is written, since each is written in full before the old one
    goes)."""
    by_device: dict[int, dict] = {}
    for f in files:
        folder = Path(f.output).parent
        entry = by_device.setdefault(os.stat(folder).st_dev, {
            "folder": str(folder), "bytes_to_write": 0, "free_bytes": shutil.disk_usage(folder).free,
            "stale_bytes": 0, "replaced_bytes": 0})
        entry["bytes_to_write"] += f.bytes
        for q in (Path(f.output), sidecar_path(f.output), digests_path(f.output)):
            entry["stale_bytes"] += stale_bytes(q)
            if q.is_file():
                entry["replaced_bytes"] += q.stat().st_size
    return list(by_device.values())


def _dry_run(result: PruneResult, beton: Beton, jobs, vbeton: Beton | None, vjobs, scores: Scores,
             sizes: np.ndarray, force: bool) -> PrunePlan:
    """`prune`'s plan once its checks have passed: each output's numbers, computed without writing."""
    for b in (beton, vbeton) if vjobs else (beton,):
        try:  # the check `_write` makes, with its warning
            recorded_digests(b)
        except InputError as exc:
            log.warning("%s The pruned files' digests would be read from them instead.", exc)
    files, read = _planned(beton, "train", jobs, scores, sizes)
    if vjobs:
        vfiles, vread = _planned(vbeton, "val", vjobs, scores, sizes)
        files, read = files + vfiles, read + vread
    return PrunePlan(source=result.source, scores=result.scores, method=result.method, level=result.level,
                     groups=int(np.count_nonzero(sizes)), empty_groups=result.empty_groups,
                     tie_break=result.tie_break, force=force, files=files,
                     bytes_to_write=sum(f.bytes for f in files), bytes_to_read=read, space=_space(files))


def prune(source: str | os.PathLike, scores_path: str | os.PathLike, output: str | os.PathLike, *,
          ratio: float | None = None, keep: int | None = None, ratios: list[float] | None = None,
          val: str | os.PathLike | None = None, val_output: str | os.PathLike | None = None,
          force: bool = False, progress: bool = False, dry_run: bool = False) -> PruneResult | PrunePlan:
    """Prune `source` with the scores file at `scores_path` and write the pruned `.beton` (+ sidecar) per ratio.

    Parameters
    ----------
    source : the `.beton` the scores were computed on (opened read-only).
    scores_path : the scores file (`dptool score`); cluster-level scores need their assignment beside it.
    output : output path; with several `ratios` a template holding ``{ratio}``.
    ratio, keep, ratios : exactly one: the fraction of groups removed, the number of groups kept, or several
        ratios written in one pass over the source.
    val, val_output : optionally prune a validation `.beton` to the same classes (class-level scores only).
    force : overwrite existing outputs.
    progress : progress bar on stderr.
    dry_run : run every check, then return a `PrunePlan` of what would be written, and write nothing; an existing
        output is not refused but marked (`exists`), as prune would refuse it without `force`.
    """
    scores_path = Path(scores_path)
    scores = read_scores(scores_path)
    if (val is None) != (val_output is None):
        raise InputError("--val and --val-out go together; give both or neither.")
    if val is not None and scores.level != "class":
        raise InputError(f"--val needs class-level scores, but {scores_path} is {scores.level}-level "
                         "(cluster pruning keeps samples, not classes).")
    beton = open_beton(source)
    computed = fingerprint(beton)  # once, for both the check and the provenance
    source_fp = _source_fingerprint(beton, computed)
    check_scores_source(scores, scores_path, beton, current=computed)
    groups_of = beton.labels if scores.level == "class" else load_assignment(scores_path, scores)
    sizes = np.bincount(groups_of, minlength=scores.num_groups)
    selections = _selections(scores, ratio, keep, ratios, sizes)
    empty = int(np.count_nonzero(sizes == 0))
    if empty:
        log.warning("%d of the %d %s have no samples in %s; the ratio counts the other %d", empty, len(sizes),
                    "classes" if scores.level == "class" else "clusters", beton.path, len(sizes) - empty)
    rs = [r for r, _ in selections]
    outs = output_paths(output, rs)
    val_outs = output_paths(val_output, rs) if val_output is not None else []
    seen: dict[str, Path] = {}
    for p in outs + val_outs:
        # the file each names: a folder reached through a link (-o a/p.beton --val-out linked_a/p.beton) is the same
        same = os.path.join(os.path.realpath(p.parent), p.name)
        if same in seen and os.path.abspath(seen[same]) != os.path.abspath(p):
            raise InputError(f"Outputs {seen[same]} and {p} are the same file (their folders are one, through a "
                             "link); give --val-out a name other than -o.")
        if same in seen:
            raise InputError(f"Two outputs would both be {p}: give ratios that differ as {RATIO_PLACEHOLDER} writes "
                             "them, and --val-out a name other than -o.")
        seen[same] = p
    # the assignment by the name the scores file records (it stays put when the scores file is moved)
    inputs = (source, scores_path, val, scores_path.with_name(scores.assignment) if scores.assignment else None)
    for p in outs + val_outs:
        check_beton_output(p, force=force or dry_run, inputs=inputs, dry_run=dry_run)

    jobs = [(p, r, kept, kept_samples(groups_of, kept)) for p, (r, kept) in zip(outs, selections)]
    vbeton, vjobs = None, []
    if val is not None:
        vbeton = open_beton(val)
        if vbeton.num_classes != beton.num_classes:
            raise InputError(f"Validation file {vbeton.path} has {vbeton.num_classes} classes but {beton.path} "
                             f"has {beton.num_classes}; give the validation split of the same dataset (a val "
                             f"folder lacking classes: {classes_from_command(vbeton, beton.path)}).")
        check_same_classes(beton, vbeton, "Validation file", "validation")
        vjobs = [(p, r, kept, kept_samples(vbeton.labels, kept)) for p, (r, kept) in zip(val_outs, selections)]
    for (p, _, kept, idx), b in [(j, beton) for j in jobs] + [(j, vbeton) for j in vjobs]:
        if len(idx) == 0:
            raise InputError(f"The {len(kept)} kept groups hold no samples of {b.path}, so {p} would be empty.")

    result = PruneResult(source=str(beton.path), scores=str(scores_path), method=scores.method, level=scores.level,
                         empty_groups=empty, tie_break=scores.tie_break)
    if dry_run:
        return _dry_run(result, beton, jobs, vbeton, vjobs, scores, sizes, force)
    with output_group():  # the training and validation outputs are renamed into place together, or none
        files, seconds, read = _write(beton, source_fp, "train", jobs, scores, scores_path, sizes, force,
                                         progress)
        if vjobs:
            vfiles, vseconds, vread = _write(vbeton, _source_fingerprint(vbeton), "val", vjobs, scores, scores_path,
                                             sizes, force, progress)
            files, seconds, read = files + vfiles, seconds + vseconds, read + vread
    result.files = files
    result.bytes_written = sum(f.bytes for f in files)
    result.bytes_read = read
    result.seconds = seconds
    return result
