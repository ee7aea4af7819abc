"""Per-sample digests of a `.beton`: recorded when dptool writes one, checked by `dptool verify`.

A `.beton`'s fingerprint hashes its tables and 64 samples, so a file copied or stored badly can pass it with
damaged images. `convert` and `prune` also record the CRC-32 of every sample's stored bytes in
`X.beton.digests.npy` ((N,) uint32, sample order), named in the sidecar with its sha256. `verify` reads every
sample again and names the ones whose bytes differ from when the file was written. A pruned file's digests are
the source's of the kept samples (the bytes are copies), checked against the source's record first; a source
without one (written by FFCV, or by an earlier dptool) has the written file read back instead.
"""

from __future__ import annotations

import os
import time
import zlib
from pathlib import Path

import numpy as np

from .atomic import atomic_output
from .beton import Beton, NotABetonError, fingerprint, known_fingerprints, open_beton
from .errors import InputError
from .sidecar import companions_of, digests_path
from .writer_progress import interrupted_conversion_message

__all__ = ["DIGEST_ALGORITHM", "digests_path", "sample_digests", "recorded_digests", "record_digests", "verify",
           "verify_files"]

DIGEST_ALGORITHM = "crc32"
_STEP = 8 << 20  # bytes a thread reads at a time (its buffer: threads x this much memory)


def sample_digests(beton: Beton, *, progress: bool = False, threads: int | None = None) -> np.ndarray:
    """CRC-32 of every sample's stored bytes, (N,) uint32 (0 for a sample without data).

    The data region is read in blocks of about 8 MiB in file order, by `threads` threads (default: the cores, at
    most 8; zlib releases the GIL on large buffers, so reads and checksums of several blocks overlap).
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from .subset import pread_into, sample_extents

    start, stop, _ = sample_extents(beton)
    out = np.zeros(beton.num_samples, dtype=np.uint32)
    order = np.argsort(start, kind="stable")
    order = order[stop[order] > start[order]]
    starts = start[order]
    bounds = [0]  # blocks of samples: each begins where the previous ends and spans about _STEP bytes
    while bounds[-1] < len(order):
        i = bounds[-1]
        bounds.append(max(i + 1, int(np.searchsorted(starts, starts[i] + _STEP, side="left"))))
    fd = os.open(beton.path, os.O_RDONLY)

    def digest(i: int, j: int) -> int:
        block = order[i:j]
        lo = int(starts[i])
        buf = np.empty(int(stop[block].max()) - lo, dtype=np.uint8)
        pread_into(fd, buf, lo, str(beton.path))
        view = memoryview(buf)
        for s, a, b in zip(block.tolist(), (start[block] - lo).tolist(), (stop[block] - lo).tolist()):
            out[s] = zlib.crc32(view[a:b])  # each block writes its own samples' slots
        return int((stop[block] - start[block]).sum())

    threads = threads or min(8, os.cpu_count() or 1)
    try:
        with ThreadPoolExecutor(threads) as pool, \
                tqdm(total=int((stop - start).sum()), unit="B", unit_scale=True, desc="digests",
                     disable=not progress) as bar:
            for done in pool.map(digest, bounds[:-1], bounds[1:]):
                bar.update(done)
    finally:
        os.close(fd)
    return out


def recorded_digests(beton: Beton) -> np.ndarray | None:
    """The digests recorded for `beton` (checked: its digests file unchanged since, one per sample), else None when
    its sidecar records none. A record whose file is missing or replaced is an InputError."""
    from .scores import read_recorded_npy

    record = (beton.sidecar or {}).get("digests")
    if not record:
        return None
    path = digests_path(companions_of(beton.path))  # found as its sidecar is, so that a renamed trio still pairs
    if not path.is_file():
        raise InputError(f"Digests file {path}, which the sidecar of {beton.path} names, is missing; copy it with "
                         "the .beton and its sidecar.")
    try:  # a record without a sha256 matches no file: str() makes it one that cannot match
        digests = read_recorded_npy(path, str(record.get("sha256")))
    except OSError as exc:  # unreadable (permissions, a failing disk): the record is there but cannot be used
        raise InputError(f"Digests file {path} of {beton.path} cannot be read ({exc.strerror or exc}); make it "
                         "readable, or copy it again with the .beton and its sidecar.") from exc
    if digests is None:
        raise InputError(f"Digests file {path} was replaced since {beton.path} was written (its sha256 differs "
                         "from the sidecar's).")
    if digests.dtype != np.uint32 or digests.shape != (beton.num_samples,):
        raise InputError(f"Digests file {path} holds {digests.dtype} {digests.shape}, not one uint32 per sample "
                         f"of {beton.path} ({beton.num_samples}).")
    return digests


def record_digests(final: Path, digests: np.ndarray) -> dict:
    """Write `digests` as the digests file of the `.beton` `final` (inside `output_group`, renamed with it); return
    the sidecar's record of it."""
    from .scores import npy_bytes

    path = digests_path(final)
    npy, sha = npy_bytes(np.ascontiguousarray(digests, dtype=np.uint32))
    with atomic_output(path, companion_of=final) as tmp:
        tmp.write_bytes(npy)
    return {"file": path.name, "algorithm": DIGEST_ALGORITHM, "sha256": sha}


def verify(path: str | os.PathLike, *, progress: bool = False, max_listed: int = 1000) -> dict:
    """Read every sample of the `.beton` at `path` and compare it with the digests recorded when it was written.

    Returns a summary: `intact` (every sample and the fingerprint as written), `damaged` (the sample indices
    whose bytes differ, at most `max_listed`), `num_damaged`, `fingerprint_matches` (the sidecar's fingerprint,
    which also covers the tables: labels, metadata, where each sample is).
    A file without recorded digests is an InputError.
    """
    return _verify(*_recorded(path), progress=progress, max_listed=max_listed)


def verify_files(paths, *, progress: bool = False, max_listed: int = 1000) -> dict:
    """`verify` each of `paths`, after checking that every one has recorded digests (before reading any sample).

    Returns ``{"intact": all intact, "files": [one `verify` summary per path]}``; a file named twice (by
    another spelling or a link) is read once.
    """
    unique = {}
    for p in paths:
        unique.setdefault(os.path.realpath(p), p)
    recorded = [_recorded(p) for p in unique.values()]
    files = [_verify(beton, expected, progress=progress, max_listed=max_listed) for beton, expected in recorded]
    return {"intact": all(f["intact"] for f in files), "files": files}


def _recorded(path: str | os.PathLike) -> tuple[Beton, np.ndarray]:
    """The opened `.beton` at `path` and its recorded digests; an InputError when it has none."""
    for companion, what in ((".beton.json", "sidecar"), (".beton.digests.npy", "digests file")):
        if str(path).endswith(companion):  # a shell's `*` brings them along with the .beton files
            raise InputError(f"{path} is the {what} of {str(path)[: -len(companion)]}.beton; give the .beton files "
                             "(dptool verify DIR/*.beton).")
    # the sidecar is the record verify checks the file against: a file whose labels changed since (a damaged
    # label table) no longer matches its per-class counts, which is for the fingerprint to report, not a refusal
    try:
        beton = open_beton(path, require_label=False, check_sidecar=False, check_labels=False)
    except NotABetonError as exc:
        if (partial := interrupted_conversion_message(path)) is not None:
            raise InputError(partial) from exc
        raise
    expected = recorded_digests(beton)
    if expected is None:
        raise InputError(f"{beton.path} has no recorded digests (it was written by FFCV's own writer, or by a "
                         "dptool before they were recorded), so there is nothing to verify it against.")
    return beton, expected


def _verify(beton: Beton, expected: np.ndarray, *, progress: bool, max_listed: int) -> dict:
    started = time.perf_counter()
    recorded_fp = (beton.sidecar or {}).get("fingerprint")
    fingerprint_matches = recorded_fp is None or recorded_fp in known_fingerprints(beton, fingerprint(beton))
    found = sample_digests(beton, progress=progress)
    damaged = np.flatnonzero(found != expected)
    return {
        "path": str(beton.path), "num_samples": int(beton.num_samples), "algorithm": DIGEST_ALGORITHM,
        "intact": bool(fingerprint_matches and len(damaged) == 0), "fingerprint_matches": bool(fingerprint_matches),
        "num_damaged": int(len(damaged)), "damaged": damaged[:max_listed].tolist(),
        "seconds": round(time.perf_counter() - started, 3),
    }
