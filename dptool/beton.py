"""`.beton` files and their JSON sidecars: open and validate, read labels without decoding, fingerprint.

The sidecar (`X.beton.json`) holds what FFCV's format does not: class names in label order, per-class counts,
writer parameters, where the data came from, what was skipped, pruning provenance, and a content
fingerprint that later steps compare to make sure they are talking about the same data. Finding, reading and
writing the sidecar (and the digests file beside it) is `dptool.sidecar`; its names are re-exported here. FFCV's
tables are read by `dptool.beton_format`, whose `NotABetonError` is re-exported here.
"""

from __future__ import annotations

import hashlib
import os
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .beton_format import NotABetonError, _read_tables
from .errors import InputError
from .sidecar import (
    SIDECAR_FORMAT,
    SIDECAR_VERSION,
    check_beton_output,
    companions_of,
    digests_path,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)

__all__ = [
    "SIDECAR_FORMAT",
    "SIDECAR_VERSION",
    "Beton",
    "open_beton",
    "read_sidecar",
    "sidecar_path",
    "digests_path",
    "companions_of",
    "check_beton_output",
    "write_sidecar",
    "check_image_field",
    "check_same_classes",
    "classes_from_command",
    "fingerprint",
    "known_fingerprints",
    "summarize",
    "read_image",
    "NotABetonError",
]


#: The most classes a label may index: a stray label of 10**9 would make every per-class table exhaust memory.
MAX_CLASSES = 1 << 20


@dataclass(frozen=True)
class Beton:
    """A validated `.beton` file: its layout, fields, labels (from the metadata table) and sidecar."""

    path: Path
    num_samples: int
    page_size: int
    field_names: tuple[str, ...]
    field_types: tuple[str, ...]
    file_size: int
    header: np.void
    field_descriptors: np.ndarray
    metadata: np.ndarray  # structured (N,), one column per field
    alloc_table: np.ndarray  # structured (M,), sample_id / ptr / size
    data_start: int
    sidecar: dict | None
    identity: tuple = ()  # (device, inode, size, mtime) of the file when its tables were read

    def check_unchanged(self) -> None:
        """Refuse (InputError) a file that was replaced or rewritten since it was opened: a loader built now opens
        the path again, and would read other samples than the tables, labels and fingerprint this run holds."""
        if self.identity and _identity(self.path) != self.identity:
            raise InputError(f"{self.path} was replaced or modified while this run was reading it (it is read again "
                             "for a later pass); rerun once nothing writes it.")

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 labels in file order, from the metadata table (no image decoding)."""
        if "label" not in self.field_names:
            raise InputError(f"{self.path} has no 'label' field (fields: {', '.join(self.field_names)}).")
        return np.asarray(self.field_metadata("label"), dtype=np.int64)

    @property
    def num_classes(self) -> int:
        """Head width: the sidecar's class count, else 1 + the largest label."""
        if self.sidecar and "num_classes" in self.sidecar:
            return int(self.sidecar["num_classes"])
        labels = self.labels
        return int(labels.max()) + 1 if len(labels) else 0

    @property
    def class_names(self) -> list[str]:
        """Class names in label order (from the sidecar; label numbers when there is none)."""
        if self.sidecar and self.sidecar.get("class_names"):
            return list(self.sidecar["class_names"])
        return [str(i) for i in range(self.num_classes)]

    def field_metadata(self, name: str) -> np.ndarray:
        """(N,) metadata rows of field `name` in file order (FFCV names the columns f0, f1, ... by field order)."""
        return self.metadata[f"f{self.field_names.index(name)}"]

    def class_counts(self) -> np.ndarray:
        """(num_classes,) int64 samples per class."""
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)


def open_beton(path: Beton | str | os.PathLike, *, require_label: bool = True, check_sidecar: bool = True,
               check_labels: bool = True) -> Beton:
    """Open and validate a `.beton`: header, fields, metadata and allocation table must all be in the file, and
    a sidecar beside it must describe it (`check_sidecar=False` leaves that to the caller, as `info` does).
    `check_labels=False` (with both checks off) opens a file whatever its labels, as `verify` reads one whose
    tables may be damaged.

    An already opened `Beton` is returned as it is (after the label check), so that functions taking a file
    can be handed the one their caller opened instead of parsing its tables again.
    """
    if isinstance(path, Beton):
        if require_label and "label" not in path.field_names:
            raise _no_label_field(path.path, path.field_names)
        return path
    path = Path(path)
    if not path.exists():
        from .writer_progress import missing_file_message

        raise InputError(missing_file_message(path))
    if path.is_dir():  # an image folder given where its converted file belongs
        raise InputError(f"{path} is a folder, not a .beton file; `dptool convert {path} OUT.beton` makes one from "
                         "an image folder.")
    if not path.is_file():
        raise InputError(f"{path} is not a file.")
    identity = _identity(path)  # before the tables: a file replaced while they are read fails the later check
    beton = Beton(path=path, **_read_tables(path), sidecar=read_sidecar(path), identity=identity)
    if not check_labels and not require_label and not check_sidecar:
        return beton
    if not _check_labels(beton, require_label):
        return beton  # `info` and fingerprints: shown without classes
    if check_sidecar and (mismatch := _sidecar_mismatch(beton)):
        raise InputError(f"Sidecar {sidecar_path(companions_of(beton.path))} does not describe {beton.path} "
                         f"({mismatch}); it is left from another file: delete it (or re-convert) to use the file "
                         "without it.")
    return beton


def _identity(path: Path) -> tuple:
    """What tells one file at `path` from a file renamed over it or rewritten in place; () if it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return ()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _no_label_field(path: Path, names) -> InputError:
    return InputError(f"{path} has no 'label' field (fields: {', '.join(names)}); dptool needs image and label.")




def _check_labels(beton: Beton, require_label: bool) -> bool:
    """Refuse labels dptool cannot use: no 'label' field (when required), one that is not an IntField (when
    required), negative labels or labels past MAX_CLASSES. False when the file has a non-integer label field
    that is not required, so it has no classes to check further."""
    path, names, types = beton.path, beton.field_names, beton.field_types
    if require_label and "label" not in names:
        raise _no_label_field(path, names)
    if "label" in names and types[names.index("label")] != "IntField":
        if require_label:
            raise InputError(f"{path}'s 'label' field is a {types[names.index('label')]}; dptool needs an IntField "
                             "label (class index 0 to C-1).")
        return False
    if "label" in names and beton.num_samples and int(beton.labels.min()) < 0:
        raise InputError(f"{path} has negative labels (the smallest is {int(beton.labels.min())}); dptool needs "
                         "labels 0 to C-1, one per class.")
    if "label" in names and beton.num_samples and int(beton.labels.max()) >= MAX_CLASSES:
        raise InputError(f"{path} has a label {int(beton.labels.max())}; dptool needs labels 0 to C-1 with C at "
                         f"most {MAX_CLASSES}.")
    return True


def _sidecar_mismatch(beton: Beton) -> str | None:
    """How the sidecar contradicts its file (a .beton rewritten by another tool, or copied over, next to an old
    sidecar, whose class names, head width and writer parameters would be taken as the file's), else None.
    Compared from the tables already read: the sample count, and the per-class counts against the labels."""
    side = beton.sidecar
    if not side:
        return None
    if "num_samples" in side and int(side["num_samples"]) != beton.num_samples:
        return f"it records {side['num_samples']} samples, the file holds {beton.num_samples}"
    counts = side.get("class_counts")
    if counts is not None and "label" in beton.field_names and beton.num_samples:
        mine = np.bincount(beton.labels, minlength=len(counts))
        if len(mine) != len(counts) or not np.array_equal(mine, np.asarray(counts, dtype=np.int64)):
            return "its per-class counts differ from the file's labels"
    return None


def check_image_field(beton: Beton) -> None:
    """Refuse a file whose 'image' field (when it has one) is not an RGBImageField, the one dptool decodes."""
    if "image" in beton.field_names:
        kind = beton.field_types[beton.field_names.index("image")]
        if kind != "RGBImageField":
            raise InputError(f"{beton.path}'s 'image' field is a {kind}; dptool reads images from an RGBImageField.")


def check_same_classes(data: Beton, other: Beton, role: str, split: str) -> None:
    """Refuse `other` (a validation or test file) whose labels name other classes than `data`'s: its accuracy
    would score, say, target class 0 against source class 0. Compared where both sidecars record class names."""
    mine = (data.sidecar or {}).get("class_names")
    theirs = (other.sidecar or {}).get("class_names")
    if not mine or not theirs or list(mine) == list(theirs):
        return
    first = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
    got = repr(theirs[first]) if first < len(theirs) else "nothing"
    want = repr(mine[first]) if first < len(mine) else "nothing"
    raise InputError(f"{role} {other.path} has other classes than {data.path} (label {first} is {got} there, "
                     f"{want} here); give the {split} split of the same dataset, converted with its labels matched to "
                     f"this file's classes by name: {classes_from_command(other, data.path)}.")


def classes_from_command(other: Beton, ref: str | os.PathLike) -> str:
    """The `dptool convert ... --classes-from REF` that labels `other`'s source as `ref`, from the source its sidecar
    records (with the `--format` and `--split` a list, CoOp or torchvision source needs; SRC where none is recorded)."""
    source = (other.sidecar or {}).get("source") or {}
    fmt, path, split = source.get("format"), source.get("path"), source.get("split")
    # list:FILE, coop:FILE, torchvision:NAME; a folder, an .npz or a .tar is found by --format auto, not a file
    # named otherwise
    suffix = {"npz": ".npz", "tar": ".tar"}.get(fmt) if isinstance(fmt, str) else None
    named = isinstance(fmt, str) and (":" in fmt or (suffix is not None and isinstance(path, str)
                                                      and not path.lower().endswith(suffix)))
    words = ["dptool", "convert", *(("--format", fmt) if named else ()),
             path if isinstance(path, str) and path else "SRC", "OUT",
             *(("--split", split) if named and isinstance(split, str) and split else ()), "--classes-from", str(ref)]
    return " ".join(w if w in ("SRC", "OUT") else shlex.quote(w) for w in words)


def _tables_hash(b: Beton):
    """BLAKE2b (16 bytes) fed with the file's size, header, field descriptors, metadata and allocation table."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(b.file_size).encode())
    for part in (b.header, b.field_descriptors, b.metadata, b.alloc_table):
        h.update(np.ascontiguousarray(part).tobytes())
    return h


_FINGERPRINT_SAMPLES = 64  # allocations whose bytes the fingerprint reads, spread over the file
_FINGERPRINT_BYTES = 1 << 16  # at most this much of each


def fingerprint(beton: Beton | str | os.PathLike) -> str:
    """Content fingerprint of a `.beton`: BLAKE2b of its size, header, fields, metadata and allocation tables,
    and the stored bytes (up to 64 KiB each) of 64 samples' allocations spread evenly over the file.

    Cheap on 300 GB files (64 short reads); changes when labels, sizes or the layout change, and when the pixels
    of the sampled allocations do. An edit of one image's pixels that keeps its size can go unseen.
    """
    b = beton if isinstance(beton, Beton) else open_beton(beton, require_label=False)
    return _fingerprint_with_samples(b, _tables_hash(b))


def _fingerprint_with_samples(b: Beton, h) -> str:
    """`fingerprint` from `h`, the BLAKE2b of `b`'s tables (`_tables_hash`), which it updates."""
    table = b.alloc_table
    if len(table):
        picks = np.unique(np.linspace(0, len(table) - 1, num=min(len(table), _FINGERPRINT_SAMPLES)).round())
        with open(b.path, "rb") as f:
            for row in table[picks.astype(np.int64)]:
                f.seek(int(row["ptr"]))
                h.update(f.read(min(int(row["size"]), _FINGERPRINT_BYTES)))
    return "blake2b:" + h.hexdigest()


def known_fingerprints(beton: Beton, current: str | None = None) -> set[str]:
    """The fingerprints that name `beton`, both computed from the file: the current one, and the one dptool
    computed before the fingerprint read sample bytes, which scores files, checkpoints and pruned files made then
    recorded. (That older kind could not tell apart two raw-mode files with the same labels and sizes.)
    `current`: `fingerprint(beton)` when the caller has it already."""
    h = _tables_hash(beton)  # hashed once for both kinds (about 60 MB of tables at ImageNet's 1.28M samples)
    return {current or _fingerprint_with_samples(beton, h.copy()), _fingerprint_without_samples(beton, h)}


def _fingerprint_without_samples(b: Beton, h=None) -> str:
    """The fingerprint before 2026-11-29: the tables, and the MiB after the metadata and the MiB before the
    allocation table, which are mostly page padding rather than sample bytes. `h`: `_tables_hash(b)`, where the
    caller has it."""
    h = _tables_hash(b) if h is None else h
    alloc_ptr = int(b.header["alloc_table_ptr"])
    with open(b.path, "rb") as f:
        f.seek(b.data_start)
        h.update(f.read(min(1 << 20, alloc_ptr - b.data_start)))
        tail = max(b.data_start, alloc_ptr - (1 << 20))
        f.seek(tail)
        h.update(f.read(alloc_ptr - tail))
    return "blake2b:" + h.hexdigest()


def summarize(path: str | os.PathLike) -> dict:
    """Everything `dptool info` shows about a `.beton`: samples, classes with names and counts, fields,
    writer parameters, provenance, file size."""
    b = open_beton(path, require_label=False, check_sidecar=False)
    # a sidecar that contradicts the file is named, and the file shown without it (other commands refuse it)
    int_labels = "label" in b.field_names and b.field_types[b.field_names.index("label")] == "IntField"
    stale = _sidecar_mismatch(b) if int_labels or "label" not in b.field_names else None
    if stale:
        b = replace(b, sidecar=None)
    side = b.sidecar or {}
    # the file's own fingerprint; the sidecar's is trusted for nothing here (a sidecar copied beside another
    # file, or a file replaced after its sidecar was written, would otherwise show someone else's)
    recorded, own = side.get("fingerprint"), fingerprint(b)
    if stale:
        matches = False
    elif not b.sidecar:
        matches = None
    else:
        matches = bool(recorded) and recorded in known_fingerprints(b, own)
    summary = {
        "path": str(b.path),
        "file_size": b.file_size,
        "num_samples": b.num_samples,
        "fields": dict(zip(b.field_names, b.field_types)),
        "page_size": b.page_size,
        "sidecar": str(sidecar_path(companions_of(b.path))) if b.sidecar or stale else None,
        "writer": side.get("writer"),
        "source": side.get("source"),
        "fingerprint": own,
        "sidecar_matches": matches,
        "sidecar_ignored": bool(stale),
        "sidecar_problem": stale or (None if matches is not False else
                                     "it records another fingerprint" if recorded else "it records no fingerprint"),
        "skipped": len(side.get("skipped", [])),
        "pruning": side.get("pruning"),
        "digests": side.get("digests"),
    }
    if int_labels:
        counts = b.class_counts()
        names = b.class_names
        summary["num_classes"] = b.num_classes
        summary["classes"] = [
            {"label": i, "name": names[i] if i < len(names) else str(i), "count": int(c)} for i, c in enumerate(counts)
        ]
    return summary


def read_image(beton: Beton | str | os.PathLike, index: int) -> np.ndarray:
    """Decode the stored image of sample `index` (file order) to (H, W, 3) uint8 without an FFCV Loader.

    `beton` is an opened `Beton` or a path. A slow reference path for checks and `info`; training and scoring
    read through `dptool.loaders`."""
    beton = open_beton(beton, require_label=False)
    if "image" not in beton.field_names:
        raise InputError(f"{beton.path} has no 'image' field.")
    if not 0 <= index < beton.num_samples:
        raise InputError(f"Sample {index} is out of range for {beton.path} ({beton.num_samples} samples).")
    meta = beton.field_metadata("image")[index]
    ptr = int(meta["data_ptr"])
    sizes = beton.alloc_table["size"][beton.alloc_table["ptr"] == ptr]
    if len(sizes) != 1:
        raise InputError(f"{beton.path} is damaged: no allocation for sample {index}.")
    with open(beton.path, "rb") as f:
        f.seek(ptr)
        data = f.read(int(sizes[0]))
    height, width = int(meta["height"]), int(meta["width"])
    if int(meta["mode"]) == 1:  # raw
        return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3).copy()
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
