"""Conversion speed: `dptool convert` vs the plain FFCV recipe (torchvision ImageFolder -> DatasetWriter).

Both write the same generated folder of ImageNet-sized JPEGs with the same field parameters and workers, one
after the other in one run; dptool's time includes flushing its output to the disk (fsync), which FFCV's writer
does not do. Prints a table and writes JSON.

    .venv/bin/python benchmarks/bench_convert.py --images 2000 --json-out benchmarks/results/convert.json
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from _args import parser, require_positive  # benchmarks/_args.py, beside this script
from PIL import Image


def make_folder(root: Path, n_images: int, n_classes: int, seed: int = 0) -> Path:
    """ImageNet-like JPEGs: 500x375 or 375x500, smooth gradients plus noise, quality 90."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    for i in range(n_images):
        c = i % n_classes
        (root / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 256, 3).astype(np.float32)
        img = colour + 60 * np.sin(xx / (10 + c))[..., None] + 40 * np.cos(yy / (7 + i % 13))[..., None]
        img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        if i % 2:
            img = img.transpose(1, 0, 2)
        Image.fromarray(img).save(root / f"n{c:08d}" / f"{i:07d}.JPEG", quality=90)
    return root


def plain_ffcv(src: Path, out: Path, max_res: int, workers: int, mode: str, quality: int) -> float:
    """The FFCV ImageNet example's writer: torchvision ImageFolder fed to DatasetWriter."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(src))
    writer = DatasetWriter(
        str(out),
        {"image": RGBImageField(write_mode=mode, max_resolution=max_res, jpeg_quality=quality), "label": IntField()},
        num_workers=workers,
    )
    start = time.perf_counter()
    writer.from_indexed_dataset(ds, chunksize=100)
    return time.perf_counter() - start


def dptool_convert(src: Path, out: Path, max_res: int, workers: int, mode: str, quality: int) -> float:
    """`dptool convert` through its library call (the CLI adds only argument parsing)."""
    from dptool.convert import WriterParams, convert

    params = WriterParams(max_resolution=max_res, write_mode=mode, jpeg_quality=quality, num_workers=workers)
    start = time.perf_counter()
    convert(src, out, params=params)
    return time.perf_counter() - start


def main() -> None:
    """Run both writers on one generated folder and report images/s and the ratio."""
    ap = parser(__doc__)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--max-res", type=int, default=256)
    ap.add_argument("--write-mode", default="jpg", choices=["raw", "jpg", "smart", "proportion"])
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="folder for the run's temporary folder (created if missing; default: the system's)")
    ap.add_argument("--json-out", type=Path, default=Path(__file__).parent / "results" / "convert.json")
    args = ap.parse_args()
    require_positive(ap, args, ("images", "classes", "max_res", "workers", "repeats"))
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        make_folder(tmp / "src", args.images, args.classes)
        print(f"generated {args.images} JPEGs in {time.perf_counter() - t0:.1f}s")
        import ffcv  # noqa: F401  - pay the import once, outside both timings

        common = (args.max_res, args.workers, args.write_mode, 90)
        # Warm the page cache for both by reading the folder once.
        for p in (tmp / "src").rglob("*.JPEG"):
            p.read_bytes()
        # Interleaved repeats, best of each: other load on the machine hits both alike.
        plain_times, dptool_times = [], []
        for _ in range(args.repeats):
            for out in (tmp / "plain.beton", tmp / "dptool.beton", tmp / "dptool.beton.json"):
                out.unlink(missing_ok=True)
            plain_times.append(plain_ffcv(tmp / "src", tmp / "plain.beton", *common))
            dptool_times.append(dptool_convert(tmp / "src", tmp / "dptool.beton", *common))
        t_plain, t_dptool = min(plain_times), min(dptool_times)
        result = {
            "images": args.images,
            "max_res": args.max_res,
            "write_mode": args.write_mode,
            "workers": args.workers,
            "repeats": args.repeats,
            "plain_all_seconds": plain_times,
            "dptool_all_seconds": dptool_times,
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "plain_ffcv_seconds": t_plain,
            "plain_ffcv_images_per_s": args.images / t_plain,
            "dptool_seconds": t_dptool,
            "dptool_images_per_s": args.images / t_dptool,
            "dptool_over_plain": t_plain / t_dptool,
            "plain_bytes": (tmp / "plain.beton").stat().st_size,
            "dptool_bytes": (tmp / "dptool.beton").stat().st_size,
        }
    print(f"{'writer':<28}{'seconds':>10}{'images/s':>12}")
    print(f"{'FFCV ImageFolder+Writer':<28}{t_plain:>10.2f}{result['plain_ffcv_images_per_s']:>12.0f}")
    print(f"{'dptool convert':<28}{t_dptool:>10.2f}{result['dptool_images_per_s']:>12.0f}")
    print(f"dptool speed / plain FFCV speed: {result['dptool_over_plain']:.2f}x (target >= 1.0)")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
