"""Write `.beton` files: FFCV's own field encoders run in worker processes, one process lays the pages out.

FFCV's `DatasetWriter` lets each worker take a page when its last one is full and write it where it took it,
so with several workers the samples land on pages in the order the workers happen to finish: two conversions
of the same data differ in bytes, in fingerprint (a scores file made on one is refused for the other) and in
the page-aware quasi-random training order. Its "proportion" mode draws raw-or-JPEG from each forked worker's
copy of one NumPy generator, so which samples are compressed depends on the timing too (FFCV issue #142 is the
file size changing with the worker count).

Here the workers run FFCV's `field.encode`, unchanged, into private buffers, a chunk of samples at a time, and
send the parent only the sizes. The parent takes the chunks in order and places every sample as FFCV's
`MemoryAllocator` does with one worker; the worker then writes its bytes where they were placed. So the file is
byte for byte what `DatasetWriter(num_workers=1)` writes in the raw, jpg and smart modes, whatever the number of
workers (tested), and the parent handles no image bytes (it would cap the rate: about 0.3 ms per 196 kB raw image
when it copied them). A "proportion" draw is seeded by the sample's index (so it differs from any of FFCV's).
A sample the dataset cannot give (it raises `SkipSample`) is left out in the same pass, and a worker's error
reaches the caller as itself, where FFCV's writer waited forever for the worker that had died.

With `Checkpoints`, the parent records now and then how far the file is durably written (each worker marks in
shared memory the last chunk whose bytes it has written; the parent fsyncs the file and saves the page layout, the
allocation table and the skipped samples up to such a chunk, in a thread), and a later call continues from such a
record: the layout is sequential in sample order, so the bytes are those of an uninterrupted write. The record
itself (`Checkpoints`, `read_checkpoint`) is kept and read by `dptool.writer_progress`, and the worker processes
(`SkipSample`, which a dataset raises there, included) are `dptool.writer_workers`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ._ffcv import import_ffcv
from .atomic import pwrite_all
from .errors import InputError
from .writer_progress import Checkpoints, _alloc_type, _Recorder, _save_checkpoint
from .writer_workers import SkipSample, _Chunk, _interrupt_at_safe_points, _SampleTooLarge, _Workers

__all__ = ["WriterParams", "SkipSample", "write_beton", "MAX_RESOLUTION"]

#: The largest max_resolution whose page (four raw images, a power of two) fits FFCV's header: pages are at most
#: 2 GiB there (a uint32), so 4 x 3 x r^2 <= 2^31.
MAX_RESOLUTION = math.isqrt((1 << 31) // 12)

#: Samples per chunk (one task of a worker), and chunks in flight per worker: this bounds the encoded bytes a worker
#: holds until it is told where to write them (2 x 32 samples: 31 MB for 400 px raw images).
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
    num_workers: int = 0  # 0 = every CPU the process may run on
    page_size: int = 0  # 0 = chosen from max_resolution

    def resolved_workers(self) -> int:
        """Worker processes to use: every CPU the process may run on when 0 (`dptool.loaders.usable_cpus`)."""
        from .loaders import usable_cpus

        return self.num_workers if self.num_workers > 0 else usable_cpus()

    def resolved_page_size(self) -> int:
        """A power of two of at least 2 MiB that holds four raw images at max_resolution (or the one given)."""
        if self.page_size:
            if self.page_size & (self.page_size - 1) or not 1 << 21 <= self.page_size < 1 << 32:
                raise InputError(f"The page size must be a power of two from 2 MiB up to 2 GiB, got {self.page_size}.")
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


class _PageLayout:
    """FFCV's `MemoryAllocator` with one worker, fed allocation sizes: fills pages in order and says where each
    allocation goes; `table` gathers the allocation table, one array per chunk, and `end` is where the data ends
    (FFCV writes whole pages, the last one too; the unused tail of a page is zeros)."""

    def __init__(self, data_region_start: int, page_size: int):
        self.offset = -(-data_region_start // page_size) * page_size
        self.page_size = page_size
        self.page = -1
        self.used = 0
        self.table: list[np.ndarray] = []

    @property
    def end(self) -> int:
        """File offset where the data region ends."""
        return self.offset + (self.page + 1) * self.page_size

    @property
    def position(self) -> int:
        """File offset where the next allocation would go if it fits: every byte placed so far lies before it."""
        return self.offset + max(self.page, 0) * self.page_size + self.used

    def place(self, sample: int, sizes: Sequence[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """File offsets of one sample's allocations, and the (allocation number, offset) of any part FFCV placed
        and gave up (a later allocation of the sample did not fit in the page; its bytes stay there)."""
        abandoned: list[tuple[int, int]] = []
        for _attempt in range(2):
            ptrs: list[int] = []
            for size in sizes:
                if size > self.page_size - self.used or self.page < 0:
                    self.page += 1
                    self.used = 0
                    if ptrs:  # FFCV starts the sample over on the fresh page
                        abandoned.extend(enumerate(ptrs))
                        break
                ptrs.append(self.offset + self.page * self.page_size + self.used)
                self.used += size
            else:
                return ptrs, abandoned
        raise InputError(f"The sample written at position {sample} does not fit in one page of {self.page_size} "
                         "bytes; use a smaller --max-res or a larger page size.")

    def place_chunk(self, chunk: _Chunk, first: int, pointers: list[tuple[str, str]]) -> list[tuple[int, int]]:
        """Place a chunk's samples, numbered from `first`, point their metadata rows at their bytes, and return
        what the worker must write: (allocation number in the chunk, file offset)."""
        writes: list[tuple[int, int]] = []
        table = []
        number = 0  # of the sample's first allocation, counted over the chunk
        for i, sizes in enumerate(chunk.sizes):
            ptrs, abandoned = self.place(first + i, sizes)
            writes.extend((number + j, ptr) for j, ptr in abandoned)
            writes.extend((number + j, ptr) for j, ptr in enumerate(ptrs))
            table.extend((first + i, ptr, size) for ptr, size in zip(ptrs, sizes))
            number += len(sizes)
            for name, member in pointers:
                column = chunk.rows[name][member]
                column[i] = ptrs[int(column[i])]
        self.table.append(np.array(table, dtype=_alloc_type()).reshape(-1))
        return writes


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
    checkpoints: Checkpoints | None = None,
) -> dict[int, str]:
    """Write `dataset[i]` (an (image, label) pair) for i in `indices`, in that order, to `path`.

    The bytes depend on the data and `params` only, not on `params.num_workers`. A sample whose `__getitem__`
    raises `SkipSample` is left out; `on_skip(index, reason)` hears of it as soon as its turn comes (it may raise
    to stop the write). `checkpoints`: record the progress as it goes, or continue a write recorded there. Until
    the write completes, the file's header is left zero, so that no reader takes it for a finished file. Returns
    the skipped indices with their reasons."""
    from tqdm import tqdm

    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        raise InputError("Nothing to write: no samples were given.")
    fields = params.fields()
    page_size = params.resolved_page_size()
    metadata_type = import_ffcv("ffcv.types").get_metadata_type(list(fields.values()))
    header, descriptors = _head(fields, len(indices), page_size)
    metadata_start = header.nbytes + len(descriptors)
    row_bytes = metadata_type.itemsize
    pointers = _pointer_columns(fields, metadata_type)
    layout = _PageLayout(metadata_start + row_bytes * len(indices), page_size)
    resume = checkpoints.resume_from if checkpoints is not None else None
    skipped: dict[int, str] = {}
    start = kept = 0
    if resume is not None:
        if resume["identity"] != checkpoints.identity or resume["num_samples"] != len(indices) \
                or resume["offset"] != layout.offset:
            raise InputError(f"The progress record {checkpoints.state_path} is of another conversion; pass --force "
                             "without --resume to start over.")
        start, kept, skipped = resume["done"], resume["kept"], dict(resume["skipped"])
        layout.page, layout.used = resume["page"], resume["used"]
        layout.table = [resume["table"]]
    remaining = indices[start:]
    n_workers = max(1, min(params.resolved_workers(), max(len(remaining), 1)))
    size = max(1, min(_CHUNK, math.ceil(len(remaining) / n_workers)))
    num_chunks = -(-len(remaining) // size)
    chunks = (remaining[i:i + size] for i in range(0, len(remaining), size))
    seed = 0 if params.shuffle_seed is None else int(params.shuffle_seed)
    state = dict(dataset=dataset, fields=fields, metadata_type=metadata_type, page_size=page_size, seed=seed,
                 path=os.fspath(path))
    in_flight = n_workers * _IN_FLIGHT_PER_WORKER
    with open(path, "r+b" if resume is not None else "wb", buffering=0) as fp, \
            tqdm(total=len(indices), initial=start, desc="convert", unit="img", disable=not progress) as bar:
        fd = fp.fileno()
        fp.write(bytes(header.nbytes))  # the header last, when the file is complete
        fp.write(descriptors)
        if resume is not None:  # what was written after the record may be anything: cut back to where it ends
            if os.fstat(fd).st_size < layout.position:
                raise InputError(f"{path} is shorter than its progress record {checkpoints.state_path} says it was "
                                 "written; pass --force without --resume to start the conversion over.")
            fp.truncate(layout.position)
            pwrite_all(fd, memoryview(bytes(row_bytes * (len(indices) - kept))), metadata_start + row_bytes * kept)
        done = start
        skip_log = list(skipped.items())  # in the order met, so that a record takes those up to its chunk
        # (chunk number, where the write stood after it): the last one known written, and those after it
        history: list[tuple[int, dict]] = []
        recorded = -1  # the last chunk recorded
        last_record = began = time.monotonic()
        recorder = _Recorder(checkpoints, fd, len(indices)) if checkpoints is not None else None

        def record(sync: bool) -> None:
            """Record the latest state whose chunks are all written, if newer than the last record."""
            nonlocal recorded, last_record
            while len(history) > 1 and workers.written_through(history[1][0]):
                history.pop(0)
            if not history or history[0][0] <= recorded or not workers.written_through(history[0][0]):
                return
            k, snap = history[0]
            snap = {**snap, "skipped": dict(skip_log[:snap["skips"]])}
            if sync:
                _save_checkpoint(checkpoints, fd, snap, layout.table[:snap["chunks"]], len(indices))
            else:
                recorder.start(snap, layout.table[:snap["chunks"]])
            recorded, last_record = k, time.monotonic()

        workers = None
        finished = False
        with _interrupt_at_safe_points() as interrupted:
            try:
                if num_chunks:
                    workers = _Workers(n_workers, state)
                    for k, chunk in enumerate(itertools.islice(chunks, in_flight)):
                        workers.encode(k, chunk)
                for k in range(num_chunks):
                    interrupted()
                    try:
                        result = workers.encoded(k, interrupted)
                    except _SampleTooLarge as exc:
                        raise InputError(f"Sample {exc.index} needs {exc.size} bytes, more than a page of "
                                         f"{page_size}; use a smaller --max-res or a larger page size.") from None
                    for index, reason in result.skipped:
                        skipped[index] = reason
                        skip_log.append((index, reason))
                        if on_skip is not None:
                            on_skip(index, reason)
                    workers.write(k, layout.place_chunk(result, kept, pointers))
                    if k + in_flight < num_chunks:
                        workers.encode(k + in_flight, next(chunks))
                    pwrite_all(fd, memoryview(result.rows.tobytes()), metadata_start + row_bytes * kept)
                    kept += len(result.rows)
                    done += len(result.rows) + len(result.skipped)
                    bar.update(len(result.rows) + len(result.skipped))
                    if checkpoints is None:
                        continue
                    history.append((k, dict(done=done, kept=kept, offset=layout.offset, page=layout.page,
                                            used=layout.used, chunks=len(layout.table), skips=len(skip_log))))
                    if time.monotonic() - last_record >= checkpoints.every_seconds and not recorder.busy():
                        record(sync=False)
                if workers is not None:
                    workers.finish(interrupted)
                finished = True
            finally:
                if workers is not None and not finished:
                    workers.stop()
                if recorder is not None:  # never while the file is closed under it
                    recorder.join(raise_error=finished)
                    # stopped once a record was due: record what the workers wrote before they stopped (best
                    # effort: the last record stands if this fails), so that a resume loses no finished work; one
                    # stopped sooner (a wrong command stopped at once) leaves nothing, as other outputs do
                    due = recorded >= 0 or resume is not None or time.monotonic() - began >= checkpoints.every_seconds
                    if not finished and workers is not None and due:
                        with contextlib.suppress(Exception):
                            record(sync=True)
        if kept == 0:
            first = next(iter(skipped.values()), "")
            raise InputError(f"None of the {len(indices)} samples could be read (the first: {first}).")
        if checkpoints is not None and done > start:  # all written: what remains is quick, and redone on a resume
            _save_checkpoint(checkpoints, fd, dict(done=done, kept=kept, offset=layout.offset, page=layout.page,
                                                   used=layout.used, chunks=len(layout.table), skipped=skipped),
                             layout.table, len(indices))
        # the metadata rows are in place (the rest of the room reserved for skipped samples stays zero); the data
        # region to its last whole page, the allocation table after it, then the header that points to it
        fp.truncate(layout.end)
        fp.seek(layout.end)
        header["alloc_table_ptr"] = layout.end
        header["num_samples"] = kept
        table = np.concatenate(layout.table) if layout.table else np.zeros(0, dtype=_alloc_type())
        fp.write(table.tobytes())
        fp.seek(0)
        fp.write(header.tobytes())
    return skipped
