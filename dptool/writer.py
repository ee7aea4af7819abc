"""Write `.beton` files: FFCV's own field encoders run in worker processes, one process lays the pages out.

FFCV's `DatasetWriter` lets each worker take a page when its last one is full and write it where it took it,
so with several workers the samples land on pages in the order the workers happen to finish: two conversions
of the same data differ in bytes, in fingerprint (a scores file made on one is refused for the other) and in
the page-aware quasi-random training order. Its "proportion" mode draws raw-or-JPEG from each forked worker's
copy of one NumPy generator, so which samples are compressed depends on the timing too (FFCV issue #142 is the
file size changing with the worker count).

Here the workers only encode: `field.encode` from FFCV, unchanged, into private buffers, for chunks of samples.
The parent takes the chunks back in order and places every sample as FFCV's `MemoryAllocator` does with one
worker, so the file is byte for byte what `DatasetWriter(num_workers=1)` writes, whatever the number of workers
(tested), and a "proportion" draw is seeded by the sample's index. A sample the dataset cannot give (it raises
`SkipSample`) is left out in the same pass, and a worker's error reaches the caller as itself, where FFCV's
writer waited forever for the worker that had died.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import math
import multiprocessing
import os
import signal
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ._ffcv import import_ffcv
from .errors import DptoolError, InputError

__all__ = ["WriterParams", "SkipSample", "write_beton"]

#: Samples per chunk (one task of a worker), and chunks in flight per worker: this bounds the encoded bytes waiting
#: for the parent (workers x 2 x 32 samples: about 0.5 GB for 16 workers writing 400 px raw images).
_CHUNK = 32
_IN_FLIGHT_PER_WORKER = 2


@dataclass(frozen=True)
class WriterParams:
    """FFCV `RGBImageField` parameters and the file layout (FFCV's ImageNet defaults exposed)."""

    max_resolution: int = 256
    jpeg_quality: int = 90
    compress_probability: float = 0.5  # used by write_mode="proportion"
    write_mode: str = "jpg"  # raw | jpg | proportion (FFCV's "smart" without a threshold is raw)
    shuffle_seed: int | None = 0
    num_workers: int = 0  # 0 = all cores
    page_size: int = 0  # 0 = chosen from max_resolution

    def resolved_workers(self) -> int:
        """Worker processes to use: all cores when 0."""
        return self.num_workers if self.num_workers > 0 else (os.cpu_count() or 1)

    def resolved_page_size(self) -> int:
        """A power of two of at least 2 MiB that holds four raw images at max_resolution."""
        if self.page_size:
            return self.page_size
        need = 4 * self.max_resolution * self.max_resolution * 3
        return max(1 << 21, 1 << math.ceil(math.log2(need)))

    def fields(self) -> dict:
        """The FFCV fields of a dptool file: `image` (RGBImageField with these parameters) and `label`."""
        ffcv_fields = import_ffcv("ffcv.fields")
        return {
            "image": ffcv_fields.RGBImageField(
                write_mode=self.write_mode,
                max_resolution=self.max_resolution,
                compress_probability=self.compress_probability,
                jpeg_quality=self.jpeg_quality,
            ),
            "label": ffcv_fields.IntField(),
        }


class SkipSample(Exception):
    """Raised by a dataset's `__getitem__` for a sample to leave out (an unreadable file); the message says why."""


class _SampleTooLarge(Exception):
    def __init__(self, index: int, size: int):
        super().__init__(index, size)
        self.index, self.size = index, size


@dataclass
class _Chunk:
    """What a worker gives back for one chunk: the kept samples' metadata rows, with each pointer column holding
    the number of the sample's allocation it points to; each kept sample's allocation sizes; their bytes, in order."""

    kept: int
    rows: np.ndarray
    sizes: list[list[int]]
    data: bytes
    skipped: list[tuple[int, str]]


# The worker's state, set once per worker process by `_worker_main` (inherited through fork, never pickled).
_WORKER: dict = {}


def _worker_main(conn, inherited: list, parent: int, state: dict) -> None:
    """A writer worker: encode each chunk that arrives on `conn` and send back the `_Chunk` (or the error)."""
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
    while True:
        try:
            indices = conn.recv()
        except (EOFError, OSError):  # the parent has let go of this worker
            os._exit(0)
        if indices is None:
            return
        try:
            conn.send(("ok", _encode_chunk(indices)))
        except Exception as exc:  # noqa: BLE001 - the parent raises it
            exc.add_note("in a writer worker:\n" + traceback.format_exc())
            try:
                conn.send(("error", exc))
            except Exception:  # noqa: BLE001 - an exception that does not pickle
                conn.send(("error", DptoolError(f"{type(exc).__name__}: {exc}")))


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
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # until each worker ignores it
        try:
            try:
                for _ in range(n):
                    mine, theirs = context.Pipe()
                    proc = context.Process(target=_worker_main, daemon=True,
                                           args=(theirs, self.conns + [mine], os.getpid(), state))
                    proc.start()
                    theirs.close()
                    self.conns.append(mine)
                    self.procs.append(proc)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a Ctrl-C held back is raised here
        except BaseException:
            self.stop()
            raise

    def submit(self, k: int, indices: np.ndarray) -> None:
        """Send chunk number `k` to its worker."""
        self.conns[k % len(self.conns)].send(indices)

    def result(self, k: int) -> _Chunk:
        """Wait for chunk number `k`; a worker's error is raised here."""
        w = k % len(self.conns)
        try:
            kind, value = self.conns[w].recv()
        except EOFError:
            self.procs[w].join(timeout=5)
            raise DptoolError(f"A writer worker stopped unexpectedly (exit code {self.procs[w].exitcode}).") from None
        if kind == "error":
            raise value
        return value

    def stop(self, finished: bool = False) -> None:
        """Let the workers go: ask them to end when all went well, else terminate them."""
        for conn, proc in zip(self.conns, self.procs):
            if finished:
                with contextlib.suppress(OSError):
                    conn.send(None)
            else:
                proc.terminate()
        for conn, proc in zip(self.conns, self.procs):
            proc.join(timeout=10)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
            conn.close()


def _encode_chunk(indices: np.ndarray) -> _Chunk:
    """Encode `dataset[i]` for each i with FFCV's field encoders into private buffers."""
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
    data = b"".join(b.tobytes() for b in buffers)
    return _Chunk(kept=kept, rows=rows[:kept], sizes=sizes, data=data, skipped=skipped)


class _PageLayout:
    """FFCV's `MemoryAllocator` with one worker, fed encoded bytes: fills pages in order and writes each full
    page at its place in the file; `table` gathers the allocation table, one array per chunk."""

    def __init__(self, fp, data_region_start: int, page_size: int):
        self.fp = fp
        self.offset = -(-data_region_start // page_size) * page_size
        self.page_size = page_size
        self.page = -1
        self.used = 0
        self.buffer = np.zeros(page_size, dtype="<u1")
        self.table: list[np.ndarray] = []

    def _next_page(self) -> None:
        self.flush()
        self.page += 1
        self.used = 0
        self.buffer.fill(0)

    def flush(self) -> None:
        """Write the current page (FFCV writes every page whole, the last one too)."""
        if self.page >= 0 and self.used:
            self.fp.seek(self.offset + self.page * self.page_size)
            self.fp.write(self.buffer.data)

    def place(self, sample: int, sizes: Sequence[int], data: memoryview) -> list[int]:
        """File addresses of one sample's allocations; its bytes go into the page buffer."""
        for _attempt in range(2):
            ptrs: list[int] = []
            pos = 0
            for size in sizes:
                if size > self.page_size - self.used or self.page < 0:
                    self._next_page()
                    if ptrs:  # FFCV gives up the part already placed (its bytes stay in the page) and starts over
                        break
                ptrs.append(self.offset + self.page * self.page_size + self.used)
                self.buffer[self.used:self.used + size] = np.frombuffer(data[pos:pos + size], dtype="<u1")
                self.used += size
                pos += size
            else:
                return ptrs
        raise InputError(f"Sample {sample} does not fit in one page of {self.page_size} bytes; use a larger "
                         "--page-size.")


    def place_chunk(self, chunk: _Chunk, first: int, pointers: list[tuple[str, str]]) -> None:
        """Place a chunk's samples, numbered from `first`, and point their metadata rows at their bytes."""
        data = memoryview(chunk.data)
        pos = 0
        table = []
        for i, sizes in enumerate(chunk.sizes):
            ptrs = self.place(first + i, sizes, data[pos:])
            pos += sum(sizes)
            table.extend((first + i, p, s) for p, s in zip(ptrs, sizes))
            for name, member in pointers:
                column = chunk.rows[name][member]
                column[i] = ptrs[int(column[i])]
        self.table.append(np.array(table, dtype=_alloc_type()).reshape(-1))


def _alloc_type() -> np.dtype:
    return import_ffcv("ffcv.types").ALLOC_TABLE_TYPE


def _head(fields: dict, num_samples: int, page_size: int) -> tuple[np.ndarray, bytes]:
    """FFCV's header (without the allocation table's place yet) and field descriptors, as its writer makes them."""
    types = import_ffcv("ffcv.types")
    header = np.zeros(1, dtype=types.HeaderType)[0]
    header["version"] = types.CURRENT_VERSION
    header["num_samples"] = num_samples
    header["num_fields"] = len(fields)
    header["page_size"] = page_size
    descriptors = np.zeros(len(fields), dtype=types.FieldDescType)
    type_ids = {v: k for k, v in types.TYPE_ID_HANDLER.items()}
    max_len = descriptors[0]["name"].shape[0]
    for i, (name, field) in enumerate(fields.items()):
        encoded = np.frombuffer(name.encode("ascii"), dtype="<u1")[:max_len]
        descriptors[i]["type_id"] = type_ids.get(type(field), 255)
        descriptors[i]["name"][:len(encoded)] = encoded
        descriptors[i]["arguments"][:] = field.to_binary()[0]
    return header, descriptors.tobytes()


def _pointer_columns(fields: dict, metadata_type: np.dtype) -> list[tuple[str, str]]:
    """(field column, its member) of every metadata entry that holds a pointer into the data region."""
    return [(name, member) for name, field in zip(metadata_type.names, fields.values())
            for member in ("data_ptr", "ptr") if member in (field.metadata_type.names or ())]


def write_beton(
    dataset,
    path: str | os.PathLike,
    indices: np.ndarray,
    params: WriterParams,
    *,
    progress: bool = False,
    on_skip: Callable[[int, str], None] | None = None,
) -> dict[int, str]:
    """Write `dataset[i]` (an (image, label) pair) for i in `indices`, in that order, to `path`.

    The bytes depend on the data and `params` only, not on `params.num_workers`. A sample whose `__getitem__`
    raises `SkipSample` is left out; `on_skip(index, reason)` hears of it as soon as its turn comes (it may raise
    to stop the write). Returns the skipped indices with their reasons."""
    from tqdm import tqdm

    indices = np.asarray(indices, dtype=np.int64)
    fields = params.fields()
    page_size = params.resolved_page_size()
    metadata_type = import_ffcv("ffcv.types").get_metadata_type(list(fields.values()))
    header, descriptors = _head(fields, len(indices), page_size)
    metadata_start = header.nbytes + len(descriptors)
    metadata = np.zeros(len(indices), dtype=metadata_type)
    pointers = _pointer_columns(fields, metadata_type)
    skipped: dict[int, str] = {}
    n_workers = max(1, min(params.resolved_workers(), len(indices)))
    size = max(1, min(_CHUNK, math.ceil(len(indices) / n_workers)))
    num_chunks = -(-len(indices) // size)
    chunks = (indices[i:i + size] for i in range(0, len(indices), size))
    seed = 0 if params.shuffle_seed is None else int(params.shuffle_seed)
    state = dict(dataset=dataset, fields=fields, metadata_type=metadata_type, page_size=page_size, seed=seed)
    with open(path, "wb") as fp, tqdm(total=len(indices), desc="convert", unit="img", disable=not progress) as bar:
        fp.write(header.tobytes())
        fp.write(descriptors)
        layout = _PageLayout(fp, metadata_start + metadata.nbytes, page_size)
        kept = 0
        workers = None
        finished = False
        with _interrupt_at_safe_points() as interrupted:
            try:
                workers = _Workers(n_workers, state)
                for k, chunk in enumerate(itertools.islice(chunks, n_workers * _IN_FLIGHT_PER_WORKER)):
                    workers.submit(k, chunk)
                for k in range(num_chunks):
                    interrupted()
                    try:
                        result = workers.result(k)
                    except _SampleTooLarge as exc:
                        raise InputError(f"Sample {exc.index} needs {exc.size} bytes, more than a page of {page_size}; "
                                         "use a larger --page-size or a smaller --max-res.") from None
                    if k + n_workers * _IN_FLIGHT_PER_WORKER < num_chunks:
                        workers.submit(k + n_workers * _IN_FLIGHT_PER_WORKER, next(chunks))
                    for index, reason in result.skipped:
                        skipped[index] = reason
                        if on_skip is not None:
                            on_skip(index, reason)
                    layout.place_chunk(result, kept, pointers)
                    metadata[kept:kept + result.kept] = result.rows
                    kept += result.kept
                    bar.update(result.kept + len(result.skipped))
                finished = True
            finally:
                if workers is not None:
                    workers.stop(finished)
        layout.flush()
        if kept == 0:
            return skipped
        # metadata rows (the kept ones; the rest of the room reserved for skipped samples stays zero), the
        # allocation table at the end, then the header that points to it
        fp.seek(metadata_start)
        fp.write(metadata[:kept].tobytes())
        fp.seek(0, os.SEEK_END)
        header["alloc_table_ptr"] = fp.tell()
        header["num_samples"] = kept
        table = np.concatenate(layout.table) if layout.table else np.zeros(0, dtype=_alloc_type())
        fp.write(table.tobytes())
        fp.seek(0)
        fp.write(header.tobytes())
    return skipped
