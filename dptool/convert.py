"""Convert an ImageFolder tree (or its tar), an `.npz`, a torchvision dataset on disk or a CoOp split into an FFCV
`.beton`.

The samples are written in a seeded shuffled order (`--seed`) by `dptool.writer`, whose output does not depend
on the number of workers. A file that cannot be read is left out and listed in the sidecar, or stops the run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .atomic import atomic_output, output_group, sweep_stale
from .beton import fingerprint, open_beton
from .class_map import reference_classes, relabel
from .convert_resume import _CHECKPOINT_ENV, CHECKPOINT_SECONDS, _hash, _partial_file, _resume_from, _run_identity
from .errors import InputError, check_seed
from .integrity import record_digests, sample_digests
from .readers import DEFAULT_MAX_PIXELS, SourceDataset, UnreadableImage, open_source, source_inputs
from .sidecar import check_beton_output, write_sidecar
from .writer import MAX_RESOLUTION, SkipSample, WriterParams, write_beton
from .writer_progress import Checkpoints, partial_paths, read_checkpoint

__all__ = ["WriterParams", "PRESETS", "writer_params", "ConvertResult", "convert", "partial_paths", "write_beton"]

log = logging.getLogger(__name__)

#: The ffcv-imagenet write settings: rn18 as the paper's files, rn50 as FFCV's ResNet-50 recipe.
PRESETS = {
    "rn18": {"max_resolution": 400, "compress_probability": 0.10, "jpeg_quality": 90, "write_mode": "proportion"},
    "rn50": {"max_resolution": 500, "compress_probability": 0.50, "jpeg_quality": 90, "write_mode": "proportion"},
}


def writer_params(*, preset: str | None = None, shuffle_seed: int | None = 0, num_workers: int = 0,
                  **settings) -> WriterParams:
    """`WriterParams` of a named `PRESETS` entry (or the defaults) with the `settings` that are not None on top:
    what `dptool convert` builds from --preset and the options given with it. `num_workers` 0 is every CPU the
    process may run on; more processes than those CPUs are started as asked (unlike the loaders' threads, which
    Numba caps), as a source on a slow file system can keep more encoders busy than there are CPUs."""
    if preset is not None and preset not in PRESETS:
        raise InputError(f"Unknown preset {preset!r}; accepted: {', '.join(sorted(PRESETS))}.")
    chosen = {**PRESETS.get(preset, {}), **{k: v for k, v in settings.items() if v is not None}}
    return replace(WriterParams(), shuffle_seed=shuffle_seed, num_workers=num_workers, **chosen)


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


class _SourceSamples:
    """What the writer's workers index: (image, label), or `SkipSample` with the reason for a file that cannot
    be used (unreadable, decoded to no RGB image, or so elongated that `max_resolution` scales a side to 0 px)."""

    def __init__(self, source: SourceDataset, max_resolution: int):
        self.source = source
        self.max_resolution = max_resolution

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            image = self.source.load(index)
        except UnreadableImage as exc:
            raise SkipSample(" ".join(str(exc).split())) from None
        except Exception as exc:  # noqa: BLE001 - any decoder error means "skip this file"
            raise SkipSample(" ".join(f"{type(exc).__name__}: {exc}".split())) from None
        if not (image.ndim == 3 and image.shape[2] == 3 and min(image.shape[:2]) >= 1):
            raise SkipSample(f"decoded to an unusable shape {image.shape}")
        height, width = image.shape[:2]
        scale = self.max_resolution / max(height, width)
        if scale < 1 and min(int(scale * height), int(scale * width)) < 1:  # FFCV's resizer truncates the same way
            raise SkipSample(f"its {width}x{height} px image would be 0 px on its short side at "
                             f"--max-res {self.max_resolution}")
        return image, int(self.source.labels[index])


def _refuse_output_in_class_folder(out: Path, src: str | os.PathLike, format: str) -> None:
    """An ImageFolder source's class folders are read whole: an output inside one would be read as its images
    (the old output, its sidecar, the temporary file), so it is refused before the tree is listed."""
    if format not in ("auto", "imagefolder") or not os.path.isdir(src):
        return
    folder = os.path.realpath(out.parent)
    try:
        class_dirs = sorted(d for d in Path(src).iterdir() if d.is_dir() and not d.name.startswith("."))
    except OSError:
        return  # the source cannot be listed: refused as it is read
    for class_dir in class_dirs:  # resolved one by one: a class folder may be a link to a folder elsewhere
        real = os.path.realpath(class_dir)
        if folder != real and not folder.startswith(real.rstrip(os.sep) + os.sep):
            continue
        if any(part.startswith(".") for part in Path(os.path.relpath(folder, real)).parts):
            return  # hidden folders, at any depth, are not read
        raise InputError(f"Output {out} is inside the class folder {class_dir.name!r} of the source {src}, where "
                         "it would be read as one of its images; write it outside the source's class folders.")


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
    resume: bool = False,
    classes_from: str | os.PathLike | None = None,
) -> ConvertResult:
    """Convert `src` to the FFCV file `out` (+ sidecar); bad images are skipped and listed, or stop the run.

    The file is written as ``.OUT.partial`` beside `out`, with a progress record every 30 s: an interrupted
    conversion (Ctrl-C, a kill, a crash) keeps them, and `resume=True` continues it with the same bytes as an
    uninterrupted run; without `resume`, an interrupted conversion is refused unless `force` starts over.
    `classes_from`: a `.beton` whose class list (by name) labels the samples (`dptool.class_map`)."""
    if on_error not in ("skip", "fail"):
        raise InputError(f"--on-error must be 'skip' or 'fail', got {on_error!r}.")
    if params.write_mode not in ("raw", "jpg", "smart", "proportion"):
        raise InputError(f"--write-mode must be raw, jpg, smart or proportion, got {params.write_mode!r}.")
    if not 1 <= params.jpeg_quality <= 100:
        raise InputError(f"--jpeg-quality must be in [1, 100], got {params.jpeg_quality}.")
    if not 0.0 <= params.compress_probability <= 1.0:
        raise InputError(f"--compress-prob must be in [0, 1], got {params.compress_probability}.")
    if not 8 <= params.max_resolution <= MAX_RESOLUTION:
        raise InputError(f"--max-res must be from 8 to {MAX_RESOLUTION} (FFCV's pages, at most 2 GiB, hold four raw "
                         f"images), got {params.max_resolution}.")
    if params.shuffle_seed is not None:
        check_seed("--seed", params.shuffle_seed)
    out = check_beton_output(out, force=force, inputs=(*source_inputs(src, format), classes_from))
    _refuse_output_in_class_folder(out, src, format)
    ref = None if classes_from is None else reference_classes(classes_from)
    source = open_source(src, format=format, split=split, max_pixels=max_pixels, progress=progress)
    if ref is not None:
        relabel(source, ref, "class folder" if source.format == "imagefolder" else "class")
    n = len(source)
    if n == 0:
        raise InputError(f"Source {src} holds no samples.")
    order = np.arange(n) if params.shuffle_seed is None else np.random.default_rng(params.shuffle_seed).permutation(n)

    started = time.perf_counter()
    identity, names = _run_identity(src, source, order, params, on_error, max_pixels)
    if identity["source"] is None:
        (log.warning if resume else log.info)("no progress is recorded: an interrupted conversion of %s cannot be "
                                              "resumed, as dptool cannot tell whether %s changed", src, names["source"])
    _, state_path = partial_paths(out)
    sweep_stale(state_path)

    def on_skip(index: int, reason: str) -> None:
        if on_error == "fail":
            raise InputError(f"Cannot read {source.describe(index)}: {reason} (use --on-error skip to skip it).")
        log.info("skipping %s: %s", source.describe(index), reason)

    with _partial_file(out) as partial:
        resume_from = _resume_from(out, partial, state_path, identity, names, resume=resume, force=force)
        if resume_from is None:  # starting over: a record left from another run must not describe the new bytes
            with contextlib.suppress(FileNotFoundError):
                state_path.unlink()
        written = False
        checkpoints = None if identity["source"] is None else Checkpoints(
            state_path, _hash(identity), details=json.dumps(identity, sort_keys=True),
            every_seconds=float(os.environ.get(_CHECKPOINT_ENV, CHECKPOINT_SECONDS)), resume_from=resume_from)
        try:
            # the .beton and its sidecar are renamed into place together once both are complete: a failure (a full
            # disk, an output that cannot be replaced) leaves neither, and the old pair untouched
            with output_group():
                with atomic_output(out, temp=partial) as tmp:
                    samples = _SourceSamples(source, params.max_resolution)
                    failures = write_beton(samples, tmp, order, params, progress=progress, on_skip=on_skip,
                                           checkpoints=checkpoints)
                    written = True
                    if failures:
                        log.warning("%d unreadable files skipped (listed in the sidecar)", len(failures))
                    order = order[~np.isin(order, np.fromiter(failures, dtype=np.int64, count=len(failures)))]
                    seconds = time.perf_counter() - started
                    beton = open_beton(tmp)
                    fp = fingerprint(beton)
                    # read back: the digests are of the bytes as they reached the file
                    digests = record_digests(out, sample_digests(beton, progress=progress))
                    skipped = [{"path": source.describe(i), "reason": failures[i]} for i in sorted(failures)]
                    counts = np.bincount(source.labels[order], minlength=len(source.class_names))
                    described = {
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
                        "source": {"path": str(Path(src).resolve()), "format": source.format, "split": source.split,
                                   **source.provenance},
                        "skipped": skipped,
                        "fingerprint": fp,
                        "digests": digests,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    }
                sidecar = write_sidecar(out, described)
        except BaseException as exc:
            # kept when the write stopped (a kill, a crash, a full disk, a file under --on-error fail) or was
            # interrupted later (reading it back is long); a failure after it (a sidecar that cannot be written, an
            # output that cannot be replaced) leaves nothing, as for every output
            kept = None
            if not written or isinstance(exc, KeyboardInterrupt):
                with contextlib.suppress(InputError):
                    kept = read_checkpoint(state_path) if partial.exists() else None
            if kept is not None:
                log.warning("the interrupted conversion is kept in %s (%d of %d samples done): run the same command "
                            "with --resume to continue it", partial, kept["done"], kept["num_samples"])
            else:
                for path in (partial, state_path):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
            raise
        with contextlib.suppress(FileNotFoundError):  # the partial is now the output
            state_path.unlink()
    return ConvertResult(
        output=str(out),
        sidecar=str(sidecar),
        num_samples=int(len(order)),
        num_classes=len(source.class_names),
        bytes=beton.file_size,
        seconds=seconds,
        images_per_second=(len(order) - (resume_from["kept"] if resume_from else 0)) / max(seconds, 1e-9),
        fingerprint=fp,
        skipped=skipped,
    )
