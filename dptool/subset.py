"""Write a subset of a `.beton`'s samples to new `.beton` files by copying their stored bytes: no decode.

An FFCV file is: header, field descriptors, one metadata row per sample (an image row holds mode, width, height
and `data_ptr`, the absolute file offset of its bytes), zero padding up to a page boundary, the data region in
pages of `page_size` bytes (a sample's allocations never straddle pages: FFCV's process-cache loader reads whole
pages, page = address >> log2(page_size)), and the allocation table (sample_id, ptr, size) at the end.

A subset keeps the metadata rows in the order given (the source's shuffled order for pruning) with rewritten
pointers, and packs the kept samples' byte ranges into fresh pages in source *file* order, so the source is read
front to back, only where kept samples are (one `copy_file_range` per run of adjacent kept samples: the bytes
stay in the kernel), and every output is written front to back. Several outputs (several ratios) advance through
the source together, so each kept byte comes from disk once. Memory is bounded by the metadata and allocation
tables and the plans built from them, not by the file size: `prune` grew by about 150-270 bytes per source sample
from 25k to 400k samples (`benchmarks/bench_scale.py`), about 0.5 GB at ImageNet's 1.28M.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_output, check_output_path, output_group, pwrite_all, write_error
from .beton import Beton, open_beton
from .beton_format import _ALLOC
from .errors import DptoolError, InputError

__all__ = ["SubsetResult", "write_subset", "write_subsets", "plan_subsets", "sample_extents"]

log = logging.getLogger(__name__)

# FFCV type id -> the part of its metadata row that is a pointer into the data region ("" = the row itself).
_POINTER_FIELDS = {2: "data_ptr", 3: "ptr", 4: "", 5: "ptr", 6: ""}
_MIB = 1 << 20


@dataclass
class SubsetResult:
    """One written subset: samples, pages, sizes; `seconds` and `bytes_read` are those of the whole pass."""

    output: str
    num_samples: int
    num_pages: int
    bytes: int
    data_bytes: int
    bytes_read: int  # source bytes read by the whole pass: a sample kept by several outputs counts once
    seconds: float

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return asdict(self)


@dataclass
class _Plan:
    """Everything about one output that is known before a byte of sample data is copied."""

    dst: Path
    head: bytes  # header + field descriptors + metadata rows + zero padding up to data_start
    alloc: np.ndarray  # (M',) new allocation table, sorted by ptr
    data_start: int
    data_end: int
    num_samples: int
    data_bytes: int
    # copy items in source file order: (K',) source start, size, destination start (int64), sizes > 0 only
    src: np.ndarray
    size: np.ndarray
    dst_ptr: np.ndarray


def _align(x: int, page: int) -> int:
    return -(-x // page) * page


def sample_extents(beton: Beton) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte range of every sample's stored data: (N,) int64 start and stop (stop = start = 0 without data), and
    (N,) int64 allocation count. Refuses a file whose sample crosses a page boundary (FFCV never writes one)."""
    n, table = beton.num_samples, beton.alloc_table
    sid = table["sample_id"].astype(np.int64)
    ptr = table["ptr"].astype(np.int64)
    end = ptr + table["size"].astype(np.int64)
    if len(sid) and (sid.min() < 0 or sid.max() >= n):
        raise InputError(f"{beton.path} is damaged (allocation table names sample {int(sid.max())} of {n}).")
    count = np.bincount(sid, minlength=n).astype(np.int64)
    if len(sid) == 0 or count.max() <= 1:  # the usual case: one allocation (the image) per sample
        start, stop = np.zeros(n, np.int64), np.zeros(n, np.int64)
        start[sid], stop[sid] = ptr, end
    else:
        start, stop = np.full(n, np.iinfo(np.int64).max), np.zeros(n, np.int64)
        np.minimum.at(start, sid, ptr)
        np.maximum.at(stop, sid, end)
        start[count == 0] = 0
    has = stop > start
    ps = beton.page_size
    bad = np.flatnonzero(has & ((start // ps) != ((stop - 1) // ps)))
    if len(bad):
        raise InputError(f"{beton.path}: sample {int(bad[0])} crosses a page boundary, which FFCV's "
                         "DatasetWriter never writes; convert the dataset again.")
    if has.any() and (start[has].min() < beton.data_start or stop.max() > int(beton.header["alloc_table_ptr"])):
        raise InputError(f"{beton.path} is damaged (sample data outside the data region).")
    return start, stop, count


def _plan(beton: Beton, dst: Path, indices: np.ndarray, extents, order_by_sample: np.ndarray) -> _Plan:
    """Lay out one output: metadata with rewritten pointers, page packing in source file order, new table."""
    start, stop, count = extents
    ps, k = beton.page_size, len(indices)
    size = stop[indices] - start[indices]
    phys = np.argsort(start[indices], kind="stable")  # source file order
    s = size[phys]
    cs = np.cumsum(s)
    cs_excl = cs - s
    meta_type = beton.metadata.dtype
    head_len = beton.header.dtype.itemsize + beton.field_descriptors.nbytes + k * meta_type.itemsize
    data_start = _align(head_len, ps)
    new = np.empty(k, np.int64)
    pos, page = (0, 0) if cs[-1] > 0 else (k, 0)  # no data at all (numbers-only fields): no page
    new[pos:] = data_start
    while pos < k:  # one iteration per output page: fill it with as many samples as fit, in order
        base = int(cs_excl[pos])
        stop_pos = max(int(np.searchsorted(cs, base + ps, side="right")), pos + 1)
        new[pos:stop_pos] = data_start + page * ps + (cs_excl[pos:stop_pos] - base)
        pos, page = stop_pos, page + 1
    data_end = data_start + page * ps
    dst_ptr = np.empty(k, np.int64)
    dst_ptr[phys] = new
    delta = dst_ptr - start[indices]  # per kept sample, in output order

    # Copy whole rows as bytes: a structured copy does not keep the padding bytes, and outputs must not depend
    # on uninitialised memory (one pass over several outputs must equal separate runs, byte for byte).
    rows = np.ascontiguousarray(beton.metadata).view(np.uint8).reshape(beton.num_samples, meta_type.itemsize)
    meta = rows[indices].view(meta_type).reshape(k)
    has = count[indices] > 0
    for j, desc in enumerate(beton.field_descriptors):
        sub = _POINTER_FIELDS.get(int(desc["type_id"]))
        if sub is not None:
            col = meta[f"f{j}"] if sub == "" else meta[f"f{j}"][sub]  # a view into `meta`
            col[has] = (col[has].astype(np.int64) + delta[has]).astype(np.uint64)

    c = count[indices]
    offsets = np.concatenate([[0], np.cumsum(count)])
    total = int(c.sum())
    first = np.repeat(offsets[indices] - (np.cumsum(c) - c), c) + np.arange(total)
    entries = order_by_sample[first]
    table = beton.alloc_table
    alloc = np.empty(total, _ALLOC)
    alloc["sample_id"] = np.repeat(np.arange(k, dtype=np.uint64), c)
    alloc["ptr"] = (table["ptr"][entries].astype(np.int64) + np.repeat(delta, c)).astype(np.uint64)
    alloc["size"] = table["size"][entries]
    alloc = alloc[np.argsort(alloc["ptr"], kind="stable")]

    # A copy through bytes: np.array() of the header (a void scalar that views the Beton's array) would share it.
    header = np.frombuffer(bytearray(beton.header.tobytes()), dtype=beton.header.dtype)
    header["num_samples"] = k
    header["alloc_table_ptr"] = data_end
    head = b"".join([header.tobytes(), np.ascontiguousarray(beton.field_descriptors).tobytes(), meta.tobytes()])
    head += bytes(data_start - len(head))
    nz = s > 0
    return _Plan(dst=dst, head=head, alloc=alloc, data_start=data_start, data_end=data_end, num_samples=k,
                 data_bytes=int(cs[-1]), src=start[indices][phys][nz], size=s[nz], dst_ptr=new[nz])


_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM, errno.EBADF}


class _Writer:
    """Streams one output front to back: head, the data region page by page, then the allocation table.

    Each run of samples that are contiguous in the source and in the output is copied with one
    `os.copy_file_range` (in the kernel: no trip through user memory; a reflink where the file system offers
    one); where that is unavailable (another file system, old kernel) with `pread` + `pwrite` through a small
    buffer. The padding at page ends is written as zeros. The source is read only where kept samples are.
    """

    def __init__(self, plan: _Plan, tmp: Path, fd_in: int, page_size: int, src_name="the source file"):
        self.plan, self.fd_in, self.src_name = plan, fd_in, src_name
        self.zeros = bytes(page_size)
        self.scratch: np.ndarray | None = None  # set when the kernel cannot copy between these files
        self.pos = plan.data_start  # bytes of the output written so far
        self.next = self.prefetched = 0  # next run to copy, to prefetch
        src, size, dst = plan.src, plan.size, plan.dst_ptr
        brk = np.ones(len(src), bool)
        brk[1:] = (src[1:] != src[:-1] + size[:-1]) | (dst[1:] != dst[:-1] + size[:-1])
        first = np.flatnonzero(brk)
        last = np.concatenate([first[1:], [len(src)]])[:len(first)] - 1
        self.run_src, self.run_dst = src[first], dst[first]
        self.run_len = dst[last] + size[last] - dst[first]
        self.fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        pwrite_all(self.fd, memoryview(plan.head), 0)

    @property
    def num_runs(self) -> int:
        """Number of copies this output needs."""
        return len(self.run_src)

    def _zero_to(self, end: int) -> None:
        while self.pos < end:
            n = min(len(self.zeros), end - self.pos)
            pwrite_all(self.fd, memoryview(self.zeros)[:n], self.pos)
            self.pos += n

    def _copy(self, src: int, dst: int, n: int) -> None:
        if self.scratch is None:
            try:
                while n > 0:
                    k = os.copy_file_range(self.fd_in, self.fd, n, src, dst)
                    if k == 0:
                        raise _ended_early(self.src_name, src)
                    src, dst, n = src + k, dst + k, n - k
                return
            except (AttributeError, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno not in _NO_KERNEL_COPY:
                    raise
                log.debug("copy_file_range unavailable (%s); copying through user memory", exc)
                self.scratch = np.empty(len(self.zeros), np.uint8)
        while n > 0:
            k = min(n, len(self.scratch))
            pread_into(self.fd_in, self.scratch[:k], src, self.src_name)
            pwrite_all(self.fd, memoryview(self.scratch[:k]), dst)
            src, dst, n = src + k, dst + k, n - k

    def prefetch_until(self, src_end: int) -> None:
        """Ask the kernel to start reading the runs that start before `src_end` (async; no-op where unsupported)."""
        stop = int(np.searchsorted(self.run_src, src_end, side="left"))
        a, self.prefetched = self.prefetched, max(stop, self.prefetched)
        with contextlib.suppress(AttributeError, OSError):
            for s, n in zip(self.run_src[a:stop].tolist(), self.run_len[a:stop].tolist()):
                os.posix_fadvise(self.fd_in, s, n, os.POSIX_FADV_WILLNEED)

    def copy_until(self, src_end: int) -> None:
        """Copy the runs that start before source offset `src_end`, in output order."""
        stop = int(np.searchsorted(self.run_src, src_end, side="left"))
        a, self.next = self.next, max(stop, self.next)
        for s, d, n in zip(self.run_src[a:stop].tolist(), self.run_dst[a:stop].tolist(),
                           self.run_len[a:stop].tolist()):
            self._zero_to(d)  # page-end padding
            _copy_run(self, s, d, n)
            self.pos = d + n

    def finish(self) -> None:
        """Write the last page's padding and the allocation table, then close."""
        self._zero_to(self.plan.data_end)
        pwrite_all(self.fd, memoryview(self.plan.alloc.tobytes()), self.plan.data_end)
        if os.fstat(self.fd).st_size != self.plan.data_end + self.plan.alloc.nbytes:
            raise DptoolError(f"internal error: {self.plan.dst} has the wrong size.")
        self.close()

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _copy_run(writer: _Writer, src: int, dst: int, n: int) -> None:
    """Copy one run (module level so that tests can interrupt a write here)."""
    writer._copy(src, dst, n)


def _bytes_read(plans: list[_Plan]) -> int:
    """Source bytes the outputs copy, each byte once: the size of the union of their source ranges."""
    src = np.concatenate([p.src for p in plans])
    if len(src) == 0:
        return 0
    order = np.argsort(src, kind="stable")
    lo = src[order]
    hi = lo + np.concatenate([p.size for p in plans])[order]
    reach = np.concatenate([[lo[0]], np.maximum.accumulate(hi)[:-1]])  # end of the ranges before each one
    return int(np.clip(hi - np.maximum(lo, reach), 0, None).sum())


def _ended_early(name, offset: int) -> InputError:
    """The source was cut short while it was read (a copy over it, a truncation): name it."""
    return InputError(f"{name} ended at byte {offset} while it was read: it was truncated or replaced in place "
                      "during the run; nothing was written.")


def pread_into(fd: int, buf: np.ndarray, offset: int, name="the source file") -> None:
    """Fill `buf` with the bytes of `fd` from `offset` on; an InputError naming `name` if the file ends first."""
    view, done = memoryview(buf), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise _ended_early(name, offset + done)
        done += n


def write_subsets(src: Beton | str | os.PathLike, outputs: Mapping[str | os.PathLike, np.ndarray], *,
                  force: bool = False, progress: bool = False, step: int = 64 * _MIB,
                  finalize: Callable[[Path, Path], None] | None = None) -> list[SubsetResult]:
    """Write several subsets of `src` in one pass over it, by copying stored sample bytes (no decode).

    Parameters
    ----------
    src : the source `.beton` (opened read-only).
    outputs : {output path: (K,) int sample indices of `src`, in the order wanted in the output}; unique indices.
    force : overwrite existing outputs.
    progress : draw a progress bar (source bytes) on stderr.
    step : the outputs advance together through the source in steps of this many bytes (at least a page), so
        that a sample kept by several outputs is read from disk once and then from the page cache.
    finalize : called as ``finalize(final_path, written_path)`` once every output is written, before any is
        renamed into place (to write its sidecar, which is renamed right after it; `written_path` is the complete
        temporary file to read).

    Returns
    -------
    One `SubsetResult` per output, in the order of `outputs`.
    """
    beton = src if isinstance(src, Beton) else open_beton(src, require_label=False)
    if not outputs:
        raise InputError("No outputs to write.")
    dsts = [check_output_path(d, force=force, inputs=(beton.path,)) for d in outputs]
    if len({os.path.abspath(d) for d in dsts}) != len(dsts):
        raise InputError("Two outputs have the same path; give each subset its own file.")
    started = time.perf_counter()
    plans = _plans(beton, dsts, outputs.values())
    step = max(beton.page_size, int(step))

    with output_group():  # all outputs (and what `finalize` writes) renamed into place together, or none
        with contextlib.ExitStack() as stack:
            tmps = [stack.enter_context(atomic_output(p.dst)) for p in plans]
            _copy_pass(beton, plans, tmps, step, progress)
        if finalize is not None:
            for p, tmp in zip(plans, tmps):
                finalize(p.dst, tmp)
    return _results(beton, plans, time.perf_counter() - started)


def plan_subsets(src: Beton | str | os.PathLike,
                 outputs: Mapping[str | os.PathLike, np.ndarray]) -> list[SubsetResult]:
    """What `write_subsets(src, outputs)` would write, laid out from the metadata and allocation tables alone: no
    sample byte is read and nothing is written (`seconds` is 0). The indices and the source's layout are checked
    as `write_subsets` checks them; the outputs are not (see `dptool.sidecar.check_beton_output`)."""
    beton = src if isinstance(src, Beton) else open_beton(src, require_label=False)
    if not outputs:
        raise InputError("No outputs to write.")
    return _results(beton, _plans(beton, [Path(d) for d in outputs], outputs.values()), 0.0)


def _plans(beton: Beton, dsts: list[Path], indices) -> list[_Plan]:
    """One `_plan` per output (`dsts` and `indices` in the same order), the indices checked first."""
    extents = sample_extents(beton)
    order_by_sample = np.argsort(beton.alloc_table["sample_id"], kind="stable")
    return [_plan(beton, dst, _checked_indices(idx, dst, beton.num_samples), extents, order_by_sample)
            for dst, idx in zip(dsts, indices)]


def _results(beton: Beton, plans: list[_Plan], seconds: float) -> list[SubsetResult]:
    """The `SubsetResult` of each planned output: its sizes, and the pass's bytes read and `seconds`."""
    bytes_read = _bytes_read(plans)
    return [SubsetResult(output=str(p.dst), num_samples=p.num_samples,
                         num_pages=(p.data_end - p.data_start) // beton.page_size,
                         bytes=p.data_end + p.alloc.nbytes, data_bytes=p.data_bytes, bytes_read=bytes_read,
                         seconds=seconds) for p in plans]


def _checked_indices(idx, dst: Path, num_samples: int) -> np.ndarray:
    """`idx` as (K,) int64 sample indices for the output `dst`: 1-D integers, not empty, in range, unique."""
    idx = np.asarray(idx)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise InputError(f"Indices for {dst} must be a 1-D array of integers, got {idx.dtype} {idx.shape}.")
    idx = idx.astype(np.int64)
    if len(idx) == 0:
        raise InputError(f"The subset for {dst} holds no samples; nothing to write.")
    if idx.min() < 0 or idx.max() >= num_samples:
        raise InputError(f"Indices for {dst} must be in [0, {num_samples}), got {int(idx.min())}..{int(idx.max())}.")
    if len(np.unique(idx)) != len(idx):
        raise InputError(f"Indices for {dst} repeat a sample; each sample can be kept once.")
    return idx


def _copy_pass(beton: Beton, plans: list[_Plan], tmps: list[Path], step: int, progress: bool) -> None:
    """Write every plan to its temporary file in one pass over the source's data region, `step` bytes at a time:
    each writer prefetches the next step and copies the current one, so a sample kept by several outputs is read
    from disk once and then from the page cache."""
    from tqdm import tqdm

    data_lo, data_hi = beton.data_start, int(beton.header["alloc_table_ptr"])
    fd = os.open(beton.path, os.O_RDONLY)
    writers = []
    try:
        with contextlib.suppress(AttributeError, OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        for p, tmp in zip(plans, tmps):
            with _naming(p.dst):
                writers.append(_Writer(p, tmp, fd, beton.page_size, beton.path))
        log.info("subset of %s: %d outputs, %d reads", beton.path, len(plans), sum(w.num_runs for w in writers))
        with tqdm(total=data_hi - data_lo, unit="B", unit_scale=True, desc="prune", disable=not progress) as bar:
            for lo in range(data_lo, data_hi, step):
                hi = min(lo + step, data_hi)
                for w in writers:
                    w.prefetch_until(min(hi + step, data_hi))
                for w in writers:
                    with _naming(w.plan.dst):
                        w.copy_until(hi)
                bar.update(hi - lo)
        for w in writers:
            with _naming(w.plan.dst):
                w.finish()
    finally:
        for w in writers:
            w.close()
        os.close(fd)


@contextlib.contextmanager
def _naming(dst: Path):
    """Turn a write error (a full disk, a read-only remount) of the output `dst` into one sentence naming it."""
    try:
        yield
    except OSError as exc:
        mapped = write_error(dst, exc)
        if mapped is None:
            raise
        raise mapped from None


def write_subset(src: Beton | str | os.PathLike, dst: str | os.PathLike, indices: np.ndarray, *,
                 force: bool = False, progress: bool = False,
                 finalize: Callable[[Path, Path], None] | None = None) -> SubsetResult:
    """Write the samples `indices` (K,) of `src`, in that order, to the `.beton` `dst` by byte copy."""
    return write_subsets(src, {dst: indices}, force=force, progress=progress, finalize=finalize)[0]
