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
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

# output_checks (checking an output path before any work, sweeping stale temporaries) is re-exported here, where
# every command imports it from; _TAG too, for the tests that name a temporary file of this machine
from .errors import DptoolError, InputError
from .output_checks import check_output_path, check_plot_path, stale_bytes, sweep_stale
from .temp_names import _TAG, temp_path_for  # noqa: F401

__all__ = ["atomic_output", "check_output_path", "check_plot_path", "is_write_error", "output_group", "pwrite_all",
           "stale_bytes", "sweep_stale", "temp_path_for", "write_durably", "write_error"]

# errno values that can only mean "the output could not be written" (never a bad input), named as such (exit 2)
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


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
