"""Where every image of an uncompressed tar lies, read from its headers alone: the index `dptool.tar_source` reads
images from with one `os.pread` each, nothing extracted and nothing written beside the tar.

Python's `tarfile` reads the headers, of the file and of each member tar (ImageNet's train tar holds one tar a class)
through `_View`, a bounded read-only window at the member's offset. A tar cut short (a partial download) is refused
naming the member where it ends; a compressed tar is refused before it is read (random access is impossible there).
"""

from __future__ import annotations

import os
import tarfile
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .errors import InputError

__all__ = ["Member", "compression", "looks_like_tar", "check_uncompressed", "members", "parts", "open_tar", "listing"]

BLOCK = tarfile.BLOCKSIZE

# how a compressed file starts -> (its compression, the command that decompresses it once, keeping it)
_MAGIC = ((b"\x1f\x8b", "gzip", "gunzip -k"), (b"BZh", "bzip2", "bunzip2 -k"), (b"\xfd7zXZ\x00", "xz", "unxz -k"),
          (b"\x28\xb5\x2f\xfd", "zstd", "unzstd"), (b"\x04\x22\x4d\x18", "lz4", "lz4 -d"), (b"\x5d\x00\x00", "lzma",
                                                                                              "unlzma -k"))
_SUFFIXES = {".gz": "gzip", ".tgz": "gzip", ".bz2": "bzip2", ".tbz": "bzip2", ".tbz2": "bzip2", ".xz": "xz",
             ".txz": "xz", ".zst": "zstd", ".tzst": "zstd", ".lz4": "lz4", ".lzma": "lzma", ".z": "compress"}
_COMMANDS = {kind: command for _, kind, command in _MAGIC} | {"compress": "uncompress"}


def compression(path: str | os.PathLike) -> str | None:
    """The compression of a tar file (gzip, bzip2, xz, zstd, lz4...), by its first bytes, else by its name
    (`.tar.gz`, `.tgz`...) unless it starts with a tar header; None for an uncompressed file."""
    try:
        with open(path, "rb") as f:
            head = f.read(BLOCK)
    except OSError:
        head = b""
    for magic, kind, _ in _MAGIC[:5]:  # lzma's three bytes are too common to trust without the name
        if head.startswith(magic):
            return kind
    try:  # a tar named as compressed: a browser or a server undid the compression on the way, keeping the name
        tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
        return None
    except tarfile.HeaderError:
        pass
    name = os.path.basename(os.fspath(path)).lower()
    suffix = os.path.splitext(name)[1]
    if suffix in _SUFFIXES and (".tar" in name or suffix.startswith(".t")):
        return _SUFFIXES[suffix]
    return None


def looks_like_tar(path: str | os.PathLike) -> bool:
    """Whether `--format auto` reads the file `path` as a tar: named `.tar` (or `.tar.gz`, `.tgz`..., refused as
    compressed), or holding a POSIX tar header's `ustar` mark."""
    name = os.path.basename(os.fspath(path)).lower()
    if name.endswith(".tar") or (".tar." in name) or os.path.splitext(name)[1] in (".tgz", ".tbz", ".tbz2", ".txz",
                                                                                      ".tzst"):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(257)
            return f.read(5) == b"ustar"
    except OSError:
        return False


def check_uncompressed(path: str | os.PathLike) -> None:
    """Refuse a compressed tar: an image cannot be read at its offset in one, so dptool does not read it."""
    kind = compression(path)
    if kind is not None:
        raise InputError(f"{path} is a tar compressed with {kind}, whose images cannot be read in place (random "
                         f"access needs an uncompressed tar); decompress it once (e.g. {_COMMANDS[kind]} {path}) and "
                         "convert the .tar it gives.")


class _View:
    """The `size` bytes at `start` of the open file `fd` as a read-only file, read with `os.pread` (no shared file
    position): what tarfile reads a tar, or a member tar in place, through."""

    def __init__(self, fd: int, start: int, size: int):
        self.fd, self.start, self.size, self.pos = fd, start, size, 0

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        if n <= 0:
            return b""
        data = os.pread(self.fd, n, self.start + self.pos)
        self.pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, pos + (0, self.pos, self.size)[whence])
        return self.pos

    def tell(self) -> int:
        return self.pos


@dataclass(frozen=True)
class Member:
    """A tar member: its name, whether a regular file (`file`), a folder (`folder`), a hard link to an earlier member
    (`hardlink`, named by `target`) or anything else (a symbolic link, a device, a sparse file: `other`), and where
    its data lies in the outer file."""

    name: str
    kind: str
    offset: int
    size: int
    target: str = ""


def parts(name: str) -> tuple[str, ...]:
    """A member name's path components, without a leading '/' or './' (`tar -cf x.tar .` writes './n01/a.JPEG')."""
    return tuple(p for p in name.split("/") if p not in ("", "."))


def members(fd: int, start: int, size: int, where: str, *, outer: bool) -> Iterator[Member]:
    """The members of the tar lying at `start` (`size` bytes) of `fd`, headers only, offsets in the file. `where`
    names the tar in refusals. A tar that ends inside a member, or without its end-of-archive block (`outer`: a
    download cut at a member's end; a member tar ending exactly where its outer member does is taken whole), or whose
    headers stop at bytes that are not one (a damaged file), is refused naming the member where it ends."""
    view = _View(fd, start, size)
    try:
        # never 'r:*': a compressed member is not decompressed; closed in the finally below
        tar = tarfile.open(fileobj=view, mode="r:")  # noqa: SIM115
    except tarfile.ReadError as exc:
        if size == 0 or str(exc) == "empty file":
            raise InputError(f"{where} is empty: a tar holds at least one image; give the complete file.") from None
        if not outer:
            head = os.pread(fd, 6, start)
            kind = next((kind for magic, kind, _ in _MAGIC[:5] if head.startswith(magic)), None)
            if kind is not None:
                raise InputError(f"{where} is a tar compressed with {kind}, but a member tar is read in place "
                                 "uncompressed; extract the tar and convert the folder, or replace the member with "
                                 f"its decompressed tar ({_COMMANDS[kind]}).") from None
            raise InputError(f"{where} is not a tar archive ({exc}), though named as a class's tar; repair it or "
                             "remove it from the tar.") from None
        raise InputError(f"{where} is not a tar archive ({exc}); give an uncompressed tar (ImageNet's "
                         "ILSVRC2012_img_train.tar as downloaded, or `tar -cf` of an ImageFolder tree).") from None
    last = None
    try:
        while True:
            try:
                info = tar.next()
            except tarfile.ReadError as exc:
                if str(exc) == "unexpected end of data":  # the last member's padding runs past the end
                    _cut(where, f"ends inside its member {last}", size, outer)
                if str(exc) in ("truncated header", "empty header"):  # a member's header after its long name's
                    _cut(where, f"ends in the header after its member {last}", size, outer)
                _damaged(where, tar.offset, last)  # a header after a long name's or an extended one
            except (ValueError, tarfile.TarError):  # a damaged extended header's numbers or names
                _damaged(where, tar.offset, last)
            if info is None:
                break
            tar.members.clear()  # tarfile keeps every member it read: 1.28M of them in a tree's tar
            # a sparse file's data in the tar is its non-hole parts only, shorter than its size
            stored = info.size if info.sparse is None else sum(n for _, n in info.sparse)
            if info.offset_data + stored > size:
                raise InputError(f"{where} is cut short (a partial download?): it ends inside its member "
                                 f"{info.name} ({max(size - info.offset_data, 0)} of its {stored} bytes are "
                                 "there); download the rest and convert the complete file.")
            kind = ("file" if info.isreg() and not info.issparse() else "folder" if info.isdir() else
                    "hardlink" if info.islnk() else "other")
            last = info.name
            yield Member(info.name, kind, start + info.offset_data, info.size, info.linkname if info.islnk() else "")
        end = tar.offset  # where tarfile stopped: an end-of-archive block, or what it could not read as a header
        view.seek(end)
        tail = view.read(BLOCK)
        if end >= size or len(tail) < BLOCK:
            if outer or 0 < len(tail) < BLOCK:
                after = f" its member {last}" if last else " the start"
                _cut(where, f"ends after{after}" if end >= size else f"ends in the header after{after}", size, outer)
        elif tail.count(0) != BLOCK:
            raise InputError(f"{where} holds no tar header at byte {end}" + (f" (after its member {last})" if last
                             else "") + ": it is damaged, or tar files were joined; give one complete tar.")
    finally:
        tar.close()


def _damaged(where: str, offset: int, last: str | None):
    """Refuse a tar whose header at `offset` (after the member `last`) cannot be read."""
    raise InputError(f"{where} holds a damaged tar header at byte {offset}" + (
        f" (after its member {last})" if last else "") + "; give a complete, undamaged tar.")


def _cut(where: str, how: str, size: int, outer: bool):
    """Refuse a tar that `how` ends (at `size` bytes) before its end-of-archive block."""
    if outer:
        raise InputError(f"{where} is cut short (a partial download?): it {how}, at {size} bytes, without the "
                         "end-of-archive block a complete tar has; download the rest and convert the complete file.")
    raise InputError(f"{where} is not a complete tar: it {how}; give a tar whose member tars are complete.")


@dataclass
class _Listing:
    """Members as compact columns (a tree's tar lists 1.28M): names, offsets, sizes, and a kind letter each."""

    names: list
    offsets: array
    sizes: array
    kinds: bytearray
    others: int = 0  # links, devices, sparse files: not read (named in a warning)


def open_tar(path: str | os.PathLike) -> tuple[int, int]:
    """Open the uncompressed tar `path` read-only: (file descriptor, size); compressed or not a file is refused."""
    if not os.path.isfile(path):
        raise InputError(f"Source {path} does not exist or is not a file; --format tar takes an uncompressed tar.")
    check_uncompressed(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise InputError(f"{path} cannot be read ({exc.strerror or exc}).") from exc
    return fd, os.fstat(fd).st_size


def listing(fd: int, start: int, size: int, where: str, *, outer: bool,
            at: Callable[[int], None] | None = None) -> _Listing:
    """The files and folders of a tar (`members`), names as `parts` joins them; hidden ones (`.DS_Store`, AppleDouble
    `._x.JPEG`) included: whether a name is hidden depends on the folders a caller strips (a tree tarred as
    `root/.cache/train/` is not). A hard link is a file with its target's data (what extracting the tar gives: `tar`
    stores a hard-linked file's bytes once). `at(offset)` is told how far into the file the headers are read, every
    4096 members (a progress bar's position)."""
    out = _Listing([], array("q"), array("q"), bytearray())
    links: dict[int, str] = {}  # listing position of a hard link -> its target's name
    for k, m in enumerate(members(fd, start, size, where, outer=outer)):
        if at is not None and k % 4096 == 0:
            at(m.offset)
        p = parts(m.name)
        if not p:
            continue
        if m.kind == "other":
            out.others += 1
            continue
        if m.kind == "hardlink":
            links[len(out.names)] = "/".join(parts(m.target))
        out.names.append("/".join(p))
        out.offsets.append(m.offset)
        out.sizes.append(m.size)
        out.kinds.append(68 if m.kind == "folder" else 70)  # 'D', 'F'
    if links:
        _resolve_links(out, links)
    return out


def _resolve_links(out: _Listing, links: dict[int, str]) -> None:
    """Give each hard link of `out` the offset and size of the last file of its target's name listed before it (the
    file extracting the tar had given that name when it made the link); one whose target is not a file of the tar
    is dropped and counted with the others. One pass, names looked up only for
    the targets (a tree's tar lists 1.28M)."""
    targets = set(links.values())
    latest: dict[str, int] = {}
    dropped = []
    for i, (name, kind) in enumerate(zip(out.names, out.kinds)):
        if i in links:
            found = latest.get(links[i])
            if found is None:
                dropped.append(i)
                continue
            out.offsets[i], out.sizes[i] = out.offsets[found], out.sizes[found]
        if kind == 70 and name in targets:
            latest[name] = i
    if dropped:  # rebuilt, not deleted one by one (each deletion moves the rest of 1.28M entries)
        gone = set(dropped)
        keep = [i for i in range(len(out.names)) if i not in gone]
        out.names = [out.names[i] for i in keep]
        out.offsets, out.sizes = array("q", (out.offsets[i] for i in keep)), array("q", (out.sizes[i] for i in keep))
        out.kinds = bytearray(out.kinds[i] for i in keep)
    out.others += len(dropped)
