"""Write outputs under a temporary name in the same folder and rename them into place when complete."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError

__all__ = ["atomic_output", "check_output_path", "temp_path_for"]


def temp_path_for(path: Path) -> Path:
    """A hidden temporary name beside `path`, unique to this process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def check_output_path(path: str | os.PathLike, *, force: bool, inputs: tuple = ()) -> Path:
    """Refuse an output that exists (without `force`), equals an input or an input's sidecar (`INPUT.json`),
    or sits in a folder that is missing or cannot be written to (found before any work is done)."""
    out = Path(path)
    for src in (p for p in inputs if p is not None):
        for protected, what in ((Path(src), f"input {src}"), (Path(f"{src}.json"), f"the sidecar of input {src}")):
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
    _check_writable(out)
    return out


def _check_writable(out: Path) -> None:
    """Create and remove the temporary file `atomic_output` will write: permissions, read-only mounts, immutable
    folders and a name too long to take the temporary suffix all show here, not after hours of work."""
    probe = temp_path_for(out)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        if exc.errno == errno.EEXIST:  # this process is writing it already: never touch it
            return
        if exc.errno == errno.ENAMETOOLONG:
            raise InputError(f"Output name {out.name} is too long: its temporary name {probe.name} is "
                             f"{len(os.fsencode(probe.name))} bytes; choose a shorter name.") from None
        raise InputError(f"Cannot write to folder {out.parent} of output {out} ({exc.strerror}); "
                         "choose a folder you can write to.") from None
    os.unlink(probe)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on any error delete it."""
    final = Path(path)
    tmp = temp_path_for(final)
    if tmp.exists():
        tmp.unlink()
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    try:
        os.replace(tmp, final)
    except OSError as exc:  # e.g. an immutable output, or one owned by another user in a sticky folder
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise InputError(f"Cannot replace {final} ({exc.strerror}); remove it or choose another output path.") \
            from None
