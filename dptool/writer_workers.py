"""The worker processes of `dptool.writer.write_beton`: each encodes chunks of samples with FFCV's field encoders
into private buffers, sends the parent their sizes, and writes the bytes where the parent has placed them.

Chunk k goes to worker k % n over a pipe of its own, so the results come back in order; a worker's error reaches
the parent as itself; Ctrl-C is the parent's, raised at its safe points only. Why the write is shaped this way (the
same bytes whatever the number of workers) is in `dptool.writer`'s docstring.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import pickle
import signal
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .atomic import pwrite_all
from .errors import DptoolError

__all__ = ["SkipSample"]


class SkipSample(Exception):
    """Raised by a dataset's `__getitem__` for a sample to leave out (an unreadable file); the message says why."""


class _SampleTooLarge(Exception):
    def __init__(self, index: int, size: int):
        super().__init__(index, size)
        self.index, self.size = index, size


@dataclass
class _Chunk:
    """What a worker tells the parent of one encoded chunk: the kept samples' metadata rows, with each pointer
    column holding the number of the sample's allocation it points to, and each kept sample's allocation sizes.
    The bytes stay in the worker until the parent says where they go."""

    rows: np.ndarray
    sizes: list[list[int]]
    skipped: list[tuple[int, str]]


# The worker's state, set once per worker process by `_worker_main` (inherited through fork, never pickled).
_WORKER: dict = {}


def _worker_main(conn, inherited: list, parent: int, state: dict, me: int) -> None:
    """A writer worker (number `me`): encode the chunks that arrive on `conn` (sending back each `_Chunk`), write
    their bytes where the parent says (then record the chunk's number in `state["written"][me]`), and on an error
    send it and stop."""
    # Ctrl-C is the parent's to act on (it stops the workers; SIGINT is blocked until this line); a worker dies
    # with its parent (Linux), never writing on
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)
    for other in inherited:  # the parent's ends of the pipes (this worker's and those made before it)
        other.close()
    _WORKER.update(state)
    held: dict[int, list[np.ndarray]] = {}  # chunk number -> its encoded allocations, until they are written
    fd = None
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the parent has let go of this worker
                os._exit(0)
            try:
                if message is None:
                    conn.send(("done", None))
                    return
                if message[0] == "encode":
                    _, k, indices = message
                    chunk, held[k] = _encode_chunk(indices)
                    conn.send(("encoded", chunk))
                else:  # ("write", k, [(allocation number, file offset), ...])
                    _, k, writes = message
                    if fd is None:
                        fd = os.open(_WORKER["path"], os.O_WRONLY)
                    buffers = held.pop(k)
                    for number, offset in writes:
                        pwrite_all(fd, memoryview(buffers[number]), offset)
                    _WORKER["written"][me] = k  # after the pwrites returned: the parent may fsync and record them
            except Exception as exc:  # noqa: BLE001 - the parent raises it; this worker is done
                where = "in a writer worker:\n" + traceback.format_exc()
                exc.add_note(where)
                try:
                    pickle.loads(pickle.dumps(exc))  # some exceptions pickle but cannot be rebuilt
                except Exception:  # noqa: BLE001
                    exc = DptoolError(f"{type(exc).__name__}: {exc}")
                    exc.add_note(where)
                conn.send(("error", exc))
                return
    finally:
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def _interrupt_at_safe_points():
    """Hold Ctrl-C back and raise it where the caller checks (the yielded function), so that it is never raised
    inside a fork hook, which swallows it (the write then went on to the end), or half way through a step.
    A second Ctrl-C is raised at once."""
    parent = os.getpid()
    pending: list[bool] = []

    def on_sigint(signum, frame):
        if os.getpid() != parent:  # a worker between fork and its own handler leaves it to the parent
            return
        if pending:  # a second Ctrl-C does not wait for a safe point (a worker stuck on a slow disk)
            raise KeyboardInterrupt
        pending.append(True)

    def interrupted() -> None:
        if pending:
            raise KeyboardInterrupt

    installed = threading.current_thread() is threading.main_thread()  # signal.signal works there only
    previous = signal.signal(signal.SIGINT, on_sigint) if installed else None
    try:
        yield interrupted
        interrupted()
    finally:
        if installed:  # None: the handler was not set from Python; Python's own is the closest
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


class _Workers:
    """Worker processes, each with a pipe of its own: chunk k goes to worker k % n, so the results come back in
    order with no lock shared between processes (a worker stopped inside `multiprocessing.Pool`'s queue lock
    leaves it held, and `Pool.terminate` can then wait forever)."""

    def __init__(self, n: int, state: dict):
        context = multiprocessing.get_context("fork")  # the dataset reaches the workers by fork, never pickled
        self.conns: list = []
        self.procs: list = []
        # the last chunk each worker has written (its pwrites returned), -1 before its first: shared memory, read by
        # the parent to know which chunks are in the file without a message in the pipes' ordered protocol
        self.written = context.RawArray("q", n)
        self.written[:] = [-1] * n
        state = {**state, "written": self.written}
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # until each worker ignores it
        try:
            try:
                for _ in range(n):
                    mine, theirs = context.Pipe()
                    proc = context.Process(target=_worker_main, daemon=True,
                                           args=(theirs, self.conns + [mine], os.getpid(), state, len(self.procs)))
                    proc.start()
                    theirs.close()
                    self.conns.append(mine)
                    self.procs.append(proc)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a Ctrl-C held back is handled here
        except BaseException:
            self.stop()
            raise

    def encode(self, k: int, indices: np.ndarray) -> None:
        """Send chunk number `k` to its worker to encode."""
        self._send(k % len(self.conns), ("encode", k, indices))

    def write(self, k: int, writes: list[tuple[int, int]]) -> None:
        """Tell chunk `k`'s worker where its allocations go: (allocation number in the chunk, file offset)."""
        self._send(k % len(self.conns), ("write", k, writes))

    def _send(self, w: int, message) -> None:
        try:
            self.conns[w].send(message)
        except OSError:  # the worker is gone: raise the error it sent before it went, if any
            while True:
                self._receive(w, None)

    def _receive(self, w: int, expected: str | None, check: Callable[[], None] = lambda: None):
        try:
            while not self.conns[w].poll(0.2):
                check()
            kind, value = self.conns[w].recv()
        except (EOFError, OSError):  # EOF, or a reset pipe when the worker died with messages unread
            self.procs[w].join(timeout=5)
            raise DptoolError(f"A writer worker stopped unexpectedly (exit code {self.procs[w].exitcode}).") from None
        if kind == "error":
            raise value
        if expected is None:
            return value
        if kind != expected:
            raise DptoolError(f"A writer worker answered {kind!r} where {expected!r} was due.")
        return value

    def written_through(self, k: int) -> bool:
        """Whether every chunk up to number `k` has been written (each worker writes its chunks in order)."""
        n = len(self.conns)
        return all(self.written[w] >= k - (k - w) % n for w in range(min(n, k + 1)))

    def encoded(self, k: int, check: Callable[[], None]) -> _Chunk:
        """Wait for chunk number `k`, calling `check` now and then; a worker's error (its encoding, or an
        earlier write) is raised here."""
        return self._receive(k % len(self.conns), "encoded", check)

    def finish(self, check: Callable[[], None]) -> None:
        """Wait until every worker has written all it was told to, and let them go."""
        for w in range(len(self.conns)):
            self._send(w, None)
        for w in range(len(self.conns)):
            self._receive(w, "done", check)
        self.stop(finished=True)

    def stop(self, finished: bool = False) -> None:
        """Let the workers go: they have finished, or are terminated."""
        for proc in self.procs:
            if not finished:
                proc.terminate()
        for conn, proc in zip(self.conns, self.procs):
            proc.join(timeout=10)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
            conn.close()


def _encode_chunk(indices: np.ndarray) -> tuple[_Chunk, list[np.ndarray]]:
    """Encode `dataset[i]` for each i with FFCV's field encoders into private buffers: the chunk's description
    and its allocations, in order."""
    dataset, fields, page_size = _WORKER["dataset"], _WORKER["fields"], _WORKER["page_size"]
    rows = np.zeros(len(indices), dtype=_WORKER["metadata_type"])
    names = rows.dtype.names  # FFCV's metadata columns are f0, f1, ... in field order
    seeded = any(getattr(f, "write_mode", None) == "proportion" for f in fields.values())
    sizes: list[list[int]] = []
    buffers: list[np.ndarray] = []
    skipped: list[tuple[int, str]] = []
    kept = 0
    for index in indices.tolist():
        try:
            values = dataset[index]
        except SkipSample as exc:
            skipped.append((index, str(exc)))
            continue
        if seeded:  # FFCV draws raw-or-JPEG from NumPy's global generator: one seeded by the sample, not the worker
            np.random.seed([_WORKER["seed"] % 2**32, index])
        mine: list[np.ndarray] = []

        def malloc(size: int, _mine=mine, _index=index):
            if size > page_size:
                raise _SampleTooLarge(_index, size)
            _mine.append(np.empty(size, dtype="<u1"))
            return len(_mine) - 1, _mine[-1]

        for name, field, value in zip(names, fields.values(), values):
            field.encode(rows[name][kept:kept + 1], value, malloc)
        sizes.append([len(b) for b in mine])
        buffers.extend(mine)
        kept += 1
    return _Chunk(rows=rows[:kept], sizes=sizes, skipped=skipped), buffers
