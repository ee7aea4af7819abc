"""Check an output path before any work is done: refuse one that exists (without --force), is an input or sits
in a folder that cannot be written to, and sweep the temporary files that interrupted runs left beside it.

Outputs are then written by `dptool.atomic`, which re-exports these names.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError
from .temp_names import _TAG, _TEMP_SUFFIX, temp_path_for

__all__ = ["check_output_path", "check_plot_path", "stale_bytes", "sweep_stale"]

log = logging.getLogger(__name__)


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
