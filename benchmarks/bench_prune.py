"""Pruning speed: `dptool prune` (byte copy) vs decode + re-encode through FFCV's DatasetWriter vs a plain copy.

One generated `.beton` of ImageNet-sized JPEGs (500x375-like, quality 90, shuffled, many classes), pruned at one
ratio (0.6: 60% of the classes removed) with a seeded random-class scores file. Three ways to produce the subset,
side by side in one run:

* dptool prune: the library call behind `dptool prune` (byte copy, one pass over the source);
* re-encode: decode each kept image and write the subset again with FFCV's `DatasetWriter` (JPEG q90, same
  resolution, all cores); timed on a fixed number of kept images and extrapolated linearly to the whole subset;
* plain copy of as many bytes as the prune wrote, read from the start of the same source file: as
  `shutil.copyfileobj` does it (user space, 64 KiB buffers) and as `shutil.copyfile` does it (in-kernel `sendfile`).

Beside them: prune of a source whose digests file is missing (the pruned file's per-sample digests are then read
back from it, instead of taken from the source's), and `dptool verify` of the pruned file.

Each is timed with the source in the page cache ("warm") and from disk ("cold": source evicted with
posix_fadvise(DONTNEED) before). In both, every output is fsync'ed inside its timing: dptool flushes each output
to the disk before renaming it into place, so the copies and the re-encode do too. Prints a table, writes JSON.

    .venv/bin/python benchmarks/bench_prune.py --size-gb 1.5 --json-out benchmarks/results/prune.json
"""

from __future__ import annotations

import io
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
from _args import parser, require_positive  # benchmarks/_args.py, beside this script

_SHAPES = [(375, 500), (500, 375), (333, 500), (500, 333), (400, 400), (281, 500)]


class ImageNetLike:
    """Indexable (image, label) dataset of ImageNet-sized images (about 100 KB as JPEG q90).

    A bank of noisy gradient/stripe images is drawn once per process; image i is a bank image rolled and
    colour-shifted by i, which keeps generation much cheaper than the JPEG encoding it feeds.
    """

    def __init__(self, n: int, n_classes: int, seed: int = 0, bank: int = 24):
        self.n, self.n_classes, self.seed, self.bank_size = n, n_classes, seed, bank
        self._bank: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return self.n

    def _make_bank(self) -> list[np.ndarray]:
        rng = np.random.default_rng(self.seed)
        bank = []
        for b in range(self.bank_size):
            h, w = _SHAPES[b % len(_SHAPES)]
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            colour = rng.integers(0, 256, 3).astype(np.float32)
            img = colour + 60 * np.sin(xx / (10 + b))[..., None] + 40 * np.cos(yy / (7 + b % 13))[..., None]
            bank.append(np.clip(img + rng.normal(0, 14, img.shape), 0, 255).astype(np.uint8))
        return bank

    def __getitem__(self, i: int):
        if self._bank is None:
            self._bank = self._make_bank()
        base = self._bank[i % self.bank_size]
        img = np.roll(base, (37 * i) % base.shape[0], axis=0) + np.uint8(i % 31)
        return img, i % self.n_classes


class DecodedSubset:
    """Decodes sample `indices[j]` of a `.beton` (as the re-encoding baseline must) for FFCV's writer."""

    def __init__(self, path: Path, indices: np.ndarray):
        self.path, self.indices, self.beton = path, indices, None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        from dptool.beton import open_beton, read_image

        if self.beton is None:  # opened once per writer process
            self.beton = open_beton(self.path)
        i = int(self.indices[j])
        return read_image(self.beton, i), int(self.beton.labels[i])


def jpeg_bytes_estimate(ds: ImageNetLike, quality: int, n: int = 12) -> float:
    """Mean JPEG size of the first `n` images, to size the dataset."""
    from PIL import Image

    sizes = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(ds[i][0]).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell())
    return float(np.mean(sizes))


def make_source(workdir: Path, size_gb: float, n_classes: int, max_res: int, quality: int, workers: int) -> Path:
    """Write (or reuse) the source `.beton` with its sidecar and digests, shuffled like `dptool convert` writes it."""
    from dptool.atomic import atomic_output, output_group
    from dptool.beton import digests_path, fingerprint, open_beton, read_sidecar, write_sidecar
    from dptool.integrity import record_digests, sample_digests
    from dptool.writer import WriterParams, write_beton

    n = max(n_classes, int(size_gb * 1e9 / jpeg_bytes_estimate(ImageNetLike(12, n_classes), quality)))
    out = workdir / f"source_{n}_{n_classes}_{max_res}_{quality}.beton"
    if out.exists() and (read_sidecar(out) or {}).get("digests") and digests_path(out).exists():
        return out
    params = WriterParams(max_resolution=max_res, jpeg_quality=quality, write_mode="jpg", num_workers=workers)
    order = np.random.default_rng(0).permutation(n)
    start = time.perf_counter()
    print(f"generating {n} ImageNet-sized JPEGs (~{size_gb:.1f} GB) in {out} ...", flush=True)
    with output_group(), atomic_output(out) as tmp:
        write_beton(ImageNetLike(n, n_classes), tmp, order, params, progress=True)
        fp = fingerprint(open_beton(tmp, require_label=False))
        digests = record_digests(out, sample_digests(open_beton(tmp, require_label=False)))
        labels = order % n_classes
        write_sidecar(out, {
            "num_samples": n, "num_classes": n_classes, "class_names": [f"n{c:08d}" for c in range(n_classes)],
            "class_counts": np.bincount(labels, minlength=n_classes).tolist(),
            "fields": {"image": "RGBImageField", "label": "IntField"},
            "writer": {"max_resolution": max_res, "jpeg_quality": quality, "write_mode": "jpg",
                       "page_size": params.resolved_page_size()},
            "source": {"path": "generated by benchmarks/bench_prune.py"}, "fingerprint": fp, "digests": digests,
        })
    print(f"generated in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def make_scores(workdir: Path, source: Path) -> Path:
    """A seeded random class ranking for `source` (the 'random' baseline's file)."""
    from dptool.beton import open_beton
    from dptool.scores import Scores, write_scores

    b = open_beton(source)
    rng = np.random.default_rng(1)
    s = Scores(method="random", level="class", ids=np.arange(b.num_classes), names=b.class_names,
               scores=rng.random(b.num_classes), tiebreak=np.zeros(b.num_classes),
               source={"path": str(source), "fingerprint": b.sidecar["fingerprint"], "num_samples": b.num_samples,
                       "num_classes": b.num_classes}, tie_break="class id", params={"seed": 1})
    return write_scores(workdir / "scores.json", s, force=True)


def evict(path: Path) -> None:
    """Drop `path` from the page cache (clean pages only: fsync first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: Path) -> None:
    """Read `path` once so that it is in the page cache, and flush its dirty pages (outside any timing)."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass
        os.fsync(f.fileno())


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def time_prune(source: Path, scores: Path, out: Path, ratio: float, cold: bool,
               read_back: bool = False) -> tuple[float, object]:
    """dptool prune's library call (which fsyncs its output); cold: source evicted first. `read_back`: with the
    source's digests file moved aside, so that prune reads its output back for the output's digests."""
    from dptool.beton import digests_path
    from dptool.prune import prune

    if out.exists():
        out.unlink()
    (evict if cold else warm)(source)
    aside = digests_path(source).with_suffix(".aside")
    if read_back:
        digests_path(source).rename(aside)
    try:
        start = time.perf_counter()
        result = prune(source, scores, out, ratio=ratio, force=True)
        return time.perf_counter() - start, result
    finally:
        if read_back:
            aside.rename(digests_path(source))


def time_verify(path: Path, cold: bool) -> float:
    """`dptool verify`'s library call: every sample read and its CRC-32 compared; cold: file evicted first."""
    from dptool.integrity import verify

    (evict if cold else warm)(path)
    start = time.perf_counter()
    assert verify(path)["intact"]
    return time.perf_counter() - start


def time_copy(src: Path, nbytes: int, dst: Path, how: str, cold: bool) -> float:
    """Copy the first `nbytes` of `src` to `dst` as shutil.copyfileobj does (64 KiB reads and writes,
    'copyfileobj') or as shutil.copyfile does on Linux (os.sendfile, 'sendfile'). The source file is the
    pruned file's source, so that both read data of the same age from the same disk."""
    if dst.exists():
        dst.unlink()
    (evict if cold else warm)(src)
    start = time.perf_counter()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        done = 0
        if how == "copyfileobj":
            while done < nbytes:
                block = fi.read(min(shutil.COPY_BUFSIZE, nbytes - done))
                fo.write(block)
                done += len(block)
        else:
            while done < nbytes:
                done += os.sendfile(fo.fileno(), fi.fileno(), done, nbytes - done)
        os.fsync(fo.fileno())
    return time.perf_counter() - start


def time_reencode(source: Path, indices: np.ndarray, out: Path, max_res: int, quality: int, workers: int) -> float:
    """Decode `indices` of `source` and write them again with FFCV's DatasetWriter (JPEG, same settings)."""
    from ffcv.writer import DatasetWriter

    from dptool.writer import WriterParams

    if out.exists():
        out.unlink()
    warm(source)
    params = WriterParams(max_resolution=max_res, jpeg_quality=quality, write_mode="jpg", num_workers=workers)
    writer = DatasetWriter(str(out), params.fields(), num_workers=workers, page_size=params.resolved_page_size())
    start = time.perf_counter()
    writer.from_indexed_dataset(DecodedSubset(source, indices), chunksize=100)
    fsync_path(out)
    return time.perf_counter() - start


def main() -> None:
    """Generate the source, time the three ways of writing the pruned subset, print a table, write JSON."""
    ap = parser(__doc__)
    ap.add_argument("--size-gb", type=float, default=1.5, help="size of the generated source file")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--max-res", type=int, default=500)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=5, help="repeats of the prune and copy timings (median kept)")
    ap.add_argument("--reencode-sample", type=int, default=1500, help="kept images re-encoded (0 = all of them)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dptool-bench-prune"), help="source kept for reruns")
    ap.add_argument("--json-out", type=Path, default=Path(__file__).parent / "results" / "prune.json")
    args = ap.parse_args()
    require_positive(ap, args, ("classes", "max_res", "workers", "repeats"))
    if not 0 <= args.ratio < 1 or not args.size_gb > 0 or not 1 <= args.quality <= 100:
        ap.error(f"--ratio must be in [0, 1), --size-gb > 0 and --quality in [1, 100], got {args.ratio}, "
                 f"{args.size_gb} and {args.quality}")

    from dptool.beton import open_beton, read_image
    from dptool.prune import kept_samples
    from dptool.scores import read_scores, select_groups

    args.workdir.mkdir(parents=True, exist_ok=True)
    source = make_source(args.workdir, args.size_gb, args.classes, args.max_res, args.quality, args.workers)
    scores = make_scores(args.workdir, source)
    src = open_beton(source)
    kept = kept_samples(src.labels, select_groups(read_scores(scores), ratio=args.ratio))
    out, copy_dst = args.workdir / "pruned.beton", args.workdir / "copy.bin"

    times: dict[str, list[float]] = {}
    result = time_prune(source, scores, out, args.ratio, False)[1]  # untimed: the output size for the copies
    nbytes = out.stat().st_size
    methods = ["prune", "copyfileobj", "sendfile", "prune_readback", "verify"]
    for r in range(args.repeats):  # interleaved, order rotated: drifts of a shared machine hit every method alike
        for cold in (False, True):
            tag = "cold" if cold else "warm"
            for how in methods[r % len(methods):] + methods[:r % len(methods)]:
                if how.startswith("prune"):
                    t, result = time_prune(source, scores, out, args.ratio, cold, read_back=how == "prune_readback")
                elif how == "verify":
                    t = time_verify(out, cold)
                else:
                    t = time_copy(source, nbytes, copy_dst, how, cold)
                times.setdefault(f"{how}_{tag}", []).append(t)
    copy_dst.unlink()
    pruned = open_beton(out)
    for k in np.linspace(0, len(kept) - 1, 16).astype(int):  # spot check: the same pixels
        assert np.array_equal(read_image(pruned, int(k)), read_image(src, int(kept[k])))

    n_re = len(kept) if args.reencode_sample <= 0 else min(args.reencode_sample, len(kept))
    t_re_sample = time_reencode(source, kept[:n_re], args.workdir / "reencoded.beton", args.max_res, args.quality,
                                args.workers)
    (args.workdir / "reencoded.beton").unlink()
    t_re = t_re_sample * len(kept) / n_re
    med = {k: statistics.median(v) for k, v in times.items()}
    written = pruned.file_size
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "source": {"path": str(source), "bytes": src.file_size, "samples": src.num_samples, "classes": src.num_classes,
                   "page_size": src.page_size, "image": f"JPEG q{args.quality}, max side {args.max_res}"},
        "ratio": args.ratio, "kept_samples": int(len(kept)), "bytes_written": written,
        "bytes_read": result.bytes_read,
        "seconds_median": med, "seconds_all": times,
        "reencode": {"images_timed": n_re, "seconds_timed": t_re_sample, "extrapolated": n_re < len(kept),
                     "seconds_full_subset": t_re, "images_per_second": n_re / t_re_sample},
        "speedup_vs_reencode": {t: t_re / med[f"prune_{t}"] for t in ("warm", "cold")},
        "prune_over_copyfileobj": {t: med[f"prune_{t}"] / med[f"copyfileobj_{t}"] for t in ("warm", "cold")},
        "prune_over_sendfile": {t: med[f"prune_{t}"] / med[f"sendfile_{t}"] for t in ("warm", "cold")},
        "prune_readback_over_prune": {t: med[f"prune_readback_{t}"] / med[f"prune_{t}"] for t in ("warm", "cold")},
        "verify_mb_per_second": {t: written / 1e6 / med[f"verify_{t}"] for t in ("warm", "cold")},
        "targets": {"speedup_vs_reencode_min": 10.0, "prune_over_copy_max": 3.0},
    }
    print(f"\nsource {src.file_size / 1e9:.2f} GB, {src.num_samples} images, {src.num_classes} classes; ratio "
          f"{args.ratio}: {len(kept)} kept, {written / 1e9:.2f} GB written, {result.bytes_read / 1e9:.2f} GB read by "
          f"prune; median of {args.repeats}")
    print(f"{'method':<34}{'warm s':>9}{'warm MB/s':>11}{'cold s':>9}{'cold MB/s':>11}")
    for key, name in (("prune", "dptool prune (byte copy)"), ("copyfileobj", "plain copy: shutil.copyfileobj"),
                      ("sendfile", "plain copy: shutil.copyfile (sendfile)"),
                      ("prune_readback", "prune, source without digests"), ("verify", "dptool verify (pruned file)")):
        w, c = med[f"{key}_warm"], med[f"{key}_cold"]
        print(f"{name:<34}{w:>9.2f}{written / 1e6 / w:>11.0f}{c:>9.2f}{written / 1e6 / c:>11.0f}")
    note = f"{n_re} timed, extrapolated" if n_re < len(kept) else "all"
    print(f"{'decode + re-encode (DatasetWriter)':<34}{t_re:>9.1f}{written / 1e6 / t_re:>11.0f}   ({note}, "
          f"{n_re / t_re_sample:.0f} img/s)")
    for t in ("warm", "cold"):
        print(f"{t}: prune is {report['speedup_vs_reencode'][t]:.1f}x faster than re-encoding (target >= 10x); "
              f"{report['prune_over_copyfileobj'][t]:.2f}x the copyfileobj time and "
              f"{report['prune_over_sendfile'][t]:.2f}x the sendfile time (target <= 3x)")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
