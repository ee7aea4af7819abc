"""A flat folder of images with a label list as a dptool source (`--format list:FILE`): ImageNet's val set as most
download it (Kaggle's flat `val` folder and its `LOC_val_solution.csv`).

FILE holds one image a line, `relative/path<TAB, comma or spaces>class_name` (two fields split at a tab, else at a
comma, else at spaces; a field in double quotes read as CSV reads it; a backslash in a path read as '/'; UTF-8, or
UTF-16 with its byte order mark; blank lines and a header such as `filename,label` left out), or is Kaggle's CSV,
known by its header `ImageId,PredictionString` (further columns left out): image `ImageId.JPEG` (an ImageId ending
in `.JPEG` kept as it is), class the first word of the PredictionString (the class of its first box; an image's
boxes are all of its class). FILE may also be image-net.org's devkit, `ILSVRC2012_devkit_t12.tar.gz` or its folder,
for the flat folder of `ILSVRC2012_img_val.tar` (`dptool.imagenet_devkit`). Class ids are the sorted class names (or a
reference file's, with `--classes-from`, `dptool.class_map`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .imagenet_devkit import is_devkit, read_devkit, val_image_name
from .source_dataset import DEFAULT_MAX_PIXELS, SourceDataset, UnreadableImage, decode_image_file
from .tar_index import looks_like_tar

__all__ = ["KAGGLE_HEADER", "LabelList", "read_label_list", "ListSource"]

log = logging.getLogger(__name__)

#: the header of Kaggle's LOC_val_solution.csv (and LOC_train_solution.csv)
KAGGLE_HEADER = "ImageId,PredictionString"

_VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")  # a file of ILSVRC2012_img_val.tar, by its number

_SHAPE = ("one image a line, 'relative/path<TAB, comma or space>class_name', or Kaggle's CSV with the header "
          f"'{KAGGLE_HEADER}'")

# a first line made of these words is a header, not an image (an image of that name is not looked for)
_HEADER_WORDS = {"path", "file", "filename", "file_name", "image", "image_path", "img", "name", "id", "image_id",
                 "imageid", "label", "class", "class_name", "classname", "category", "wnid", "synset", "target"}


@dataclass(frozen=True)
class LabelList:
    """A checked label list: sample paths (as one UTF-8 byte string and end offsets), the line each came from,
    each one's class name index into `class_names` (sorted), and the sha256 of the file's bytes (a devkit's:
    `dptool.imagenet_devkit.Devkit.sha256`)."""

    path: str
    sha256: str
    kaggle: bool
    class_names: list[str]
    names: np.ndarray  # (B,) uint8: the relative paths, concatenated
    ends: np.ndarray  # (N,) int64: where each path ends in `names`
    lines: np.ndarray  # (N,) int64: the 1-based line number of each entry
    labels: np.ndarray  # (N,) int64: index into class_names
    line_file: str | None = None  # the file `lines` number, where it is not `path` (a devkit's ground truth)

    def relpath(self, index: int) -> str:
        """The relative path of entry `index`, as written in the file."""
        start = int(self.ends[index - 1]) if index > 0 else 0
        return self.names[start:self.ends[index]].tobytes().decode("utf-8")


def _split_line(text: str) -> list[str]:
    """A line's fields: split at every tab, else at every comma, else at every run of spaces; a field in double
    quotes (as CSV writers quote one holding a comma, or every one) is read as CSV reads it."""
    for sep in ("\t", ","):
        if sep in text:
            if '"' in text:
                try:
                    return [f.strip() for f in next(csv.reader([text], delimiter=sep, skipinitialspace=True))]
                except csv.Error:  # a NUL byte: not a line of two fields, refused as such
                    return [text]
            return [f.strip() for f in text.split(sep)]
    return text.split()


def _check_relpath(where: str, impath: str) -> None:
    norm = os.path.normpath(impath)
    if os.path.isabs(impath) or norm in (os.curdir, os.pardir) or norm.startswith(os.pardir + os.sep):
        raise InputError(f"{where}: the path {impath!r} is not an image path inside the image folder; paths are "
                         "relative to the image folder given as the source, without '..' leading out of it.")


def read_label_list(path: str | os.PathLike, image_dir: str | os.PathLike | None = None, *,
                    exists: Callable[[str], bool] | None = None) -> LabelList:
    """Read and check a label list (module docstring): every line parsed, no image listed twice. With `image_dir`,
    a first line whose image is not there (but the next line's is) and whose class no other line names is a header
    ('file_path,label_name'), left out, not a missing image of a class of its own; `exists(relpath)` says whether an
    image is there (default: a file under `image_dir`; a tar's member for a tar). A devkit (folder or tar archive)
    is read by `dptool.imagenet_devkit`: its classes are all of its leaf synsets'."""
    path = str(path)
    if exists is None and image_dir is not None:
        exists = lambda rel: os.path.exists(os.path.join(image_dir, rel))  # noqa: E731
    if is_devkit(path):
        return _devkit_list(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise InputError(f"Label list {path} does not exist; --format list: takes a file of "
                         f"{_SHAPE}.") from exc
    except OSError as exc:
        raise InputError(f"Label list {path} cannot be read ({exc.strerror or exc}).") from exc
    sha256 = hashlib.sha256(data).hexdigest()  # of the file's bytes, as written
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with its BOM: Excel's 'Unicode Text' (a TSV)
        try:
            data = data.decode("utf-16").encode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"Label list {path} starts as UTF-16 text but is not ({exc.reason} at byte "
                             f"{exc.start}); a label list is {_SHAPE}, in UTF-8 or UTF-16.") from None
    header = data.split(b"\n", 1)[0].strip().removeprefix(b"\xef\xbb\xbf")
    kaggle = header == KAGGLE_HEADER.encode() or header.startswith(KAGGLE_HEADER.encode() + b",")  # extra columns
    paths: list[bytes] = []
    line_numbers: list[int] = []
    classes: list[str] = []  # one str object a class, not a line (setdefault below): 1.28M lines hold 1000
    known: dict[str, str] = {}
    first_line: dict[str, int] = {}  # normalised path -> the line it was first listed on (freed when done)
    for number, raw in enumerate(io.BytesIO(data), start=1):  # line by line, not a list of every line
        where = f"{path}:{number}"
        if number == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise InputError(f"{where} is not UTF-8 text ({exc.reason} at byte {exc.start}); a label list is "
                             f"{_SHAPE}.") from None
        if not text or (number == 1 and kaggle):
            continue
        if kaggle:
            fields = text.split(",", 2)  # ImageId, PredictionString (then any further columns)
            words = fields[1].split() if len(fields) >= 2 else []
            if not fields[0].strip() or not words:
                raise InputError(f"{where} is {text[:80]!r}, not 'ImageId,PredictionString' with the class first "
                                 "in the PredictionString (Kaggle's 'ILSVRC2012_val_00000001,n01751748 ...').")
            impath = fields[0].strip()  # Kaggle's ids lack the extension; a list that keeps it is read as well
            impath, name = (impath if impath.upper().endswith(".JPEG") else impath + ".JPEG"), words[0]
        else:
            fields = _split_line(text)
            if number == 1 and len(fields) == 2 and all(f.lower() in _HEADER_WORDS for f in fields):
                continue  # a header such as 'filename,label'
            if len(fields) != 2 or not all(fields):
                raise InputError(f"{where} is {text[:80]!r}, not 'relative/path<TAB, comma or space>class_name'; a "
                                 f"label list is {_SHAPE}.")
            impath, name = fields
            impath = impath.replace("\\", "/")  # a list written on Windows ('val\\a.JPEG'); '..\\' is refused below
        _check_relpath(where, impath)
        key = os.path.normpath(impath)
        if key in first_line:
            raise InputError(f"{where} lists {impath!r} again (first at line {first_line[key]}); each image is "
                             "listed once, with its one class.")
        first_line[key] = number
        paths.append(impath.encode("utf-8"))
        line_numbers.append(number)
        classes.append(known.setdefault(name, name))
    del first_line
    if (image_dir is not None and not kaggle and len(paths) > 1 and line_numbers[0] == 1
            and classes.count(classes[0]) == 1
            and not exists(paths[0].decode("utf-8"))
            and exists(paths[1].decode("utf-8"))):  # else: the wrong folder
        log.warning("%s:%d (%r, %r) is taken as a header: its image is not in %s, the next line's is, and no other "
                    "line names its class", path, 1, paths[0].decode("utf-8"), classes[0], image_dir)
        del paths[0], line_numbers[0], classes[0]
    if not paths:
        raise InputError(f"Label list {path} lists no images; it is {_SHAPE}.")
    class_names = sorted(set(classes))
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.fromiter((index[c] for c in classes), dtype=np.int64, count=len(classes))
    return LabelList(path=os.path.abspath(path), sha256=sha256, kaggle=kaggle,
                     class_names=class_names, names=np.frombuffer(b"".join(paths), dtype=np.uint8),
                     ends=np.cumsum([len(p) for p in paths], dtype=np.int64),
                     lines=np.asarray(line_numbers, dtype=np.int64), labels=labels)


def _devkit_list(path: str) -> LabelList:
    """The devkit's ground truth as a label list: line i is image ILSVRC2012_val_{i:08d}.JPEG, of its ID's WNID."""
    devkit = read_devkit(path)
    n = len(devkit.labels)
    names = [val_image_name(i).encode() for i in range(1, n + 1)]
    return LabelList(path=devkit.path, sha256=devkit.sha256, kaggle=False, class_names=devkit.wnids,
                     names=np.frombuffer(b"".join(names), dtype=np.uint8),
                     ends=np.cumsum([len(p) for p in names], dtype=np.int64),
                     lines=np.arange(1, n + 1, dtype=np.int64), labels=devkit.labels, line_file=devkit.ground_truth)


class _Folder:
    """A label list's images in a folder, by relative path (`dptool.tar_source.TarImages` is the same for a tar)."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.provenance = None

    def exists(self, relpath: str) -> bool:
        """Whether the listed image `relpath` is there."""
        return os.path.exists(os.path.join(self.root, relpath))

    def describe(self, relpath: str) -> str:
        """The file of the listed image `relpath`."""
        return os.path.join(self.root, relpath)

    def basenames(self):
        """The names of the folder's entries."""
        return (e.name for e in os.scandir(self.root))

    def has_folders(self, names) -> bool:
        """Whether the folder holds a sub-folder named like one of `names`."""
        return any(os.path.isdir(os.path.join(self.root, c)) for c in names)

    def load(self, relpath: str, max_pixels: int, missing: str) -> np.ndarray:
        """Decode the listed image `relpath` to (H, W, 3) uint8; `missing` is the reason where it is not there."""
        path = self.describe(relpath)
        if not os.path.exists(path):
            raise UnreadableImage("broken symbolic link" if os.path.islink(path) else missing)
        return decode_image_file(path, max_pixels)


class ListSource(SourceDataset):
    """The images a label list names, read from `image_dir` (a folder, or a tar: ILSVRC2012_img_val.tar as
    downloaded); classes are the list's sorted class names."""

    def __init__(self, list_file: str | os.PathLike, image_dir: str | os.PathLike, *,
                 max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = False):
        from tqdm import tqdm

        if Path(image_dir).is_file() and looks_like_tar(image_dir):
            from .tar_source import TarImages

            images = TarImages(image_dir, progress=progress)
        elif Path(image_dir).is_dir():
            images = _Folder(image_dir)
        else:
            raise InputError(f"Image folder {image_dir} does not exist or is not a folder or a tar; with --format "
                             "list: the source is the folder (or the uncompressed tar) the list's paths are relative "
                             "to (ILSVRC/Data/CLS-LOC/val for Kaggle's LOC_val_solution.csv, ILSVRC2012_img_val.tar or "
                             "the folder it is extracted into for image-net.org's devkit).")
        parsed = read_label_list(list_file, image_dir, exists=images.exists)
        self._images = images
        self._list = parsed
        n = len(parsed.labels)
        looked = tqdm(range(n), desc="looking for the listed images", unit="image", disable=not progress)
        absent = [i for i in looked if not images.exists(parsed.relpath(i))]
        if len(absent) == n:  # the image folder is not the one the list's paths are relative to
            # torchvision's ImageNet moves them into WNID folders
            sorted_val = parsed.line_file is not None and images.has_folders(parsed.class_names)
            raise InputError(f"None of the {n} images of {parsed.path} is in {image_dir} (the first would be "
                             f"{images.describe(parsed.relpath(0))}); " + (
                                 "it holds class folders, as torchvision's ImageNet sorts the val images: convert it "
                                 "as an ImageFolder (or a tar), without --format, with --classes-from TRAIN.beton."
                                 if sorted_val else "give the folder (or tar) the list's paths are relative to."))
        if absent:
            log.warning("%d of the %d images of %s are not in %s (the first: line %d, %s): each is skipped and "
                        "listed (or stops the run under --on-error fail)", len(absent), n, parsed.path, image_dir,
                        parsed.lines[absent[0]], parsed.relpath(absent[0]))
        if parsed.line_file is not None:  # a devkit: a val image its ground truth has no line for is left out
            unlisted = sorted(int(m[1]) for name in images.basenames() if (m := _VAL_NUMBER.fullmatch(name))
                              and int(m[1]) > n)
            if unlisted:
                log.warning("%d images of %s are past the %d lines of %s (the first: %s) and are left out: is the "
                            "ground truth cut short?", len(unlisted), image_dir, n, parsed.line_file,
                            val_image_name(unlisted[0]))
        provenance = {"label_list": {"path": parsed.path, "sha256": parsed.sha256}}
        if images.provenance is not None:  # a tar: its size and time tell a changed one (`--resume`)
            provenance["tar"] = images.provenance
        super().__init__(
            class_names=parsed.class_names,
            labels=parsed.labels,
            format=f"list:{parsed.path}",
            root=images.root,
            max_pixels=max_pixels,
            provenance=provenance,
        )

    def describe(self, index: int) -> str:
        """The file (or `TAR:member`) of sample `index`: what skip lists and error messages name."""
        return self._images.describe(self._list.relpath(index))

    def load(self, index: int) -> np.ndarray:
        """Decode the image of sample `index` to (H, W, 3) uint8; a listed file that is not there is unreadable."""
        return self._images.load(self._list.relpath(index), self.max_pixels,
                                 f"listed at {self._list.line_file or self._list.path}:{int(self._list.lines[index])} "
                                 "but not found")
