"""ImageNet's val labels as image-net.org hands them out: the devkit `ILSVRC2012_devkit_t12.tar.gz` (or its extracted
folder) for the flat folder of `ILSVRC2012_img_val.tar`, read for `--format list:DEVKIT` (`dptool.label_list`).

`data/ILSVRC2012_validation_ground_truth.txt` gives, on line i, the ILSVRC2012_ID (1-1000) of image
`ILSVRC2012_val_{i:08d}.JPEG`; `data/meta.mat`'s struct array `synsets` maps an ID to its WNID (the 1000 leaf synsets,
`num_children == 0`). The IDs are not numbered in sorted-WNID order: a label is the WNID's index among the sorted WNIDs,
as a train ImageFolder numbers its class folders, never the ID less one. The archive is read in memory, not extracted;
nothing is written beside it.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import tarfile
import zlib
from dataclasses import dataclass

import numpy as np

from .errors import InputError

__all__ = ["GROUND_TRUTH", "META", "Devkit", "is_devkit", "read_devkit", "val_image_name"]

#: the two files of the devkit's data/ folder that label the val images
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
META = "meta.mat"

_ACCEPTED = ("ILSVRC2012_devkit_t12.tar.gz or its extracted folder, with data/meta.mat and "
             f"data/{GROUND_TRUTH}")
_VAL_IMAGE = re.compile(r"(?:.*/)?ILSVRC2012_val_\d{8}\.JPEG")
_ID = re.compile(rb"[0-9]+")
# how a compressed file starts (gzip, bzip2, xz): a devkit archive, never a label list, even where tarfile cannot
# open it (a download cut short)
_COMPRESSED = re.compile(rb"\x1f\x8b|BZh[1-9](?:1AY&SY|\x17rE8P\x90)|\xfd7zXZ\x00")  # bzip2's with its block magic
_ZIP = b"PK\x03\x04"
#: the largest archive read as a devkit: ILSVRC2012_devkit_t12.tar.gz is 2.5 MB; a train or test tar given by
#: mistake (138 GB, 13 GB) is refused before it is read through or hashed
MAX_ARCHIVE_BYTES = 256 << 20


@dataclass(frozen=True)
class Devkit:
    """The val labels of a devkit: `labels[i]` is the index in `wnids` (sorted) of image `val_image_name(i + 1)`."""

    path: str  # the archive or folder, absolute
    sha256: str  # of the archive's bytes, or of the two files' (each after its name and size)
    ground_truth: str  # what a line number refers to: the file, or ARCHIVE/member
    wnids: list[str]  # the leaf synsets' WNIDs, sorted
    labels: np.ndarray  # (N,) int64: index into wnids, one a ground-truth line


def val_image_name(number: int) -> str:
    """The file name of val image `number` (1-based, the ground truth's line number)."""
    return f"ILSVRC2012_val_{number:08d}.JPEG"


def is_devkit(path: str | os.PathLike) -> bool:
    """Whether `--format list:PATH` names a devkit (a folder, a tar archive, or any compressed or zip file, refused
    by `read_devkit` if it is no devkit) rather than a label list."""
    try:
        if os.path.isdir(path):
            return True
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            head = f.read(10)
        return bool(_COMPRESSED.match(head)) or head.startswith(_ZIP) or tarfile.is_tarfile(path)
    except (OSError, EOFError, zlib.error):  # unreadable: the label list reader says so
        return False


def _from_folder(path: str) -> tuple[bytes, bytes, str, str]:
    """meta.mat's and the ground truth's bytes, their sha256 and the ground truth's path, from the devkit folder or
    its data/ folder."""
    data = next((d for d in (os.path.join(path, "data"), path)
                 if os.path.isfile(os.path.join(d, META)) and os.path.isfile(os.path.join(d, GROUND_TRUTH))), None)
    if data is None:
        raise InputError(f"Folder {path} holds no data/{META} and data/{GROUND_TRUTH}; --format list: takes a label "
                         f"list, or ImageNet's devkit: {_ACCEPTED}.")
    h = hashlib.sha256()
    files = []
    for name in (META, GROUND_TRUTH):
        try:
            with open(os.path.join(data, name), "rb") as f:
                content = f.read()
        except OSError as exc:
            raise InputError(f"{os.path.join(data, name)} cannot be read ({exc.strerror or exc}).") from exc
        h.update(f"{name}\0{len(content)}\0".encode() + content)
        files.append(content)
    return files[0], files[1], h.hexdigest(), os.path.join(data, GROUND_TRUTH)


def _from_archive(path: str) -> tuple[bytes, bytes, str, str]:
    """meta.mat's and the ground truth's bytes (members ending in data/NAME), the archive's sha256 and the ground
    truth's ARCHIVE/member, read without extracting."""
    found: dict[str, tuple[str, bytes]] = {}
    try:
        with open(path, "rb") as f:
            zipped = f.read(4) == _ZIP
        size = os.path.getsize(path)
        if zipped:
            raise InputError(f"{path} is a zip archive; --format list: takes a label list, or ImageNet's devkit as "
                             f"image-net.org hands it out (a tar archive) or extracted: {_ACCEPTED}.")
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if _VAL_IMAGE.fullmatch(member.name):  # before reading 6.4 GB of images through
                    raise InputError(f"{path} holds the val images ({member.name}), not the devkit; extract it into a "
                                     "folder, give that folder as the source, and --format list: the devkit: "
                                     f"{_ACCEPTED}.")
                if size > MAX_ARCHIVE_BYTES:  # after the first member: the val images' tar is named as such above
                    raise InputError(f"Archive {path} is {size / 2**30:.1f} GiB (its first member {member.name}), "
                                     f"too large for ImageNet's devkit (2.5 MB; at most {MAX_ARCHIVE_BYTES >> 20} MiB "
                                     f"read); give {_ACCEPTED}.")
                parts = member.name.split("/")
                if member.isfile() and len(parts) >= 2 and parts[-2] == "data" and parts[-1] in (META, GROUND_TRUTH):
                    found.setdefault(parts[-1], (member.name, tar.extractfile(member).read()))
                    if len(found) == 2:  # the rest of the archive is not read through
                        break
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        reason = " ".join(str(exc).split())  # tarfile's 'r:*' says why each method failed, a line each
        raise InputError(f"Devkit archive {path} cannot be read as a tar archive ({reason}); --format list: takes a "
                         f"label list (text, not compressed), or ImageNet's devkit: {_ACCEPTED}.") from exc
    lacking = [f"data/{name}" for name in (META, GROUND_TRUTH) if name not in found]
    if lacking:
        raise InputError(f"Archive {path} holds no {' and no '.join(lacking)}; --format list: takes a label list, or "
                         f"ImageNet's devkit: {_ACCEPTED}.")
    h = hashlib.sha256()  # after the members are found: a wrong archive is refused without reading it twice
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return found[META][1], found[GROUND_TRUTH][1], h.hexdigest(), f"{path}/{found[GROUND_TRUTH][0]}"


def _scalar(value, kind: type):
    """A struct field's value as `kind` (an int that is integral, or a str), or None."""
    arr = np.asarray(value)
    if arr.size != 1:
        return None
    item = arr.reshape(()).item()
    if kind is int:
        if isinstance(item, bool) or not isinstance(item, int | float) or not math.isfinite(item) or item != int(item):
            return None
        return int(item)
    return item if isinstance(item, str) and item else None


def _leaf_synsets(meta: bytes, where: str) -> dict[int, str]:
    """ILSVRC2012_ID -> WNID of meta.mat's leaf synsets (num_children == 0), read by field name."""
    from scipy import io as sio

    try:
        synsets = sio.loadmat(io.BytesIO(meta), squeeze_me=True).get("synsets")
    except Exception as exc:  # scipy raises ValueError, TypeError, NotImplementedError (v7.3), MatReadError...
        raise InputError(f"{where} cannot be read as a MATLAB file ({exc}); give {_ACCEPTED}.") from exc
    fields = ("ILSVRC2012_ID", "WNID", "num_children")
    names = getattr(getattr(synsets, "dtype", None), "names", None) or ()
    if not all(f in names for f in fields):
        raise InputError(f"{where} holds no struct array 'synsets' with fields {', '.join(fields)}; give {_ACCEPTED}.")
    leaves: dict[int, str] = {}
    for k, synset in enumerate(np.atleast_1d(synsets)):
        ident, wnid, children = (_scalar(synset["ILSVRC2012_ID"], int), _scalar(synset["WNID"], str),
                                 _scalar(synset["num_children"], int))
        if ident is None or wnid is None or children is None:
            raise InputError(f"{where}: synset {k + 1} has no integer ILSVRC2012_ID, WNID text and integer "
                             f"num_children; give {_ACCEPTED}.")
        if children == 0:
            if ident in leaves or wnid in leaves.values():
                raise InputError(f"{where}: leaf synset {k + 1} ({ident}, {wnid!r}) repeats an ILSVRC2012_ID or "
                                 "WNID of another leaf, so an ID does not tell its class; give "
                                 f"{_ACCEPTED}.")
            leaves[ident] = wnid
    if not leaves:
        raise InputError(f"{where} has no leaf synset (num_children 0), so no class; give {_ACCEPTED}.")
    return leaves


def read_devkit(path: str | os.PathLike) -> Devkit:
    """Read a devkit archive (without extracting it) or folder: each ground-truth line's ID mapped to its WNID by
    meta.mat, and to that WNID's index among the sorted WNIDs. A line that is not a leaf's ID is refused."""
    path = os.path.abspath(path)
    meta, truth, sha256, truth_where = _from_folder(path) if os.path.isdir(path) else _from_archive(path)
    meta_where = truth_where[: -len(GROUND_TRUTH)] + META
    leaves = _leaf_synsets(meta, meta_where)
    wnids = sorted(leaves.values())
    index = {wnid: i for i, wnid in enumerate(wnids)}
    label_of = {ident: index[wnid] for ident, wnid in leaves.items()}  # by WNID, never ID - 1
    lines = truth.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    labels = np.empty(len(lines), dtype=np.int64)
    shown = f"{min(leaves)}..{max(leaves)}" if len(leaves) == max(leaves) - min(leaves) + 1 else "listed there"
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        label = label_of.get(int(text)) if _ID.fullmatch(text) else None
        if label is None:
            raise InputError(f"{truth_where}:{number} is {text.decode('utf-8', 'replace')[:40]!r}, not the "
                             f"ILSVRC2012_ID of one of the {len(leaves)} leaf synsets of {meta_where} ({shown}).")
        labels[number - 1] = label
    if not len(labels):
        raise InputError(f"{truth_where} lists no image; give {_ACCEPTED}.")
    return Devkit(path=path, sha256=sha256, ground_truth=truth_where, wnids=wnids, labels=labels)
