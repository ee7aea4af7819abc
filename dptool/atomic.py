"""Write outputs under a temporary name in the same folder and rename them into place when complete."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError

__all__ = ["atomic_output", "check_output_path", "temp_path_for"]


def temp_path_for(path: Path) -> Path:
    """A hidden temporary name beside `path`, unique to this process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def check_output_path(path: str | os.PathLike, *, force: bool, inputs: tuple = ()) -> Path:
    """Refuse an output that exists (without `force`), equals an input, or sits in a missing folder."""
    out = Path(path)
    for src in inputs:
        if src is not None and Path(src).exists() and out.exists() and out.resolve() == Path(src).resolve():
            raise InputError(f"Output {out} is the same file as input {src}; choose another output path.")
        if src is not None and os.path.abspath(out) == os.path.abspath(src):
            raise InputError(f"Output {out} is the same path as input {src}; choose another output path.")
    if out.exists() and not force:
        raise InputError(f"Output {out} already exists; pass --force to overwrite it.")
    if not out.parent.exists():
        raise InputError(f"Folder {out.parent} of output {out} does not exist.")
    if out.exists() and out.is_dir():
        raise InputError(f"Output {out} is a folder; give a file path.")
    return out


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
    os.replace(tmp, final)
