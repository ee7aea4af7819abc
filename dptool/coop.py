"""CoOp's downstream splits (`split_zhou_*.json`) as a dptool source: the paper's target train/val/test sets.

A split file is JSON `{"train": [[impath, label, classname], ...], "val": [...], "test": [...]}`; `impath` is
relative to the dataset's image folder (CoOp's `read_split`: `os.path.join(image_dir, impath)`). Labels are 0 to
C-1 over all the splits of a file, each with one class name, so every split converted from one file gets the same
C classes, in label order, whether or not it holds samples of each.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .beton import MAX_CLASSES
from .errors import InputError
from .source_dataset import DEFAULT_MAX_PIXELS, SourceDataset, UnreadableImage, decode_image_file

__all__ = ["SPLITS", "CoOpSplit", "read_coop_split", "CoOpSource"]

log = logging.getLogger(__name__)

#: what `--split` takes with a CoOp file, and the file's splits each one reads (trainval: train, then val)
SPLITS = {"train": ("train",), "val": ("val",), "test": ("test",), "trainval": ("train", "val")}

_SHAPE = '{"train": [[impath, label, classname], ...], "val": [...], "test": [...]}'


@dataclass(frozen=True)
class CoOpSplit:
    """A checked split file: its class names (index = label), its entries by split, and the sha256 of its bytes."""

    path: str
    sha256: str
    class_names: list[str]
    entries: dict[str, list[tuple[str, int]]]  # "train" | "val" | "test" -> [(impath, label), ...]


def _entry(path: str, key: str, index: int, item) -> tuple[str, int, str]:
    """One `[impath, label, classname]` of split `key`, checked; the message names the file and the entry."""
    ok = isinstance(item, list) and len(item) == 3
    impath, label, name = item if ok else (None, None, None)
    if not (ok and isinstance(impath, str) and impath and isinstance(label, int) and not isinstance(label, bool)
            and label >= 0 and isinstance(name, str)):
        raise InputError(f"Split file {path}: {key}[{index}] is {_short(item)}, not [impath, label, classname] (a "
                         "relative image path, an integer label from 0, a class name).")
    if label >= MAX_CLASSES:
        raise InputError(f"Split file {path}: {key}[{index}] has label {label}; labels are 0 to C-1 with C at most "
                         f"{MAX_CLASSES}.")
    # An absolute path or one climbing out with '..' would read files outside IMAGE_DIR, which the sidecar records
    # as the source: CoOp's files never do, so such an entry is a wrong or hand-edited file.
    norm = os.path.normpath(impath)
    if os.path.isabs(impath) or norm == os.curdir or norm == os.pardir or norm.startswith(os.pardir + os.sep):
        raise InputError(f"Split file {path}: {key}[{index}] has the path {impath!r}, which is not an image path "
                         "inside the image folder; paths are relative to the image folder given as the source, "
                         "without '..' leading out of it.")
    return impath, label, name


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_coop_split(path: str | os.PathLike) -> CoOpSplit:
    """Read and check a CoOp split file: its shape, every entry, one class name per label, labels 0 to C-1."""
    path = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise InputError(f"Split file {path} does not exist; --format coop: takes a CoOp split file such as "
                         "split_zhou_OxfordPets.json.") from exc
    except OSError as exc:
        raise InputError(f"Split file {path} cannot be read ({exc.strerror or exc}).") from exc
    try:
        doc = json.loads(data)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError alike
        raise InputError(f"Split file {path} is not valid JSON ({exc}); a CoOp split file is {_SHAPE}.") from exc
    if not isinstance(doc, dict) or not any(k in doc for k in ("train", "val", "test")):
        got = f"an object with keys {', '.join(map(repr, list(doc)[:5]))}" if isinstance(doc, dict) else \
            f"a JSON {type(doc).__name__}"
        raise InputError(f"Split file {path} is not a CoOp split file: it is {got}, not {_SHAPE}.")
    entries: dict[str, list[tuple[str, int]]] = {}
    names: dict[int, tuple[str, str]] = {}  # label -> (class name, where it was first given)
    for key in ("train", "val", "test"):
        if key not in doc:
            continue
        if not isinstance(doc[key], list):
            raise InputError(f"Split file {path}: its {key!r} is {_short(doc[key])}, not a list of "
                             "[impath, label, classname].")
        rows = entries[key] = []
        for index, item in enumerate(doc[key]):
            impath, label, name = _entry(path, key, index, item)
            first = names.setdefault(label, (name, f"{key}[{index}]"))
            if first[0] != name:
                raise InputError(f"Split file {path}: label {label} is named {first[0]!r} at {first[1]} and "
                                 f"{name!r} at {key}[{index}]; each label has one class name.")
            rows.append((impath, label))
    n_classes = max(names, default=-1) + 1
    unnamed = [c for c in range(n_classes) if c not in names]
    if unnamed:
        more = f" (and {len(unnamed) - 1} more)" if len(unnamed) > 1 else ""
        raise InputError(f"Split file {path}: label {unnamed[0]}{more} appears in none of its splits while labels go "
                         f"up to {n_classes - 1}, so its class name is unknown; labels are 0 to C-1, each named.")
    class_names = [names[c][0] for c in range(n_classes)]
    if len(set(class_names)) < n_classes:
        log.warning("%s: some labels share a class name (%d names for %d labels)", path, len(set(class_names)),
                    n_classes)
    return CoOpSplit(path=os.path.abspath(path), sha256=hashlib.sha256(data).hexdigest(), class_names=class_names,
                     entries=entries)


class CoOpSource(SourceDataset):
    """The `split` of a CoOp split file, images read from `image_dir`; the C classes are the whole file's."""

    def __init__(self, split_file: str | os.PathLike, image_dir: str | os.PathLike, split: str = "train", *,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        if split not in SPLITS:
            raise InputError(f"A CoOp split file has no split {split!r}; accepted: {', '.join(SPLITS)}.")
        if not Path(image_dir).is_dir():
            raise InputError(f"Image folder {image_dir} does not exist or is not a folder; with --format coop: the "
                             "source is the dataset's image folder (oxford_pets/images, say).")
        parsed = read_coop_split(split_file)
        missing = [k for k in SPLITS[split] if k not in parsed.entries]
        if missing:
            raise InputError(f"Split file {split_file} has no {missing[0]!r} split (it has "
                             f"{', '.join(parsed.entries)}), which --split {split} reads.")
        rows = [row for k in SPLITS[split] for row in parsed.entries[k]]
        if not rows:
            raise InputError(f"Split file {split_file} lists no images in its {split!r} split.")
        root = os.path.abspath(image_dir)
        self._paths = [os.path.join(root, impath) for impath, _ in rows]
        absent = sum(not os.path.exists(p) for p in self._paths)
        if absent == len(rows):  # the image folder is not the one the file's paths are relative to
            raise InputError(f"None of the {len(rows)} images of split {split!r} of {split_file} is in {image_dir} "
                             f"(the first would be {self._paths[0]}); give the folder CoOp's paths are relative to "
                             "(oxford_pets/images, oxford_flowers/jpg, dtd/images, ...).")
        if absent:
            log.warning("%d of the %d images of split %r of %s are not in %s: each is skipped and listed (or stops "
                        "the run under --on-error fail)", absent, len(rows), split, split_file, image_dir)
        super().__init__(
            class_names=parsed.class_names,
            labels=np.fromiter((label for _, label in rows), dtype=np.int64, count=len(rows)),
            format=f"coop:{parsed.path}",
            root=root,
            split=split,
            max_pixels=max_pixels,
            provenance={"split_file": {"path": parsed.path, "sha256": parsed.sha256}},
        )

    def describe(self, index: int) -> str:
        """The file of sample `index`: what skip lists and error messages name."""
        return self._paths[index]

    def load(self, index: int) -> np.ndarray:
        """Decode the image of sample `index` to (H, W, 3) uint8; a listed file that is not there is unreadable."""
        path = self._paths[index]
        if not os.path.exists(path):
            raise UnreadableImage("broken symbolic link" if os.path.islink(path) else "listed in the split file "
                                  "but not found")
        return decode_image_file(path, self.max_pixels)
