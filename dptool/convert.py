"""Convert an ImageFolder tree, an `.npz` or a torchvision dataset on disk into an FFCV `.beton` + sidecar.

FFCV's `DatasetWriter` hangs when a worker raises, so a bad image never raises inside a worker: it is
recorded in a per-process file and written as a tiny placeholder. When any sample was bad, the file is
written once more without them (messy folders are rare; the clean path decodes each image once).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ._ffcv import import_ffcv
from .atomic import atomic_output
from .beton import check_beton_output, fingerprint, open_beton, write_sidecar
from .errors import InputError
from .readers import DEFAULT_MAX_PIXELS, SourceDataset, UnreadableImage, open_source

__all__ = ["WriterParams", "PRESETS", "ConvertResult", "convert", "write_beton"]

log = logging.getLogger(__name__)

_PLACEHOLDER = np.zeros((8, 8, 3), dtype=np.uint8)


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


#: The ffcv-imagenet write settings: rn18 as the paper's files, rn50 as FFCV's ResNet-50 recipe.
PRESETS = {
    "rn18": {"max_resolution": 400, "compress_probability": 0.10, "jpeg_quality": 90, "write_mode": "proportion"},
    "rn50": {"max_resolution": 500, "compress_probability": 0.50, "jpeg_quality": 90, "write_mode": "proportion"},
}


@dataclass
class ConvertResult:
    """What `convert` wrote: counts, sizes, timing and the skipped files."""

    output: str
    sidecar: str
    num_samples: int
    num_classes: int
    bytes: int
    seconds: float
    images_per_second: float
    fingerprint: str
    skipped: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain-JSON form for `--json`."""
        return asdict(self)


class _FailSafeSamples:
    """What the FFCV writer's workers index: never raises; bad samples are logged to `failures_dir`."""

    def __init__(self, source: SourceDataset, failures_dir: str, stop_on_error: bool):
        self.source = source
        self.failures_dir = failures_dir
        self.stop_file = os.path.join(failures_dir, "STOP")
        self.stop_on_error = stop_on_error

    def __len__(self) -> int:
        return len(self.source)

    def _record(self, index: int, reason: str) -> None:
        reason = " ".join(str(reason).split())
        with open(os.path.join(self.failures_dir, f"{os.getpid()}.tsv"), "a") as f:
            f.write(f"{index}\t{reason}\n")
        if self.stop_on_error:
            open(self.stop_file, "w").close()

    def __getitem__(self, index: int):
        label = int(self.source.labels[index])
        if self.stop_on_error and os.path.exists(self.stop_file):
            return _PLACEHOLDER, label
        try:
            image = self.source.load(index)
            if image.ndim == 3 and image.shape[2] == 3 and min(image.shape[:2]) >= 1:
                return image, label
            reason = f"decoded to an unusable shape {image.shape}"
        except UnreadableImage as exc:
            reason = str(exc)
        except Exception as exc:  # noqa: BLE001 - any decoder error means "skip this file"
            reason = f"{type(exc).__name__}: {exc}"
        self._record(index, reason)
        return _PLACEHOLDER, label


def _read_failures(failures_dir: str) -> dict[int, str]:
    failures: dict[int, str] = {}
    for name in os.listdir(failures_dir):
        if name.endswith(".tsv"):
            with open(os.path.join(failures_dir, name)) as f:
                for line in f:
                    index, _, reason = line.rstrip("\n").partition("\t")
                    failures[int(index)] = reason
    return failures


class _WriterWorker(multiprocessing.Process):
    """An FFCV writer worker that leaves Ctrl-C to the parent (which stops the workers and reports it once) and
    dies with the parent (Linux), so that no worker is left writing after an interruption."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._parent_pid = os.getpid()

    def run(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != self._parent_pid:  # the parent was gone before the line above
            os._exit(1)
        super().run()


@contextlib.contextmanager
def _writer_patches(show: bool, desc: str, queues: list, stop: list):
    """FFCV's writer always draws a tqdm bar: point it at ours, switched off when asked; make its workers
    `_WriterWorker`s; collect the queues it makes into `queues`, so that an interrupted write can let go of them;
    and stop in its progress loop (which sleeps 0.1 s a turn) once `stop` holds anything."""
    from tqdm import tqdm

    ffcv_writer = import_ffcv("ffcv.writer")

    def queue(*args, **kwargs):
        q = multiprocessing.Queue(*args, **kwargs)
        queues.append(q)
        return q

    def sleep_or_stop(seconds: float) -> None:
        if stop:
            raise KeyboardInterrupt
        time.sleep(seconds)

    originals = ffcv_writer.tqdm, ffcv_writer.Process, ffcv_writer.Queue, ffcv_writer.sleep
    ffcv_writer.tqdm = lambda total=None, **kw: tqdm(total=total, desc=desc, unit="img", disable=not show, **kw)
    ffcv_writer.Process = _WriterWorker
    ffcv_writer.Queue = queue
    ffcv_writer.sleep = sleep_or_stop
    try:
        yield
    finally:
        ffcv_writer.tqdm, ffcv_writer.Process, ffcv_writer.Queue, ffcv_writer.sleep = originals


def _finalize(writer, allocations: list) -> None:
    """FFCV 1.0.2's `DatasetWriter.finalize` with the allocation table built in one call.

    FFCV makes a one-row NumPy array of every (sample, ptr, size) tuple and stacks them: 2.8 s for 400k samples
    on this machine, single-threaded after the progress bar has ended (about 9 s at ImageNet's 1.28M), against
    0.08 s for `np.array(allocations, dtype)`, which gives the same bytes. FFCV also turned any failure here
    into an empty table (a file with no samples' data); here it is an error. The rest (metadata, then the table
    at the end, then the header) is FFCV's.
    """
    alloc_type = import_ffcv("ffcv.types").ALLOC_TABLE_TYPE
    with open(writer.fname, "r+b") as fp:
        fp.seek(writer.metadata_start)
        fp.write(writer.metadata_sm.buf)
        fp.seek(0, os.SEEK_END)
        allocation_table_location = fp.tell()
        fp.write(np.array(allocations, dtype=alloc_type).reshape(-1).tobytes())
        writer.header["alloc_table_ptr"] = allocation_table_location
        fp.seek(0)
        fp.write(writer.header.tobytes())


def write_beton(
    dataset, path: str | os.PathLike, indices: np.ndarray, params: WriterParams, *, progress: bool = False
) -> None:
    """Write `dataset[i]` for i in `indices` (in that order) to `path` with FFCV's `DatasetWriter`."""
    fields = import_ffcv("ffcv.fields")
    DatasetWriter = import_ffcv("ffcv.writer").DatasetWriter

    workers = max(1, min(params.resolved_workers(), len(indices)))
    writer = DatasetWriter(
        str(path),
        {
            "image": fields.RGBImageField(
                write_mode=params.write_mode,
                max_resolution=params.max_resolution,
                compress_probability=params.compress_probability,
                jpeg_quality=params.jpeg_quality,
            ),
            "label": fields.IntField(),
        },
        num_workers=workers,
        page_size=params.resolved_page_size(),
    )
    writer.finalize = functools.partial(_finalize, writer)
    # Small chunks for small sets: FFCV has failed with fewer samples than workers x chunksize (issue #1).
    chunksize = max(1, min(100, math.ceil(len(indices) / workers)))
    before = set(multiprocessing.active_children())
    queues: list = []
    stop: list[bool] = []
    parent = os.getpid()

    def on_sigint(signum, frame):
        # Ctrl-C is acted on at a safe point (FFCV's progress loop, or once the writer returns), never raised
        # inside FFCV: a KeyboardInterrupt between a lock's acquire and its `with` left a queue lock held, and the
        # process hung at exit. A worker between fork and run() has this handler too: it leaves it to the parent.
        if os.getpid() == parent:
            stop.append(True)

    installed = threading.current_thread() is threading.main_thread()  # signal.signal works there only
    previous = signal.signal(signal.SIGINT, on_sigint) if installed else None
    try:
        with _writer_patches(progress, "convert", queues, stop):
            writer.from_indexed_dataset(dataset, indices=np.asarray(indices, dtype=np.int64), chunksize=chunksize)
        if stop:
            raise KeyboardInterrupt
    except BaseException:
        # FFCV leaves its workers running and its shared memory behind when the parent stops (Ctrl-C, an error),
        # and its work queue still holding chunks, which Python would wait forever at exit to hand to them
        for child in set(multiprocessing.active_children()) - before:
            child.terminate()
            child.join(timeout=5)
        for q in queues:
            q.cancel_join_thread()
        shm = getattr(writer, "metadata_sm", None)
        if hasattr(shm, "unlink"):
            with contextlib.suppress(OSError):
                shm.close()
                shm.unlink()
        raise
    finally:
        if installed:  # None: the handler was not set from Python; Python's own is the closest
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str = "auto",
    split: str | None = None,
    params: WriterParams = WriterParams(),
    on_error: str = "skip",
    force: bool = False,
    progress: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ConvertResult:
    """Convert `src` to the FFCV file `out` (+ sidecar); bad images are skipped and listed, or stop the run."""
    if on_error not in ("skip", "fail"):
        raise InputError(f"--on-error must be 'skip' or 'fail', got {on_error!r}.")
    if params.write_mode not in ("raw", "jpg", "smart", "proportion"):
        raise InputError(f"--write-mode must be raw, jpg, smart or proportion, got {params.write_mode!r}.")
    if not 1 <= params.jpeg_quality <= 100:
        raise InputError(f"--jpeg-quality must be in [1, 100], got {params.jpeg_quality}.")
    if not 0.0 <= params.compress_probability <= 1.0:
        raise InputError(f"--compress-prob must be in [0, 1], got {params.compress_probability}.")
    if params.max_resolution < 8:
        raise InputError(f"--max-res must be at least 8, got {params.max_resolution}.")
    out = check_beton_output(out, force=force, inputs=(src,))
    source = open_source(src, format=format, split=split, max_pixels=max_pixels)
    n = len(source)
    if n == 0:
        raise InputError(f"Source {src} holds no samples.")
    order = np.arange(n) if params.shuffle_seed is None else np.random.default_rng(params.shuffle_seed).permutation(n)

    started = time.perf_counter()
    failures_dir = tempfile.mkdtemp(prefix="dptool-convert-")
    try:
        samples = _FailSafeSamples(source, failures_dir, stop_on_error=on_error == "fail")
        with atomic_output(out) as tmp:
            write_beton(samples, tmp, order, params, progress=progress)
            failures = _read_failures(failures_dir)
            if failures and on_error == "fail":
                first = min(failures)
                raise InputError(
                    f"Cannot read {source.describe(first)}: {failures[first]} (use --on-error skip to skip it)."
                )
            if failures:
                log.warning("%d unreadable files skipped; rewriting without them", len(failures))
                order = order[~np.isin(order, np.fromiter(failures, dtype=np.int64))]
                if len(order) == 0:
                    raise InputError(f"None of the {n} samples in {src} could be read.")
                write_beton(samples, tmp, order, params, progress=progress)
                if len(_read_failures(failures_dir)) != len(failures):
                    raise InputError(f"Files in {src} changed while they were being converted; run again.")
            seconds = time.perf_counter() - started
            beton = open_beton(tmp)
            fp = fingerprint(beton)
            skipped = [{"path": source.describe(i), "reason": failures[i]} for i in sorted(failures)]
            counts = np.bincount(source.labels[order], minlength=len(source.class_names))
            sidecar = write_sidecar(
                out,
                {
                    "num_samples": int(len(order)),
                    "num_classes": len(source.class_names),
                    "class_names": source.class_names,
                    "class_counts": counts.tolist(),
                    "fields": {"image": "RGBImageField", "label": "IntField"},
                    "writer": {
                        **asdict(params),
                        "num_workers": params.resolved_workers(),
                        "page_size": params.resolved_page_size(),
                    },
                    "source": {"path": str(Path(src).resolve()), "format": source.format, "split": source.split},
                    "skipped": skipped,
                    "fingerprint": fp,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                },
            )
    finally:
        shutil.rmtree(failures_dir, ignore_errors=True)
    return ConvertResult(
        output=str(out),
        sidecar=str(sidecar),
        num_samples=int(len(order)),
        num_classes=len(source.class_names),
        bytes=beton.file_size,
        seconds=seconds,
        images_per_second=len(order) / max(seconds, 1e-9),
        fingerprint=fp,
        skipped=skipped,
    )
