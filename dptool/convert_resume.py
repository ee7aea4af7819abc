"""What lets `dptool convert --resume` continue an interrupted conversion: the run's identity (the source, the
options and the versions its bytes depend on, hashed), the locked ``.OUT.partial`` file the conversion is written
into, and the check of its progress record against this run's identity before it is continued.

`dptool.convert` writes the file and its progress records (`dptool.writer_progress`) with these.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import signal
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .errors import InputError
from .source_dataset import SourceDataset
from .writer import WriterParams
from .writer_progress import partial_paths, read_checkpoint

__all__ = ["CHECKPOINT_SECONDS"]

log = logging.getLogger(__name__)


#: Seconds between two progress records of a conversion (`--resume`); the environment variable is for tests.
CHECKPOINT_SECONDS = 30.0
_CHECKPOINT_ENV = "DPTOOL_CONVERT_CHECKPOINT_SECONDS"

# what a resume refuses to continue when it changed, named in the refusal ("source" is named by `_source_identity`)
_IDENTITY_NAMES = {
    "format": "--format", "split": "--split", "order": "--seed", "on_error": "--on-error",
    "writer": "the writer options (--preset, --max-res, --write-mode, --jpeg-quality, --compress-prob)",
    "max_pixels": "the decoder's pixel limit", "classes_from": "the --classes-from file (or its classes)",
    "versions": "the version of dptool, FFCV, Pillow or OpenCV",
}


def _hash(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes | memoryview) else json.dumps(part, sort_keys=True).encode())
    return h.hexdigest()


def _file_list_hash(paths, labels: np.ndarray) -> str:
    """A hash of each file's path, label, size and modification time (a missing file counts as such)."""
    h = hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    lines: list[str] = []
    for path in paths:
        try:
            st = os.stat(path)
            lines.append(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n")
        except OSError:
            lines.append(f"{path}\0missing\n")
        if len(lines) == 65536:  # hashed in batches: one update a line would double the time
            h.update("".join(lines).encode("utf-8", "surrogateescape"))
            lines.clear()
    h.update("".join(lines).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _source_identity(src, source: SourceDataset) -> tuple[str | None, str]:
    """What tells this source from a changed one, without reading its images, and what that is in words (for a
    refusal and the resume's log): the file list with sizes and times (ImageFolder, CoOp and the torchvision
    datasets that keep one), the file's size and time (.npz, a tar) or the torchvision dataset's arrays. None for a
    torchvision dataset that keeps neither where dptool looks (another torchvision version): it cannot be resumed."""
    common = [os.path.abspath(src), source.class_names]
    # --classes-from is its own part of the identity, by fingerprint (the file may move); not the source's
    provenance = {k: v for k, v in source.provenance.items() if k != "classes_from"}
    if "tar" in provenance:  # a tar (--format tar, or a label list's images): its size and time, as an .npz's
        provenance.pop("label_list", None)  # the list itself is its own part of the identity
        return (_hash(*common, provenance, source.labels.tobytes()),
                f"the tar {source.root} (its size or modification time)")
    if source.format == "imagefolder":
        return (_hash(*common, provenance, _file_list_hash(map(source.describe, range(len(source))),
                                                           source.labels)),
                "the source (its files, their labels, sizes or modification times)")
    if source.format.startswith(("coop", "list:")):  # the split file or list itself is "split_file" or "label_list"
        return (_hash(*common, _file_list_hash(map(source.describe, range(len(source))), source.labels)),
                f"the images the {'split lists' if source.format.startswith('coop') else 'list names'} (their paths, "
                "labels, sizes or modification times)")
    if source.format == "npz":
        st = os.stat(src)
        return (_hash(*common, provenance, [st.st_size, st.st_mtime_ns], source.labels.tobytes()),
                "the source (the .npz file's size or modification time)")
    ds = getattr(source, "dataset", None)
    for attr in ("_image_files", "_images", "_samples"):
        files = getattr(ds, attr, None)
        if files:
            paths = [os.fspath(f[0] if isinstance(f, tuple | list) else f) for f in files]
            return (_hash(*common, provenance, _file_list_hash(paths, source.labels)),
                    "the torchvision dataset (its image files, their labels, sizes or modification times)")
    data = getattr(ds, "data", None)
    if data is None:
        return None, "the torchvision dataset (dptool finds neither its list of image files nor its image array)"
    # hashed as it is held (CIFAR's is a transposed view: copied once, contiguous, to be hashed)
    return (_hash(*common, provenance, source.labels.tobytes(),
                  memoryview(np.ascontiguousarray(np.asarray(data))).cast("B")),
            "the torchvision dataset (its image and label arrays)")


def _run_identity(src, source: SourceDataset, order: np.ndarray, params: WriterParams, on_error: str,
                  max_pixels: int) -> tuple[dict, dict]:
    """What a resumed conversion must share with the interrupted one for its output to be the same bytes: each
    part hashed or given as it is (the workers are left out: the bytes do not depend on them); and each part's
    name for a refusal. The "source" is None where dptool cannot tell a changed source (a conversion of it is not
    resumable)."""
    import cv2
    import PIL

    from . import __version__

    ffcv = _ffcv_version()
    writer = {**asdict(params), "page_size": params.resolved_page_size()}
    writer.pop("num_workers")
    source_hash, checked = _source_identity(src, source)
    identity = {"source": source_hash}
    names = {**_IDENTITY_NAMES, "source": checked}
    if "split_file" in source.provenance:  # a CoOp split: its bytes (all its splits name the classes)
        identity["split_file"] = source.provenance["split_file"]["sha256"]
        names["split_file"] = f"the split file {source.provenance['split_file']['path']}"
    if "label_list" in source.provenance:  # a label list: its bytes
        identity["label_list"] = source.provenance["label_list"]["sha256"]
        names["label_list"] = f"the label list {source.provenance['label_list']['path']}"
    if "classes_from" in source.provenance:  # the reference file, by fingerprint: another one relabels the samples
        identity["classes_from"] = source.provenance["classes_from"]["fingerprint"]
    identity.update({"format": source.format, "split": source.split, "order": _hash(order.tobytes()),
                     "on_error": on_error, "writer": writer, "max_pixels": max_pixels,
                     "versions": [__version__, ffcv, PIL.__version__, cv2.__version__]})
    if source.format.startswith("torchvision:"):  # its dataset class lists the files and labels and reads them
        import torchvision

        identity["versions"].append(torchvision.__version__)
        names["versions"] = "the version of dptool, FFCV, Pillow, OpenCV or torchvision"
    return identity, names


def _ffcv_version() -> str:
    """FFCV's version (its encoders make the bytes)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ffcv")
    except PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def _partial_file(out: Path):
    """Create (or open) the partial file of `out` and hold a lock on it while the conversion runs; refuse when
    another conversion holds it."""
    partial, _ = partial_paths(out)
    fd, locked = None, False
    try:
        # a Ctrl-C while the file is made and locked is held back to the end of this step, so that it is raised
        # with the lock held, where the file is removed below (the test of an interrupted conversion sends it the
        # instant the file appears)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InputError(f"Another dptool is converting to {out} (its partial file {partial} is locked); "
                                 "wait for it to end or stop it.") from None
            except OSError:
                pass  # a file system without locks: as before, two runs at once are the user's to avoid
            locked = True
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        yield partial
    except BaseException:
        # stopped before the write began (a Ctrl-C, a refused resume): an empty partial file of this run holds
        # nothing to resume, and is removed as other temporary files are (one that holds a conversion is kept)
        if locked:
            with contextlib.suppress(OSError):
                mine, named = os.fstat(fd), os.stat(partial)
                if mine.st_size == 0 and (mine.st_dev, mine.st_ino) == (named.st_dev, named.st_ino):
                    partial.unlink()
        raise
    finally:
        if fd is not None:
            os.close(fd)


def _resume_from(out: Path, partial: Path, state_path: Path, identity: dict, names: dict, *, resume: bool,
                 force: bool) -> dict | None:
    """The progress record to continue from, None to start over; refuse a resume of another conversion, and a
    fresh start that would throw away an interrupted one without --resume or --force."""
    state = None
    if partial.stat().st_size > 0:  # else: none, or removed since (a record left alone describes nothing)
        try:
            state = read_checkpoint(state_path)
        except InputError:
            if resume or not force:
                raise
            log.warning("%s: an unreadable progress record, discarded with the partial file (--force)", state_path)
            return None
    if state is None:
        if resume:
            log.info("no interrupted conversion of %s to resume: starting from the beginning", out)
        return None
    where = f"{partial} holds an interrupted conversion of {out} ({state['done']} of {state['num_samples']} samples)"
    if not resume:
        if force:
            log.warning("%s: discarded (--force without --resume starts over)", where)
            return None
        raise InputError(f"{where}; pass --resume to continue it, or --force to start over.")
    if identity["source"] is None:
        raise InputError(f"{where}, but dptool cannot tell whether {names['source']} changed since, so it cannot "
                         "continue it; pass --force without --resume to start over.")
    if state["identity"] != _hash(identity):
        try:
            before = json.loads(state["details"])
        except ValueError:
            before = {}
        changed = [names.get(k, k) for k in {**identity, **before}  # a part only one of them has changed too
                   if before.get(k) != json.loads(json.dumps(identity.get(k)))]
        raise InputError(f"{where}, but {' and '.join(changed) or 'its configuration'} changed since; resume it with "
                         "the same source and options, or pass --force without --resume to start over.")
    log.info("resuming the conversion of %s at sample %d of %d; unchanged since: %s", out, state["done"],
             state["num_samples"], "; ".join(names[k] for k in identity))
    return state
