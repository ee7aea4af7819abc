"""ImageNet's tar files as downloaded, read in place: `ILSVRC2012_img_train.tar` (a tar of one tar a class) or a tar
of an ImageFolder tree as a dptool source (`--format tar`, `TarSource`), and a tar of images as the image folder of a
label list (`ILSVRC2012_img_val.tar` with `--format list:DEVKIT`: `TarImages`, used by `dptool.label_list`).

The index of every image's (offset, size) in the file comes from the tar headers alone (`dptool.tar_index`); an
image is then read with one `os.pread`, through the descriptor the index was read through (the writer's forked
workers inherit it; a dataset unpickled elsewhere opens the path, and refuses another file put in its place).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from array import array

import numpy as np

from .beton import MAX_CLASSES
from .errors import InputError
from .source_dataset import DEFAULT_MAX_PIXELS, SourceDataset, UnreadableImage, decode_image_bytes
from .tar_index import listing, open_tar

__all__ = ["TarSource", "TarImages"]

log = logging.getLogger(__name__)

_ACCEPTED = ("a tar of one tar a class (ImageNet's ILSVRC2012_img_train.tar: n01440764.tar, ...) or of an "
             "ImageFolder tree (`tar -cf train.tar train/`: CLASS/.../image)")


class _Reader:
    """Reads byte ranges of one file with `os.pread`: through the descriptor it was indexed through, which forked
    processes inherit (pread has no shared position), so a file put in its place under the same name is never read;
    a copy unpickled in another process opens the path, and refuses a file that is not the one indexed."""

    def __init__(self, path: str, fd: int):
        st = os.fstat(fd)
        self.path, self._fd, self._pid, self._identity = path, fd, os.getpid(), (st.st_dev, st.st_ino)

    def read(self, offset: int, size: int) -> bytes:
        """The `size` bytes at `offset`; fewer where the file has changed since it was indexed (a decoder says so)."""
        if self._fd is None:
            fd = os.open(self.path, os.O_RDONLY)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self._identity:
                os.close(fd)
                raise InputError(f"{self.path} is not the file indexed (it was replaced since); convert it again.")
            self._fd, self._pid = fd, os.getpid()
        return os.pread(self._fd, size, offset)

    def __getstate__(self) -> dict:
        return {"path": self.path, "_fd": None, "_pid": None, "_identity": self._identity}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)


@contextlib.contextmanager
def _indexing(path: str, progress: bool):
    """Open the tar `path` for its index: yields (descriptor, size, `at`), `at(offset)` moving a bar through the file
    as its headers are read (20 s for ImageNet's count here, page cache warm; shown only with `progress`). The
    descriptor is closed if the index fails, and kept open for the images if it does not."""
    from tqdm import tqdm

    fd, size = open_tar(path)
    bar = tqdm(total=size, desc=f"indexing {os.path.basename(path)}", unit="B", unit_scale=True, disable=not progress)
    try:
        yield fd, size, lambda offset: bar.update(max(0, offset - bar.n))
        bar.update(size - bar.n)
    except BaseException:
        os.close(fd)
        raise
    finally:
        bar.close()


def _hidden(name: str) -> bool:
    """Whether a member's name (below the folders stripped) has a hidden component (`.DS_Store`, AppleDouble
    `._x.JPEG`, `.git/`): left out as ImageFolder leaves hidden files."""
    return any(c.startswith(".") for c in name.split("/"))


def _stripped_top(names: list[str], kinds: bytearray) -> str | None:
    """The folders every member is under (`train` of `tar -cf train.tar train/`; `home/me/data/train` of `tar -cf
    train.tar ~/data/train`, which tar stores without its leading '/'), level by level while what is below still has
    classes (a folder, or a member tar); None where there is none to strip. A member that is one of these folders,
    or hidden beside one (macOS's AppleDouble `._train`), is under none of them: it names nothing below the cut."""
    stripped = ""
    while True:
        cut = len(stripped)
        first = (next((n for n in names if n.startswith(stripped) and len(n) > cut and n[cut] != "."), None)
                 or next((n for n in names if n.startswith(stripped) and "/" in n[cut:]), None))  # `.cache/` only
        if first is None:
            break
        prefix = stripped + first[cut:].split("/", 1)[0] + "/"
        if not all(n.startswith(prefix) or n == prefix[:-1] or n[cut] == "." for n in names if n.startswith(stripped)
                   and len(n) > cut):
            break
        inside = len(prefix)
        if not (any("/" in n[inside:] or n[inside:].lower().endswith(".tar") for n in names
                    if n.startswith(prefix) and n[inside] != ".")
                or any(k == 68 and n.startswith(prefix) for n, k in zip(names, kinds))):
            break
        stripped = prefix
    return stripped[:-1] or None


def _pack(names: list[str], offsets, sizes) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray]:
    """A class's images sorted by name as ImageFolder sorts a class's files (of a name listed twice, a tar appended
    to, the last, as extracting the tar keeps it), packed: (names joined, their lengths, offsets, sizes)."""
    order = sorted(range(len(names)), key=names.__getitem__)  # stable: equal names stay in the tar's order
    order = [i for j, i in enumerate(order) if j + 1 == len(order) or names[order[j + 1]] != names[i]]
    encoded = [names[i].encode("utf-8", "surrogateescape") for i in order]
    return (b"".join(encoded), np.fromiter(map(len, encoded), np.int64, len(encoded)),
            np.asarray(offsets, dtype=np.int64)[order], np.asarray(sizes, dtype=np.int64)[order])


def _unpack(packed) -> tuple[list[str], array, array]:
    """`_pack`'s inverse (a class met twice, as a tar and a folder, is packed again with both)."""
    joined, lengths, offsets, sizes = packed
    ends = np.cumsum(lengths)
    names = [joined[e - n:e].decode("utf-8", "surrogateescape") for e, n in zip(ends.tolist(), lengths.tolist())]
    return names, array("q", offsets.tolist()), array("q", sizes.tolist())


class TarSource(SourceDataset):
    """The images of an uncompressed tar, in place: member `NAME.tar` -> class NAME (its images at any depth), member
    `CLASS/.../image` -> class CLASS, under the folders every member shares (`_stripped_top`); classes and images
    sorted by name as `ImageFolderSource` sorts them, so the labels are those of the tree extracting it gives."""

    def __init__(self, path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = False):
        path = os.path.abspath(path)
        began = time.perf_counter()
        log.info("indexing the images of %s from its headers (about 20 s for ImageNet's 1.28M on a warm cache)", path)
        # a class's images: listed (names, offsets, sizes), or packed as soon as its tar is read (ImageNet's 1.28M
        # names are held as Python strings one class at a time)
        listed: dict[str, tuple[list[str], array, array]] = {}
        packed: dict[str, tuple] = {}
        classes: dict[str, None] = {}  # every class met, a folder with no image included

        def listed_of(cls: str) -> tuple[list[str], array, array]:
            if cls not in listed:
                listed[cls] = _unpack(packed.pop(cls)) if cls in packed else ([], array("q"), array("q"))
            return listed[cls]

        with _indexing(path, progress) as (fd, size, at):
            st = os.fstat(fd)
            outer = listing(fd, 0, size, path, outer=True, at=at)
            top = _stripped_top(outer.names, outer.kinds)
            cut = len(top) + 1 if top else 0
            others, loose, inner_tars = outer.others, 0, 0
            for name, offset, length, kind in zip(outer.names, outer.offsets, outer.sizes, outer.kinds):
                if cut and not name.startswith(top + "/"):  # a folder stripped, or a hidden member beside one
                    continue
                rest = name[cut:]
                if not rest or _hidden(rest):
                    continue
                cls, sep, _ = rest.partition("/")
                if kind == 68:  # a folder: a class folder is a class even if empty, as ImageFolder has it
                    if not sep:
                        classes[cls] = None
                elif sep:
                    classes[cls] = None
                    names, offsets, sizes = listed_of(cls)
                    names.append(name), offsets.append(offset), sizes.append(length)
                elif rest.lower().endswith(".tar"):  # a class's tar: its images, read in place
                    inner_tars += 1
                    cls = rest[:-4]
                    classes[cls] = None
                    inside = listing(fd, offset, length, f"{path}:{name}", outer=False, at=at)
                    at(offset + length)
                    others += inside.others
                    files = [i for i, k in enumerate(inside.kinds) if k == 70 and not _hidden(inside.names[i])]
                    found = ([f"{name}/{inside.names[i]}" for i in files], [inside.offsets[i] for i in files],
                             [inside.sizes[i] for i in files])
                    if cls in listed or cls in packed:
                        for mine, more in zip(listed_of(cls), found):
                            mine.extend(more)
                    else:
                        packed[cls] = _pack(*found)
                else:
                    loose += 1  # a file beside the classes: ImageFolder reads none
            del outer
        class_names = sorted(classes)
        pieces = [_pack(*listed.pop(c)) if c in listed else packed.pop(c, None) or _pack([], [], [])
                  for c in class_names]
        counts = [len(p[1]) for p in pieces]
        refusal = None
        if loose and not classes:
            refusal = (f"{path} holds files ({loose}) but no class folders or member tars: a flat tar of images "
                       "(ILSVRC2012_img_val.tar) is labelled by a list, --format list:ILSVRC2012_devkit_t12.tar.gz "
                       f"(or list:FILE) with the tar as the source, and --format tar takes {_ACCEPTED}.")
        elif not sum(counts):
            refusal = f"{path} holds no images; --format tar takes {_ACCEPTED}."
        elif len(classes) > MAX_CLASSES:
            refusal = (f"{path} holds {len(classes)} classes, more than the {MAX_CLASSES} a .beton's labels take; is "
                       f"it {_ACCEPTED}?")
        if refusal is not None:
            os.close(fd)
            raise InputError(refusal)
        if others:
            log.warning("%s: %d links, sparse files or other non-file members are left out (their images are not "
                        "read)", path, others)
        if loose:
            log.warning("%s: %d files beside the class folders are left out, as ImageFolder leaves them", path, loose)
        empty = [c for c, n in zip(class_names, counts) if n == 0]
        if empty:
            shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
            log.warning("%d classes of %s have no images (%s); their labels are kept with no samples", len(empty),
                        path, shown)
        log.info("%s: %d images of %d classes indexed in %.1f s", path, sum(counts), len(class_names),
                 time.perf_counter() - began)
        super().__init__(
            class_names=class_names,
            labels=np.repeat(np.arange(len(class_names), dtype=np.int64), counts),
            format="tar",
            root=path,
            max_pixels=max_pixels,
            provenance={"tar": {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                "layout": "class tars" if inner_tars else "class folders"}},
        )
        # one byte string and offsets, not N Python strings (the forked workers would copy the pages they touch)
        self._names = np.frombuffer(b"".join(p[0] for p in pieces), dtype=np.uint8)
        self._ends = np.cumsum(np.concatenate([p[1] for p in pieces]), dtype=np.int64)
        self._offsets = np.concatenate([p[2] for p in pieces])
        self._sizes = np.concatenate([p[3] for p in pieces])
        self._reader = _Reader(path, fd)

    def member(self, index: int) -> str:
        """The name of sample `index` in the tar (`n01440764.tar/n01440764_10026.JPEG` for a member tar's)."""
        start = int(self._ends[index - 1]) if index > 0 else 0
        return self._names[start:self._ends[index]].tobytes().decode("utf-8", "surrogateescape")

    def describe(self, index: int) -> str:
        """`TAR:member` of sample `index`: what skip lists and error messages name."""
        return f"{self.root}:{self.member(index)}"

    def load(self, index: int) -> np.ndarray:
        """Decode sample `index` (one pread at its offset) to (H, W, 3) uint8; UnreadableImage says why not."""
        return decode_image_bytes(self._reader.read(int(self._offsets[index]), int(self._sizes[index])),
                                  self.max_pixels, expected=int(self._sizes[index]))


class TarImages:
    """The images of a tar as a label list's image folder: a listed path is a member's name, or its name below the
    folders every member is under (`tar -cf val.tar val/`). Member tars are not looked into."""

    def __init__(self, path: str | os.PathLike, *, progress: bool = False):
        self.root = os.path.abspath(path)
        with _indexing(self.root, progress) as (fd, size, at):
            st = os.fstat(fd)
            found = listing(fd, 0, size, self.root, outer=True, at=at)
        files = [i for i, k in enumerate(found.kinds) if k == 70]
        names = [found.names[i] for i in files]
        # the folders every image is under (`val` of `tar -cf val.tar val/`, `home/me/val` of `tar -cf val.tar
        # ~/val`), deepest first: a listed path is looked for below each
        # no name has a leading '/' (`parts`); a hidden file (AppleDouble `._val` beside the folder) names none
        folders = [n.rpartition("/")[0] for n in names if not n.rpartition("/")[2].startswith(".")]
        common = [c for c in os.path.commonpath(folders).split("/") if c] if folders else []
        self.tops = ["/".join(common[:k]) for k in range(len(common), 0, -1)]
        self._index = {n: j for j, n in enumerate(names)}  # of a name listed twice, the last (as extracting it)
        self._names = names
        self._offsets = np.frombuffer(found.offsets, dtype=np.int64)[files]
        self._sizes = np.frombuffer(found.sizes, dtype=np.int64)[files]
        self._reader = _Reader(self.root, fd)
        self.provenance = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "layout": "images"}

    def _find(self, relpath: str) -> int | None:
        key = "/".join(p for p in relpath.split("/") if p not in ("", "."))
        found = self._index.get(key)
        for top in self.tops:
            if found is not None:
                break
            found = self._index.get(f"{top}/{key}")
        return found

    def exists(self, relpath: str) -> bool:
        """Whether the list's path `relpath` is an image of the tar."""
        return self._find(relpath) is not None

    def describe(self, relpath: str) -> str:
        """`TAR:member` of the list's path (the path as listed where the tar lacks it)."""
        found = self._find(relpath)
        return f"{self.root}:{relpath if found is None else self._names[found]}"

    def basenames(self):
        """The file names of the images (what a folder's listing gives)."""
        return (n.rsplit("/", 1)[-1] for n in self._names)

    def has_folders(self, names) -> bool:
        """Whether some image lies in a folder (or member tar) named like one of `names` (torchvision's sorted val)."""
        wanted = set(names)
        return any(n.split("/")[-2 if "/" in n else 0].removesuffix(".tar") in wanted for n in self._names)

    def load(self, relpath: str, max_pixels: int, missing: str) -> np.ndarray:
        """Decode the listed image `relpath` to (H, W, 3) uint8; `missing` is the reason where the tar lacks it."""
        found = self._find(relpath)
        if found is None:
            raise UnreadableImage(missing)
        size = int(self._sizes[found])
        return decode_image_bytes(self._reader.read(int(self._offsets[found]), size), max_pixels, expected=size)
