"""Training input pipelines side by side: dptool's FFCV loader vs torchvision ImageFolder + DataLoader.

Same generated JPEG images (an ImageFolder, converted to a .beton), same augmentation (random-resized crop +
flip + ImageNet normalisation, float32 out), same batch size, same worker count (FFCV: decoding threads;
DataLoader: worker processes), same model. Reported for each path:

* loader only: images/s of a full epoch (the first epoch, which pays FFCV's JIT / the DataLoader's worker
  start-up, separately from a steady-state epoch);
* training: images/s over `--train-steps` SGD steps after a warm-up, and the epoch time that rate implies.

    python benchmarks/bench_train.py                       # CPU defaults, writes benchmarks/results/train.json
    python benchmarks/bench_train.py --device cuda --arch resnet18 resnet50 --shapes 256:160 --images 20000 \
        --workers 16 --batch-size 256
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _args import parser, require_archs, require_device, require_positive  # benchmarks/_args.py, beside this script

from dptool.convert import WriterParams, convert
from dptool.loaders import IMAGENET_MEAN, IMAGENET_STD, train_loader
from dptool.models import create_model
from dptool.synthetic import separable_images, write_image_folder

RESULTS = Path(__file__).parent / "results" / "train.json"


def make_data(folder: Path, n_images: int, size: int, n_classes: int, workers: int) -> tuple[Path, Path]:
    """Write an ImageFolder of JPEGs and convert it to a .beton (stored as JPEG, quality 90)."""
    images, labels = separable_images(n_classes, n_images // n_classes, size, seed=0, noise=30.0)
    root = write_image_folder(folder / "imagefolder", images, labels, [f"c{c:03d}" for c in range(n_classes)],
                              ext="jpg")
    beton = folder / "data.beton"
    convert(root, beton, params=WriterParams(max_resolution=size, write_mode="jpg", jpeg_quality=90,
                                             num_workers=workers))
    return root, beton


def torchvision_loader(root: Path, *, batch_size: int, res: int, workers: int):
    """ImageFolder + DataLoader with the same augmentation as dptool's train loader."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.RandomResizedCrop(res, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    ds = datasets.ImageFolder(str(root), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                                       persistent_workers=workers > 0, pin_memory=False)


def time_epoch(loader, device) -> tuple[float, int]:
    """Seconds and images for one full pass, moving each batch to `device`."""
    t0, n = time.perf_counter(), 0
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        n += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, n


def time_training(loader, model, device, steps: int, warmup: int = 2) -> float:
    """Images/s of `steps` SGD steps (forward, backward, update) after `warmup` steps, data included."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    it, done, n, t0 = iter(loader), 0, 0, None
    while done < warmup + steps:
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        if done == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if done >= warmup:
            n += len(y)
        done += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def run_shape(args, device, size: int, res: int, threads: int) -> dict:
    """Both paths on one generated data set of `size` px JPEGs cropped to `res` px."""
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        t0 = time.perf_counter()
        root, beton = make_data(Path(tmp), args.images, size, args.classes, args.workers)
        prep = time.perf_counter() - t0
        kw = {"batch_size": args.batch_size, "res": res, "workers": args.workers}
        paths = {  # torchvision first: its worker processes fork before FFCV/Numba start threads
            "torchvision": lambda: torchvision_loader(root, **kw),
            "ffcv": lambda: train_loader(beton, device=device, **kw),
        }
        rows = []
        for name, make in paths.items():
            t0 = time.perf_counter()
            loader = make()
            build = time.perf_counter() - t0
            first_s, n = time_epoch(loader, device)
            steady_s, n = time_epoch(loader, device)
            row = {"path": name, "build_s": build, "first_epoch_s": first_s, "epoch_s": steady_s,
                   "loader_images_per_s": n / steady_s, "first_epoch_images_per_s": n / first_s}
            for arch in args.arch:
                torch.manual_seed(0)
                model = create_model(arch, args.classes).to(device)
                if device.type == "cuda":
                    model = model.to(memory_format=torch.channels_last)
                ips = time_training(loader, model, device, args.train_steps)
                row[f"train_{arch}_images_per_s"] = ips
                row[f"train_{arch}_epoch_s_implied"] = n / ips
            rows.append(row)
            torch.set_num_threads(threads)
            del loader
    tv, ffcv = rows
    speedup = {"loader": ffcv["loader_images_per_s"] / tv["loader_images_per_s"],
               **{arch: ffcv[f"train_{arch}_images_per_s"] / tv[f"train_{arch}_images_per_s"] for arch in args.arch}}
    return {"size": size, "res": res, "data_prep_s": prep, "rows": rows, "speedup_ffcv_over_torchvision": speedup}


def print_shape(run: dict, args, device) -> None:
    """One table per data shape."""
    print(f"\n{args.images} JPEG images {run['size']}px -> RRC {run['res']}px + flip + normalise, batch "
          f"{args.batch_size}, {args.workers} workers, device {device}")
    head = f"{'path':<12} {'loader img/s':>13} {'1st epoch img/s':>16} {'epoch s':>8}"
    head += "".join(f" {'train ' + a + ' img/s':>22}" for a in args.arch)
    print(head)
    for r in run["rows"]:
        line = f"{r['path']:<12} {r['loader_images_per_s']:>13.0f} {r['first_epoch_images_per_s']:>16.0f} "
        line += f"{r['epoch_s']:>8.2f}" + "".join(f" {r[f'train_{a}_images_per_s']:>22.1f}" for a in args.arch)
        print(line)
    print("speed-up ffcv/torchvision: " + ", ".join(f"{k} {v:.2f}x"
                                                    for k, v in run["speedup_ffcv_over_torchvision"].items()))


def main(argv=None) -> dict:
    """Run the comparison for every --shapes entry, print tables, write JSON."""
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--shapes", nargs="+", default=["160:128", "64:56"],
                   help="STORED:CROP pairs in px, e.g. 256:224 (ImageNet-like) or 64:56")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--arch", nargs="+", default=["resnet18"])
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json-out", "--out", dest="out", type=Path, default=RESULTS,
                   help="JSON result (--out: its former name)")
    args = p.parse_args(argv)
    require_positive(p, args, ("images", "classes", "batch_size", "workers", "train_steps"))
    for shape in args.shapes:
        if not re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", shape):
            p.error(f"--shapes entries are STORED:TRAINED pixel sizes such as 160:128, got {shape!r}")
    if args.images < args.classes:
        p.error(f"--images ({args.images}) must be at least --classes ({args.classes}): an image per class")
    require_archs(p, args.arch)
    require_device(p, args.device)
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    runs = []
    for shape in args.shapes:
        size, res = (int(v) for v in shape.split(":"))
        runs.append(run_shape(args, device, size, res, threads))
        print_shape(runs[-1], args, device)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    result = {"config": {**vars(args), "out": str(args.out)}, "device": str(device), "torch_threads": threads,
              "cpu_count": os.cpu_count(), "load_average_after": load, "platform": platform.platform(),
              "python": sys.version.split()[0], "torch": torch.__version__, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"load average after the run: {load}; wrote {args.out}")
    return result


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
