"""Dataset readers: ImageFolder trees, `.npz` arrays and torchvision datasets on disk, as (RGB image, label).

Every reader is an indexable `SourceDataset` (`dptool.source_dataset`, whose names are re-exported here):
`len()`, `[i] -> (HxWx3 uint8 array, label)`, `class_names`, `labels` (read without decoding images where the
format allows) and `describe(i)` for messages. `load(i)` raises `UnreadableImage` with a one-line reason for a
file that must be skipped (zero bytes, not an image, too many pixels, corrupt or truncated), after opening the
file only once. `open_source` picks the reader of a `--format`.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from .beton import MAX_CLASSES
from .errors import DptoolError, InputError
from .source_dataset import (
    DEFAULT_MAX_PIXELS,
    SourceDataset,
    UnreadableImage,
    _array_to_rgb,
    decode_image_file,
    to_rgb_array,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "UnreadableImage",
    "TORCHVISION_FORMATS",
    "SourceDataset",
    "ImageFolderSource",
    "NpzSource",
    "TorchvisionSource",
    "open_source",
    "to_rgb_array",
    "decode_image_file",
    "source_inputs",
]

log = logging.getLogger(__name__)


def _class_files(class_dir: Path) -> list[str]:
    """The sample files under `class_dir`, sorted: every non-hidden file at any depth, symlinked sub-folders
    followed as torchvision's ImageFolder does (each real folder once, so a link cycle ends), hidden sub-folders
    (.ipynb_checkpoints, .git) left out like hidden files, and broken symlinks kept: a file that cannot be read
    is listed as skipped (or stops the run), not dropped unseen. Sub-folders are walked in sorted order, not in
    the order the file system lists them, so a folder reached twice is read under the same name on every disk."""
    files: list[str] = []
    seen: set[str] = set()

    def unreadable(exc: OSError) -> None:  # os.walk would skip the folder silently: a class losing images unseen
        raise InputError(f"Folder {exc.filename} cannot be read ({exc.strerror}); its images would be left out: make "
                         "it readable, or move it out of the source.") from exc

    for top, dirs, names in os.walk(class_dir, followlinks=True, onerror=unreadable):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # os.walk descends in this list's order
        for name in names:
            full = os.path.join(top, name)
            if not name.startswith(".") and (os.path.isfile(full) or not os.path.exists(full)):
                files.append(full)
    return sorted(files)


class ImageFolderSource(SourceDataset):
    """One sub-folder per class (sorted by name); every non-hidden file under it is a sample (`_class_files`)."""

    def __init__(self, root: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = False):
        from tqdm import tqdm

        root = Path(root)
        if not root.is_dir():
            raise InputError(f"Source folder {root} does not exist or is not a folder.")
        entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
        for link in entries:  # is_dir() is False for it: its class would vanish, and every later label shift by one
            if link.is_symlink() and not link.exists():
                raise InputError(f"Source folder {root} holds the broken link {link.name!r} (to "
                                 f"{os.readlink(link)}): as a class folder, its class would be left out and the "
                                 "labels of the classes after it shifted; repair the link (mount its disk, say) or "
                                 "remove it.")
        class_dirs = [p for p in entries if p.is_dir()]
        if not class_dirs:
            raise InputError(f"Source folder {root} has no class sub-folders; an ImageFolder tree has one per class.")
        # The paths are kept as one byte string and offsets, not N Python strings: the writer's forked workers
        # would each copy every string page they touch (reference counts), about 110 bytes a sample per process.
        names: list[bytes] = []
        counts: list[int] = []
        empty: list[tuple[int, Path]] = []
        listed = tqdm(class_dirs, desc=f"listing {root.name or root}", unit="class", disable=not progress)
        for label, class_dir in enumerate(listed):
            files = _class_files(class_dir)
            if not files:
                empty.append((label, class_dir))
            inside = len(str(class_dir)) + len(os.sep)  # os.walk's paths start with the class folder's, as given
            names.extend(os.fsencode(os.path.join(class_dir.name, f[inside:])) for f in files)
            counts.append(len(files))
        if len(empty) == 1:
            log.warning("class folder %s is empty; its label %d is kept with no samples", empty[0][1], empty[0][0])
        elif empty:  # one line, not one per folder (300 of ImageNet's 1000 val folders empty gave 300 lines)
            shown = ", ".join(d.name for _, d in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
            log.warning("%d class folders of %s are empty (%s); their labels are kept with no samples", len(empty),
                        root, shown)
        super().__init__(
            class_names=[d.name for d in class_dirs],
            labels=np.repeat(np.arange(len(class_dirs), dtype=np.int64), counts),
            format="imagefolder",
            root=os.path.abspath(root),  # the skipped files in the sidecar are named as absolutely as its source
            max_pixels=max_pixels,
        )
        self._names = np.frombuffer(b"".join(names), dtype=np.uint8)
        self._ends = np.cumsum([len(n) for n in names], dtype=np.int64)

    def path(self, index: int) -> str:
        """The file of sample `index`."""
        start = int(self._ends[index - 1]) if index > 0 else 0
        return os.path.join(self.root, os.fsdecode(self._names[start:self._ends[index]].tobytes()))

    def describe(self, index: int) -> str:
        """The file of sample `index`: what skip lists and error messages name."""
        return self.path(index)

    def load(self, index: int) -> np.ndarray:
        """Decode the file of sample `index` to (H, W, 3) uint8, opening it once; UnreadableImage says why not."""
        path = self.path(index)
        if not os.path.exists(path):
            raise UnreadableImage("broken symbolic link" if os.path.islink(path) else "file vanished")
        return decode_image_file(path, self.max_pixels)



def _stored_member_memmap(path: Path, name: str) -> np.ndarray | None:
    """Member `name` of an uncompressed `.npz` (np.savez) as a read-only memory map, else None.

    `np.load` reads a member whole: N images of ImageNet-64 are 15 GB. An uncompressed member is an `.npy` file
    lying in the zip as it is, so its data can be mapped where it starts. What zipfile would check is checked
    here too (the local header's name, no encryption, the member's CRC-32, in one streamed pass), and the array
    must end where the member does; anything else falls back to `np.load`, which reports the damage.
    """
    import struct
    import zlib

    try:
        with zipfile.ZipFile(path) as z:
            info = z.getinfo(name + ".npy")
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:  # compressed or encrypted
            return None
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)  # the local file header: its name and extra field lengths end it
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                return None
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
            if f.read(name_len) != info.orig_filename.encode(encoding):
                return None
            start = info.header_offset + 30 + name_len + extra_len
            f.seek(start)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(np.lib.format.read_magic(f))
            if read_header is None:
                return None
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
            if fortran or dtype.hasobject or not shape or 0 in shape:
                return None
            if offset + dtype.itemsize * int(np.prod(shape)) != start + info.file_size:
                return None  # the header's shape does not fill the member exactly
            f.seek(start)
            crc, left = 0, info.file_size
            while left:
                block = f.read(min(left, 1 << 24))
                if not block:
                    return None
                crc, left = zlib.crc32(block, crc), left - len(block)
            if crc != info.CRC:
                return None
    except (KeyError, OSError, ValueError, zipfile.BadZipFile):
        return None
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset)


def _class_names(path: Path, arr: np.ndarray) -> list[str]:
    """`class_names` of an `.npz` as strings: 1-D; bytes (numpy 'S', as h5py and Python 2 pickles give) decoded
    as UTF-8, not written as their repr ("b'cat'")."""
    if arr.ndim != 1:
        raise InputError(f"{path}: 'class_names' must be a 1-D array of strings, one per label, got shape "
                         f"{arr.shape}.")
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in arr.tolist()]


class NpzSource(SourceDataset):
    """`.npz` with `images` (N, H, W[, C]) uint8, `labels` (N,) int and optional `class_names` (C,) str.

    Images of an uncompressed file (np.savez) are memory-mapped, so memory does not grow with N; a compressed
    file's are read whole.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise InputError(f"Source file {path} does not exist or is not a file; --format npz takes an .npz file.")
        try:
            data = np.load(path, allow_pickle=False)
            missing = [k for k in ("images", "labels") if k not in getattr(data, "files", ())]
            if missing:
                raise InputError(f"{path} must hold arrays 'images' and 'labels' (missing "
                                 f"{' and '.join(repr(k) for k in missing)}).")
            images = _stored_member_memmap(path, "images")
            if images is None:  # compressed (np.savez_compressed): only reading it whole is possible
                log.info("%s is compressed: its images are read into memory whole", path)
                images = data["images"]
            labels = data["labels"]
            names = _class_names(path, data["class_names"]) if "class_names" in data.files else None
        except (OSError, ValueError, RuntimeError, zipfile.BadZipFile) as exc:  # RuntimeError: an encrypted member
            raise InputError(f"{path} is not a readable .npz file ({exc}).") from exc
        if (
            images.dtype != np.uint8
            or images.ndim not in (3, 4)
            or (images.ndim == 4 and images.shape[3] not in (1, 3, 4))
        ):
            raise InputError(
                f"{path}: 'images' must be uint8 of shape (N, H, W) or (N, H, W, 1|3|4), "
                f"got {images.dtype} {images.shape}."
            )
        if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
            raise InputError(
                f"{path}: 'labels' must be (N,) integers matching {len(images)} images, "
                f"got {labels.dtype} {labels.shape}."
            )
        if len(labels) and labels.min() < 0:
            raise InputError(f"{path}: labels must be non-negative, got {labels.min()}.")
        if len(labels) and int(labels.max()) >= MAX_CLASSES:
            raise InputError(f"{path}: labels are class indices 0 to C-1 with C at most {MAX_CLASSES}, got a label "
                             f"{int(labels.max())}; map the labels to 0..C-1 first.")
        n_classes = int(labels.max()) + 1 if len(labels) else 0
        if names is None:
            names = [str(i) for i in range(n_classes)]
        elif len(names) < n_classes:
            raise InputError(f"{path}: {len(names)} class_names given but labels go up to {n_classes - 1}.")
        unused = len(names) - len(np.unique(labels))
        if unused:
            log.warning("%s: %d of its %d classes have no samples; their labels are kept (labels are the class "
                        "index, 0 to %d)", path, unused, len(names), len(names) - 1)
        super().__init__(class_names=names, labels=labels.astype(np.int64), format="npz", root=str(path))
        self.images = images

    def load(self, index: int) -> np.ndarray:
        """Image `index` as (H, W, 3) uint8 (gray and RGBA stored arrays converted); reads only that image."""
        return _array_to_rgb(self.images[index])


# name -> (constructor keyword for the split, {dptool split: torchvision value}, attribute holding targets)
TORCHVISION_FORMATS: dict[str, tuple[str | None, dict[str, object], tuple[str, ...]]] = {
    "CIFAR10": ("train", {"train": True, "test": False}, ("targets",)),
    "CIFAR100": ("train", {"train": True, "test": False}, ("targets",)),
    "FashionMNIST": ("train", {"train": True, "test": False}, ("targets",)),
    "MNIST": ("train", {"train": True, "test": False}, ("targets",)),
    "Flowers102": ("split", {"train": "train", "val": "val", "test": "test"}, ("_labels",)),
    "OxfordIIITPet": ("split", {"train": "trainval", "test": "test"}, ("_labels",)),
    "DTD": ("split", {"train": "train", "val": "val", "test": "test"}, ("_labels",)),
    "Food101": ("split", {"train": "train", "test": "test"}, ("_labels",)),
    "StanfordCars": ("split", {"train": "train", "test": "test"}, ("_samples",)),
    "SUN397": (None, {"all": None}, ("_labels",)),
}


class TorchvisionSource(SourceDataset):
    """A torchvision dataset already on local disk (never downloaded), images converted to RGB."""

    def __init__(self, name: str, root: str | os.PathLike, split: str):
        import torchvision.datasets as tvd

        if name not in TORCHVISION_FORMATS:
            known = ", ".join(sorted(TORCHVISION_FORMATS))
            raise InputError(f"Unknown torchvision dataset {name!r}; known: {known}.")
        key, splits, target_attrs = TORCHVISION_FORMATS[name]
        if split not in splits:
            raise InputError(f"{name} has no split {split!r}; accepted: {', '.join(splits)}.")
        if not Path(root).is_dir():
            raise InputError(f"Dataset root {root} does not exist or is not a folder.")
        kwargs = {} if key is None else {key: splits[split]}
        try:
            ds = getattr(tvd, name)(str(root), download=False, **kwargs)
        except ImportError as exc:
            raise DptoolError(f"torchvision's {name} reader needs the module {exc.name}, which is not installed "
                              f"here; install it (pip install {exc.name}).") from exc
        except (RuntimeError, FileNotFoundError, OSError) as exc:
            raise InputError(
                f"torchvision {name} ({split}) is not on disk under {root} ({exc}); dptool never downloads."
            ) from exc
        labels = None
        for attr in target_attrs:
            if hasattr(ds, attr):
                raw = getattr(ds, attr)
                if attr == "_samples":
                    raw = [s[1] for s in raw]
                labels = np.asarray([int(t) for t in raw], dtype=np.int64)
                break
        if labels is None:
            labels = np.asarray([int(ds[i][1]) for i in range(len(ds))], dtype=np.int64)
        num_classes = int(labels.max(initial=-1)) + 1
        names = list(getattr(ds, "classes", [])) or [str(i) for i in range(num_classes)]
        if len(names) < num_classes:  # OxfordIIITPet lists only the classes its split holds, but keeps the labels
            raise InputError(f"torchvision {name} ({split}) under {root} names {len(names)} classes but its labels "
                             f"go up to {num_classes - 1}: the split lacks some classes, so label names are unknown.")
        super().__init__(
            class_names=[str(n) for n in names],
            labels=labels,
            format=f"torchvision:{name}",
            root=str(root),
            split=split,
        )
        self.dataset = ds

    def load(self, index: int) -> np.ndarray:
        """Image `index` of the torchvision dataset as (H, W, 3) uint8, whatever PIL mode or array it returns."""
        img = self.dataset[index][0]
        if isinstance(img, Image.Image):
            return to_rgb_array(img)
        return _array_to_rgb(np.asarray(img))


def open_source(
    src: str | os.PathLike, *, format: str = "auto", split: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = False,
) -> SourceDataset:
    """Open `src` as a dataset: `format` is 'auto', 'imagefolder', 'npz', 'tar' (`dptool.tar_source`: 'auto' takes a
    file named .tar as one), 'torchvision:NAME', 'coop:SPLIT.json' or 'list:FILE' (`src` is then the folder, or
    tar, the file's paths are relative to). `progress`: a bar on stderr while a folder is listed, a tar indexed or
    a list's images looked for."""
    src_path = Path(src)
    if format.startswith("torchvision:"):
        return TorchvisionSource(format.split(":", 1)[1], src_path, split or "train")
    if format.startswith("coop:"):
        from .coop import CoOpSource

        return CoOpSource(_coop_file(format), src_path, split or "train", max_pixels=max_pixels)
    if format.startswith("list:"):
        from .label_list import ListSource

        if split is not None:
            raise InputError("--split applies to torchvision datasets and CoOp split files; with --format list: "
                             "the images the list names are converted, all of them.")
        return ListSource(_list_file(format), src_path, max_pixels=max_pixels, progress=progress)
    if not src_path.exists():
        raise InputError(f"Source {src_path} does not exist.")
    if split is not None:
        raise InputError(f"--split applies to torchvision datasets (--format torchvision:NAME) and CoOp split files "
                         f"(--format coop:SPLIT.json); {src_path} is converted whole.")
    if format == "auto":
        from .tar_index import looks_like_tar

        is_file = src_path.is_file()
        if is_file and src_path.suffix.lower() == ".json":
            raise InputError(f"Source {src_path} is a JSON file; a CoOp split file is given as --format "
                             f"coop:{src_path} with the dataset's image folder as the source.")
        if is_file and src_path.suffix.lower() == ".beton":
            raise InputError(f"Source {src_path} is already an FFCV .beton, what convert writes; convert reads an "
                             "ImageFolder tree (one folder of images per class), an .npz (images, labels), a tar, "
                             "--format torchvision:NAME, --format coop:SPLIT.json or --format list:FILE.")
        if is_file and src_path.suffix.lower() != ".npz" and not looks_like_tar(src_path):
            listed = (f"; a label list is given as --format list:{src_path} with the image folder as the source"
                      if src_path.suffix.lower() in (".csv", ".txt", ".tsv") else "")
            raise InputError(f"Source {src_path} is a file but not an .npz or a .tar; give an .npz file (images, "
                             "labels; --format npz for another name), a tar (ILSVRC2012_img_train.tar as downloaded, "
                             "or a tar of an ImageFolder tree; --format tar for another name) or an ImageFolder tree "
                             f"(one folder of images per class){listed}.")
        format = ("npz" if src_path.suffix.lower() == ".npz" else "tar") if is_file else "imagefolder"
        coop = sorted(src_path.glob("split_zhou_*.json")) if format == "imagefolder" else []
        if coop:  # a CoOp dataset folder (stanford_cars, oxford_pets) read as ImageFolder: its sub-folders as classes
            raise InputError(f"Source {src_path} holds the CoOp split file {coop[0].name}: convert a split of it with "
                             f"--format coop:{coop[0]} and the dataset's image folder as the source, or give --format "
                             "imagefolder to read the folder as one folder per class.")
    if format == "tar":
        from .tar_source import TarSource

        return TarSource(src_path, max_pixels=max_pixels, progress=progress)
    if format == "npz":
        return NpzSource(src_path)
    if format == "imagefolder":
        return ImageFolderSource(src_path, max_pixels=max_pixels, progress=progress)
    raise InputError(f"Unknown format {format!r}; accepted: auto, imagefolder, npz, tar, torchvision:NAME, "
                     "coop:SPLIT.json, list:FILE.")


def _coop_file(format: str) -> str:
    """The split file named by `--format coop:FILE`, with `~` expanded (a shell leaves it after the colon)."""
    name = format.split(":", 1)[1]
    if not name:
        raise InputError("--format coop: needs the split file after the colon, e.g. "
                         "coop:split_zhou_OxfordPets.json.")
    return os.path.expanduser(name)


def _list_file(format: str) -> str:
    """The label list named by `--format list:FILE`, with `~` expanded."""
    name = format.split(":", 1)[1]
    if not name:
        raise InputError("--format list: needs the label list after the colon, e.g. list:LOC_val_solution.csv.")
    return os.path.expanduser(name)


def source_inputs(src: str | os.PathLike, format: str) -> tuple:
    """The files a conversion with `format` reads (the source, and a CoOp split file or label list), for the output
    checks: no output or sidecar may be written over one of them."""
    if format.startswith("coop:") and format != "coop:":
        return (src, _coop_file(format))
    if format.startswith("list:") and format != "list:":
        return (src, _list_file(format))
    return (src,)
