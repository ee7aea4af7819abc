"""Write outputs under a temporary name in the same folder and rename them into place when complete.

Outputs that belong together (a `.beton` and its sidecar, a scores file, its assignment and its plot, the files of
several ratios) are written inside `output_group()`: every one of them is written under its temporary name, and
only when all are complete are they renamed into place, one after the other, under a lock of their folders, so
that a failure (a full disk, Ctrl-C, SIGTERM) leaves none of them and two processes writing the same outputs at
once leave one's complete set, never a mix. Each is flushed to the disk (fsync) before its rename, and the folder
after, so that a power loss or a kernel crash cannot leave an empty or partial file under a final name either.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import logging
import os
import re
import secrets
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import DptoolError, InputError

__all__ = ["atomic_output", "check_output_path", "check_plot_path", "is_write_error", "output_group", "pwrite_all",
           "stale_bytes", "sweep_stale", "temp_path_for", "write_durably", "write_error"]

log = logging.getLogger(__name__)

# errno values that can only mean "the output could not be written" (never a bad input), named as such (exit 2)
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def _host_tag() -> str:
    """8 hex digits naming this machine, boot and PID namespace: a PID means the same process only among
    temporary names that carry the same tag (containers sharing a volume, two hosts on NFS have other tags)."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return hashlib.blake2b("\0".join(parts).encode(), digest_size=4).hexdigest()


_TAG = _host_tag()
# what follows ".NAME.tmp-": PID-TAG-RANDOM, or the PID alone (the names of dptool before 2026-11-29)
_TEMP_SUFFIX = re.compile(r"(?P<pid>\d+)(?:-(?P<tag>[0-9a-f]{8})-[0-9a-f]{8})?")


def temp_path_for(path: Path) -> Path:
    """A hidden temporary name beside `path`, unique to this call: ``.NAME.tmp-PID-HOST-RANDOM``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{_TAG}-{secrets.token_hex(4)}")


def is_write_error(exc: BaseException) -> bool:
    """Whether `exc` can only mean that an output could not be written (a full disk, a quota, a read-only
    filesystem, a file size limit), never a bad input."""
    return isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS


def write_error(final: Path, exc: OSError) -> InputError | None:
    """The one-sentence error for an OSError that means `final` could not be written, else None."""
    if is_write_error(exc):
        return InputError(f"Cannot write {final} ({exc.strerror}); nothing was written under that name: free space "
                          "or choose another folder.")
    if exc.errno == errno.ENOENT and not Path(final).parent.is_dir():  # checked at the start: removed since
        return InputError(f"Cannot write {final}: its folder {Path(final).parent} was removed during the run; "
                          "nothing was written under that name: recreate it or choose another folder.")
    return None


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at `offset` of `fd` (one `os.pwrite` may write fewer bytes than it is given)."""
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def write_durably(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably: written under a temporary name, flushed to the disk, renamed,
    and the folder flushed, so that a crash at any point leaves the old contents or the new ones."""
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            try:
                os.fsync(f.fileno())
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: a file system without fsync
                    raise
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _flush_folder(os.fspath(path.parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists
        return True
    return True


def _stale(out: Path) -> Iterator[tuple[os.DirEntry, bool]]:
    """Each temporary file of `out` in its folder but this process's own, with whether it is removable: left by an
    interrupted run of this machine whose process is gone (not another machine's, or an older dptool's)."""
    prefix = f".{out.name}.tmp-"
    with contextlib.suppress(OSError):
        for entry in os.scandir(out.parent):
            m = _TEMP_SUFFIX.fullmatch(entry.name[len(prefix):]) if entry.name.startswith(prefix) else None
            if m is None:
                continue
            pid, tag = int(m["pid"]), m["tag"]
            if tag == _TAG and not _alive(pid):
                yield entry, True
            elif tag != _TAG or pid != os.getpid():  # not this process's own
                yield entry, False


def _size(entry: os.DirEntry) -> int | None:
    with contextlib.suppress(OSError):
        return entry.stat(follow_symlinks=False).st_size
    return None


def _sweep_stale(out: Path, dry_run: bool = False) -> None:
    """Remove the temporary files of `out` left by interrupted runs (kill -9, power loss) of this machine whose
    process is gone; name the others (another machine's, or an older dptool's) so their space is not lost unseen.
    `dry_run`: name the ones it would remove too, and remove none."""
    for entry, removable in _stale(out):
        if removable and dry_run:
            size = _size(entry)
            if size is not None:
                log.warning("%s (%d bytes) was left by an interrupted run; a run writing %s removes it first",
                            entry.path, size, out)
        elif removable:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                log.warning("removed %s, left by an interrupted run", entry.path)
        else:
            size = _size(entry)
            if size is not None:
                log.warning("%s (%d bytes) is the temporary file of another or an interrupted run; delete it "
                            "if no dptool is writing %s", entry.path, size, out)


def stale_bytes(path: str | os.PathLike) -> int:
    """Bytes of the temporary files of `path` that `check_output_path` removes before a run writes it (left by
    interrupted runs of this machine): space a dry run can count as free."""
    return sum(_size(entry) or 0 for entry, removable in _stale(Path(path)) if removable)


def sweep_stale(path: str | os.PathLike) -> None:
    """Remove the temporary files of `path` left by interrupted runs of this machine (see `check_output_path`)."""
    _sweep_stale(Path(path))


def check_output_path(path: str | os.PathLike, *, force: bool, inputs: tuple = (), dry_run: bool = False) -> Path:
    """Refuse an output that exists (without `force`), equals an input, an input's sidecar (`INPUT.json`) or
    digests file (`INPUT.digests.npy`), or sits in a folder that is missing or cannot be written to (found before
    any work is done). `dry_run`: write and remove nothing (no probe file; the stale temporaries a run would remove
    are named, not removed), see `_check_writable_unwritten`."""
    out = Path(path)
    for src in (p for p in inputs if p is not None):
        for protected, what in ((Path(src), f"input {src}"), (Path(f"{src}.json"), f"the sidecar of input {src}"),
                                (Path(f"{src}.digests.npy"), f"the digests file of input {src}")):
            if protected.exists() and out.exists() and out.resolve() == protected.resolve():
                raise InputError(f"Output {out} is the same file as {what}; choose another output path.")
            if os.path.abspath(out) == os.path.abspath(protected):
                raise InputError(f"Output {out} is the same path as {what}; choose another output path.")
    if out.exists() and not force:
        raise InputError(f"Output {out} already exists; pass --force to overwrite it.")
    if not out.parent.exists():
        raise InputError(f"Folder {out.parent} of output {out} does not exist.")
    if out.exists() and out.is_dir():
        raise InputError(f"Output {out} is a folder; give a file path.")
    if dry_run:
        _check_writable_unwritten(out)
        _sweep_stale(out, dry_run=True)
        return out
    _check_writable(out)
    _sweep_stale(out)
    return out


def check_plot_path(path: str | os.PathLike, *, force: bool, inputs: tuple = ()) -> Path:
    """`check_output_path` for a `--plot` (every command's): the path must end in .png, and an existing file there
    is replaced, with `force`, only when it is a PNG (a slip such as `--plot surrogate.pt --force` costs nothing)."""
    out = Path(path)
    if out.suffix.lower() != ".png":
        check_output_path(out, force=True, inputs=inputs)  # an input named as --plot is refused as such first
        raise InputError(f"--plot {path} does not end in .png; the plot is written as a PNG: give a .png path.")
    check_output_path(out, force=force, inputs=inputs)
    if out.is_file():
        with open(out, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                raise InputError(f"--plot {path} exists and is not a PNG; --force replaces an earlier plot only: "
                                 "choose another path.")
    return out


def _check_writable(out: Path) -> None:
    """Create and remove a temporary file like the one `atomic_output` will write: permissions, read-only mounts,
    immutable folders and a name too long to take the temporary suffix all show here, not after hours of work."""
    probe = temp_path_for(out)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise (_too_long(out, probe) or InputError(
                f"Output name {out.name} is too long: its temporary name {probe.name} is "
                f"{len(os.fsencode(probe.name))} bytes; choose a shorter name.")) from None
        raise InputError(f"Cannot write to folder {out.parent} of output {out} ({exc.strerror}); "
                         "choose a folder you can write to.") from None
    os.unlink(probe)


def _too_long(out: Path, probe: Path) -> InputError | None:
    """The error for a temporary name `probe` of `out` longer than its folder's limit on a name, or a path longer
    than the limit on a whole path (PATH_MAX, which counts the closing NUL); None within both or where unknown."""
    for key, measured in (("PC_NAME_MAX", probe.name), ("PC_PATH_MAX", str(probe))):
        try:
            limit = os.pathconf(out.parent, key) - (key == "PC_PATH_MAX")
        except (OSError, ValueError):  # no limit known: none checked
            continue
        n = len(os.fsencode(measured))
        if n > limit and key == "PC_NAME_MAX":
            return InputError(f"Output name {out.name} is too long: its temporary name {probe.name} is {n} bytes; "
                              "choose a shorter name.")
        if n > limit:
            return InputError(f"Output path {out} is too long: its temporary file's path is {n} bytes, over the "
                              f"limit of {limit}; choose a shorter name or a folder with a shorter path.")
    return None


def _check_writable_unwritten(out: Path) -> None:
    """`_check_writable` without creating a file: the folder is one, its write permission for this process's
    effective ids as `access(2)` sees it (a read-only mount and an immutable folder included), and the temporary
    name's length against the limits on a name and a path (`_too_long`)."""
    if not out.parent.is_dir():  # the probe's ENOTDIR: `exists()` holds for a file
        raise InputError(f"Cannot write to folder {out.parent} of output {out} ({os.strerror(errno.ENOTDIR)}); "
                         "choose a folder you can write to.")
    error = _too_long(out, temp_path_for(out))
    if error is not None:
        raise error
    # open(2) checks the effective ids; os.access by default the real ones (they differ under setuid)
    if not os.access(out.parent, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        raise InputError(f"Cannot write to folder {out.parent} of output {out} (permission denied or a read-only "
                          "file system); choose a folder you can write to.")


class _Group:
    """Outputs written and waiting to be renamed into place together: (temporary, final, the final it describes)."""

    def __init__(self):
        self.staged: list[tuple[Path, Path, Path | None]] = []
        self.kept: set[str] = set()  # temporaries that their caller manages (a resumable partial): never deleted

    def add(self, tmp: Path, final: Path, companion_of: Path | None, keep: bool = False) -> None:
        for i, (t, f, _) in enumerate(self.staged):
            if os.path.abspath(f) == os.path.abspath(final):  # written again (a log): the newer one counts
                if os.path.abspath(t) not in self.kept:
                    with contextlib.suppress(FileNotFoundError):
                        t.unlink()
                del self.staged[i]
                break
        if keep:
            self.kept.add(os.path.abspath(tmp))
        self.staged.append((tmp, final, companion_of))

    def discard(self) -> None:
        for tmp, _, _ in self.staged:
            if os.path.abspath(tmp) not in self.kept:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        self.staged.clear()

    def _order(self) -> list[tuple[Path, Path, Path | None]]:
        """Each output followed at once by its companions (its sidecar), so that a pair is never half replaced."""
        finals = {os.path.abspath(f) for _, f, _ in self.staged}
        key = lambda c: os.path.abspath(c) if c is not None and os.path.abspath(c) in finals else None  # noqa: E731
        order: list[tuple[Path, Path, Path | None]] = []

        def place(item) -> None:  # the item, then its companions, theirs after each (a sidecar's own companion)
            order.append(item)
            for c in self.staged:
                if key(c[2]) == os.path.abspath(item[1]) and c not in order:
                    place(c)

        for item in self.staged:
            if key(item[2]) is None:
                place(item)
        order += [item for item in self.staged if item not in order]  # a cycle of companions: in the given order
        return order

    def commit(self) -> None:
        self.staged = self._order()
        try:
            for tmp, final, _ in self.staged:
                _flush(tmp, final)
        except BaseException:
            self.discard()
            raise
        with _folder_locks({f.parent for _, f, _ in self.staged}), _signals_deferred():
            placed = []
            while self.staged:
                tmp, final, companion_of = self.staged[0]
                try:
                    os.replace(tmp, final)
                except OSError as exc:  # e.g. an immutable output, or one owned by another user in a sticky folder
                    if companion_of is not None and os.path.abspath(companion_of) in placed:  # it describes another
                        with contextlib.suppress(OSError):
                            os.unlink(final)
                    self.discard()
                    done = f" ({', '.join(map(str, placed))} already replaced)" if placed else ""
                    raise InputError(f"Cannot replace {final} ({exc.strerror}){done}; remove it or choose another "
                                     "output path.") from None
                placed.append(os.path.abspath(final))
                self.staged.pop(0)
        for folder in sorted({os.path.dirname(f) for f in placed}):
            _flush_folder(folder)


def _flush(tmp: Path, final: Path) -> None:
    """Force `tmp`'s bytes to the disk before it is renamed to `final`: after a power loss or a kernel crash the
    rename can otherwise reach the disk before the data, leaving an empty or partial file under the final name."""
    try:
        fd = _open_to_sync(tmp)
        if fd is None:  # neither readable nor writable by this process: placed unflushed (as before fsync)
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except FileNotFoundError:  # never written: the rename names it
        return
    except OSError as exc:  # a delayed ENOSPC/EDQUOT (NFS) shows only here
        mapped = write_error(final, exc)
        if mapped is not None:
            raise mapped from None
        if exc.errno == errno.EINVAL:  # a file system without fsync: the data is written, without the guarantee
            return
        # EIO and the like: here it can only be the output's disk (exit 1: not a user error, but no traceback)
        raise DptoolError(f"Cannot write {final} ({exc.strerror}); nothing was written under that name.") from exc


def _open_to_sync(tmp: Path) -> int | None:
    """A descriptor of `tmp` to fsync: read-only, else write-only where the file cannot be read back (a umask or an
    ACL that leaves out the owner's read right); None where it can be opened neither way."""
    for flags in (os.O_RDONLY, os.O_WRONLY):
        try:
            return os.open(tmp, flags)
        except PermissionError:
            continue
    return None


def _flush_folder(folder: str) -> None:
    """Make the renames into `folder` durable (best effort: some file systems cannot sync a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_GROUP: contextvars.ContextVar[_Group | None] = contextvars.ContextVar("dptool_output_group", default=None)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP back while outputs are renamed into place, and act on them after: one
    raised between two renames would leave a new .beton beside its old sidecar. (Python runs signal handlers in
    the main thread, so swapping the handlers covers a signal delivered to any thread; a mask would not.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        handler = signal.getsignal(sig)
        if handler not in (signal.SIG_IGN, None):  # ignored stays ignored; None: not set from Python
            previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(caught):
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            else:  # SIG_DFL
                signal.raise_signal(signum)


@contextlib.contextmanager
def _folder_locks(folders) -> Iterator[None]:
    """Exclusive `flock` of each folder (sorted: no deadlock) while outputs are renamed into it, so that two
    dptool processes renaming the same outputs do it one after the other. Best effort where flock fails."""
    import fcntl

    fds = []
    try:
        for folder in sorted({os.path.realpath(f) for f in folders}):  # one lock per folder, however named
            with contextlib.suppress(OSError):
                fd = os.open(folder, os.O_RDONLY)
                fds.append(fd)
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        for fd in fds:
            os.close(fd)  # releases the lock


@contextlib.contextmanager
def output_group() -> Iterator[None]:
    """Every `atomic_output` inside renames into place only when the whole block succeeds, all together."""
    if _GROUP.get() is not None:  # nested: the outer group commits
        yield
        return
    group = _Group()
    token = _GROUP.set(group)
    try:
        yield
    except BaseException:
        group.discard()
        raise
    finally:
        _GROUP.reset(token)
    try:
        group.commit()
    except BaseException:
        group.discard()
        raise


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, companion_of: str | os.PathLike | None = None,
                  temp: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path` (inside `output_group`, when the
    group ends), on any error delete it. `companion_of`: the output that `path` describes (a sidecar's .beton):
    renamed right after it, and removed rather than left stale when it cannot be replaced after that output was.
    `temp`: the caller's own temporary file in `path`'s folder (a resumable conversion's partial file), renamed
    into place the same way but never deleted here: on an error its caller decides whether it stays."""
    final = Path(path)
    tmp = temp_path_for(final) if temp is None else Path(temp)
    try:
        yield tmp
    except BaseException as exc:
        if temp is None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        mapped = write_error(final, exc) if isinstance(exc, OSError) else None
        if mapped is not None:
            raise mapped from None
        raise
    companion_of = Path(companion_of) if companion_of is not None else None
    group = _GROUP.get()
    if group is not None:
        group.add(tmp, final, companion_of, keep=temp is not None)
        return
    single = _Group()
    single.add(tmp, final, companion_of, keep=temp is not None)
    single.commit()
