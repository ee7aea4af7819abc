"""Reading ImageNet's tar in place: the index build of `dptool.tar_source` and `dptool convert` from a tar vs its tree.

Part 1 builds tars of many tiny JPEGs (ILSVRC2012_img_train.tar's shape: one tar a class; and a tar of the class
folders' tree) and times `TarSource(tar)`, the index of every image's offset from the headers alone, each in a fresh
process whose peak resident memory is reported beside that of a process that only imports the module; the time and
the memory above that baseline are projected linearly to ImageNet's 1,281,167 images. Part 2 converts the same
ImageNet-sized JPEGs from the extracted folder and from a tar of one tar a class (one untimed conversion of each
first, then interleaved, same --workers) and checks the two files are byte-identical. Page cache warm in both
parts. Prints a table and writes JSON.

    .venv/bin/python benchmarks/bench_convert_tar.py --json-out benchmarks/results/convert_tar.json
"""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from _args import parser, require_positive  # benchmarks/_args.py, beside this script
from bench_convert import make_folder
from PIL import Image

IMAGENET_TRAIN = 1_281_167

# the peak is the process's VmHWM: getrusage's ru_maxrss outlives exec, so a child started by a large parent would
# report the parent's size (it did: 71 MB for a bare import once the parent had made its tars)
_CHILD = """
import json, sys, time
from dptool.tar_source import TarSource
start = time.perf_counter()
n = len(TarSource(sys.argv[1])) if len(sys.argv) > 1 else 0
seconds = time.perf_counter() - start
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps({"images": n, "seconds": seconds, "peak_rss_mb": peak / 1024}))
"""


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def tiny_tars(folder: Path, classes: int, per_class: int) -> tuple[Path, Path]:
    """(a tar of one tar a class, a tar of the tree train/CLASS/IMAGE) of `classes` x `per_class` tiny JPEGs, made
    with PIL once (16 images' bytes reused)."""
    blobs = []
    for k in range(16):
        b = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), (k * 16, 255 - k * 16, 7), np.uint8)).save(b, "JPEG")
        blobs.append(b.getvalue())
    of_tars, tree = folder / f"tars_{classes * per_class}.tar", folder / f"tree_{classes * per_class}.tar"
    with tarfile.open(of_tars, "w") as outer, tarfile.open(tree, "w") as flat:
        for c in range(classes):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for i in range(per_class):
                    _add(tar, f"n{c:08d}_{i}.JPEG", blobs[(c + i) % 16])
                    _add(flat, f"train/n{c:08d}/n{c:08d}_{i}.JPEG", blobs[(c + i) % 16])
            _add(outer, f"n{c:08d}.tar", inner.getvalue())
    return of_tars, tree


def index_run(tar: Path | None) -> dict:
    """`TarSource(tar)` in a fresh process: its images, seconds and peak RSS (None: the imports alone)."""
    out = subprocess.run([sys.executable, "-c", _CHILD, *([str(tar)] if tar else [])], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout)


def tar_of_tars(folder: Path, out: Path) -> Path:
    """ILSVRC2012_img_train.tar's shape from an extracted folder: NAME.tar a class folder."""
    with tarfile.open(out, "w") as outer:
        for class_dir in sorted(folder.iterdir()):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for path in sorted(class_dir.iterdir()):
                    tar.add(path, arcname=path.name)
            _add(outer, f"{class_dir.name}.tar", inner.getvalue())
    return out


def convert_time(src: Path, out: Path, workers: int) -> float:
    """Seconds of `dptool convert src out` (library call, 256 px JPEG as bench_convert.py)."""
    from dptool.convert import WriterParams, convert

    params = WriterParams(max_resolution=256, write_mode="jpg", num_workers=workers)
    start = time.perf_counter()
    convert(src, out, params=params, force=True)
    return time.perf_counter() - start


def main() -> None:
    """Run both parts and report."""
    ap = parser(__doc__)
    ap.add_argument("--classes", type=int, default=200, help="classes of the tiny-image tars")
    ap.add_argument("--per-class", type=int, nargs="+", default=[125, 500],
                    help="images a class of the tiny-image tars, one tar pair each (linearity)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=1000, help="ImageNet-sized JPEGs converted in part 2")
    ap.add_argument("--image-classes", type=int, default=10)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--workdir", type=Path, default=None,
                    help="folder for the run's temporary folder (created if missing; default: the system's)")
    ap.add_argument("--json-out", type=Path, default=Path(__file__).parent / "results" / "convert_tar.json")
    args = ap.parse_args()
    require_positive(ap, args, ("classes", "repeats", "images", "image_classes", "workers"))
    if min(args.per_class) < 1:
        ap.error(f"--per-class must be at least 1, got {min(args.per_class)}")
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    result = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
              "index": [], "convert": {}}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        baseline = min((index_run(None) for _ in range(args.repeats)), key=lambda r: r["peak_rss_mb"])
        result["import_only_peak_rss_mb"] = baseline["peak_rss_mb"]
        for per_class in args.per_class:
            for layout, tar in zip(("class tars", "class folders"), tiny_tars(tmp, args.classes, per_class)):
                runs = [index_run(tar) for _ in range(args.repeats)]
                best = min(r["seconds"] for r in runs)
                peak = max(r["peak_rss_mb"] for r in runs)
                n = runs[0]["images"]
                extra = peak - baseline["peak_rss_mb"]
                result["index"].append({
                    "layout": layout, "images": n, "tar_bytes": tar.stat().st_size,
                    "seconds": [r["seconds"] for r in runs], "best_seconds": best,
                    "seconds_per_100k": best / n * 1e5, "peak_rss_mb": peak, "above_imports_mb": extra,
                    "projected_imagenet_seconds": best / n * IMAGENET_TRAIN,
                    "projected_imagenet_peak_rss_mb": baseline["peak_rss_mb"] + extra / n * IMAGENET_TRAIN})
                tar.unlink()
                row = result["index"][-1]
                print(f"index {layout:13s} {n:7d} images: {best:6.2f} s ({row['seconds_per_100k']:.2f} s/100k), peak "
                      f"{peak:.0f} MB ({extra:.0f} above imports); 1.28M: {row['projected_imagenet_seconds']:.0f} s, "
                      f"{row['projected_imagenet_peak_rss_mb']:.0f} MB")
        folder = make_folder(tmp / "train", args.images, args.image_classes)
        tar = tar_of_tars(folder, tmp / "train.tar")
        sources = {"folder": folder, "tar": tar}
        for name, src in sources.items():  # untimed: imports, compilation and the page cache warmed for both
            convert_time(src, tmp / f"{name}.beton", args.workers)
        times = {"folder": [], "tar": []}
        for r in range(args.repeats):  # interleaved, each first in turn: load from other jobs hits both alike
            for name in (("folder", "tar") if r % 2 == 0 else ("tar", "folder")):
                times[name].append(convert_time(sources[name], tmp / f"{name}.beton", args.workers))
        identical = (tmp / "folder.beton").read_bytes() == (tmp / "tar.beton").read_bytes()
        result["convert"] = {"images": args.images, "classes": args.image_classes, "workers": args.workers,
                             "tar_bytes": tar.stat().st_size, "seconds": times,
                             "median_images_per_second": {k: args.images / float(np.median(v)) for k, v in
                                                          times.items()},
                             "median_tar_over_folder": float(np.median(np.divide(times["tar"], times["folder"]))),
                             "byte_identical": identical}
        c = result["convert"]
        print(f"convert {args.images} images, {args.workers} workers: folder "
              f"{c['median_images_per_second']['folder']:.0f} images/s, tar {c['median_images_per_second']['tar']:.0f} "
              f"images/s (median time ratio tar/folder {c['median_tar_over_folder']:.3f}); identical: {identical}")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
