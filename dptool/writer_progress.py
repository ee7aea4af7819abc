"""The progress record of a `.beton` write, so that an interrupted write can continue (`write_beton`'s `checkpoints`).

`Checkpoints` says where and how often `dptool.writer.write_beton` records how far it has durably written;
`read_checkpoint` reads such a record back; the record is made in a thread (`_Recorder`) after an fsync of the file,
and replaces the previous one atomically. What is recorded (the samples done, the page layout, the allocation table,
the skipped samples) is `write_beton`'s; this module only keeps and reads it. A conversion's partial file and its
record are named by `partial_paths`; `interrupted_conversion_message` tells a user who finds them what they are.
"""

from __future__ import annotations

import errno
import io
import os
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._ffcv import import_ffcv
from .atomic import write_durably
from .errors import InputError

__all__ = ["Checkpoints", "read_checkpoint", "partial_paths", "interrupted_conversion_message", "missing_file_message"]

_STATE_VERSION = 1


@dataclass
class Checkpoints:
    """Where `write_beton` records how far it has durably written, so that an interrupted write can continue.

    Every `every_seconds`, once at the end, and when the write is stopped after a record was due (what the workers
    wrote before they stopped), the file is flushed to the disk (fsync) once the chunks recorded are written, then
    a small state file (`state_path`: the samples done, the page layout, the allocation table
    and the skipped samples, with `identity`) replaces the previous one atomically. `resume_from`, a state read by
    `read_checkpoint`, continues from there: the file is cut back to where that state ends (bytes written after it
    may be anything), and the result is byte-identical to an uninterrupted write, whatever the workers."""

    state_path: Path
    identity: str
    details: str = ""  # what the identity is made of (JSON), recorded so that a refusal can name what changed
    every_seconds: float = 30.0
    resume_from: dict | None = None


def read_checkpoint(path: str | os.PathLike) -> dict | None:
    """The state recorded by `write_beton` in `path`, or None where there is none; InputError where it cannot be
    read."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            state = {k: data[k] for k in data.files}
        if int(state["version"]) != _STATE_VERSION:
            raise ValueError(f"state version {int(state['version'])}")
        return {"identity": str(state["identity"]), "num_samples": int(state["num_samples"]),
                "done": int(state["done"]), "kept": int(state["kept"]), "offset": int(state["offset"]),
                "page": int(state["page"]), "used": int(state["used"]), "table": state["table"],
                "skipped": dict(zip(state["skipped_index"].tolist(), state["skipped_reason"].tolist())),
                "details": str(state["details"])}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise InputError(f"The progress record {path} of an interrupted conversion cannot be read ({exc}); "
                         "pass --force without --resume to start the conversion over.") from None


def _save_checkpoint(ck: Checkpoints, fd: int, snap: dict, table: list[np.ndarray], n: int) -> None:
    """Flush the file to the disk, then record `snap` in `ck.state_path` (replaced atomically)."""
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # a file system without fsync: recorded without the guarantee
            raise
    rows = np.concatenate(table[:snap["chunks"]]) if snap["chunks"] else np.zeros(0, dtype=_alloc_type())
    skipped = snap["skipped"]
    buffer = io.BytesIO()
    np.savez(buffer, version=_STATE_VERSION, identity=np.str_(ck.identity), num_samples=n, done=snap["done"],
             kept=snap["kept"], offset=snap["offset"], page=snap["page"], used=snap["used"], table=rows,
             skipped_index=np.fromiter(skipped, dtype=np.int64, count=len(skipped)),
             skipped_reason=np.array(list(skipped.values()), dtype=np.str_).reshape(-1), details=np.str_(ck.details))
    write_durably(ck.state_path, buffer.getvalue())


class _Recorder:
    """Makes the progress records in a thread, so that the parent goes on placing chunks while the disk catches up
    with the fsync (seconds of writes); one record at a time, its error raised at the next call."""

    def __init__(self, ck: Checkpoints, fd: int, n: int):
        self.ck, self.fd, self.n = ck, fd, n
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def busy(self) -> bool:
        """Whether a record is being made (an error of the last one is raised here)."""
        self._raise()
        return self.thread is not None and self.thread.is_alive()

    def start(self, snap: dict, table: list[np.ndarray]) -> None:
        """Record `snap` (whose chunks are all written) in the background."""
        self.join()
        self.thread = threading.Thread(target=self._run, args=(snap, table), name="dptool-record", daemon=True)
        self.thread.start()

    def _run(self, snap: dict, table: list[np.ndarray]) -> None:
        try:
            _save_checkpoint(self.ck, self.fd, snap, table, self.n)
        except BaseException as exc:  # noqa: BLE001 - raised in the parent's thread
            self.error = exc

    def join(self, raise_error: bool = True) -> None:
        """Wait for the record being made (before the file is closed, or a record is made in the caller's thread)."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if raise_error:
            self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def _alloc_type() -> np.dtype:
    return import_ffcv("ffcv.types").ALLOC_TABLE_TYPE


def partial_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """The partial file of a conversion to `out` (``.NAME.partial``, kept when the conversion is interrupted) and its
    progress record (``.NAME.partial.npz``)."""
    out = Path(out)
    return out.with_name(f".{out.name}.partial"), out.with_name(f".{out.name}.partial.npz")


def interrupted_conversion_message(path: str | os.PathLike) -> str | None:
    """One sentence saying that `path` is the partial file (or its progress record) of an interrupted conversion,
    how far it got and how to continue it or start over; None for a path not named as one."""
    p = Path(path)
    suffix = ".partial.npz" if p.name.endswith(".partial.npz") else ".partial"
    if not (p.name.startswith(".") and p.name.endswith(suffix) and len(p.name) > len(suffix) + 1):
        return None
    what = "the progress record" if suffix == ".partial.npz" else "the partial file"
    out = p.with_name(p.name[1:-len(suffix)])
    partial, record = partial_paths(out)
    if not partial.is_file() or partial.stat().st_size == 0:
        return (f"{p} is {what} of an interrupted conversion to {out}, not a usable file, and its partial file "
                f"{partial.name} is {'empty' if partial.is_file() else 'gone'}: the same `dptool convert` command "
                "starts over.")
    try:
        state = read_checkpoint(record)
    except InputError:
        return (f"{p} is {what} of an interrupted conversion to {out}, not a usable file, and its progress record "
                f"{record.name} cannot be read: run the same `dptool convert` command with --force to start over.")
    if state is None:
        return (f"{p} is {what} of an interrupted conversion to {out}, not a usable file, with no progress record "
                "to continue from: the same `dptool convert` command starts over.")
    return (f"{p} is {what} of an interrupted conversion to {out} ({state['done']} of {state['num_samples']} samples "
            "done), not a usable file: run the same `dptool convert` command with --resume to continue it, or with "
            "--force instead to start over.")


def missing_file_message(path: str | os.PathLike) -> str:
    """One sentence for a `path` that does not exist: that it does not, and, when an interrupted conversion to it left
    its partial file beside it, how far that got and how to finish it (`convert --resume`)."""
    partial, _ = partial_paths(path)
    if not partial.is_file():
        return f"File {path} does not exist."
    detail = interrupted_conversion_message(partial)
    return f"File {path} does not exist yet; {detail}"
