"""Throughput of the training data path: `dptool bench loader`.

`bench_loader` measures images/s of random-resized-crop + flip batches from a `.beton` through FFCV's training
pipeline, delivered on the device, with and without a training step of a model, and optionally the same images
through torchvision's `ImageFolder` + `DataLoader` with the same augmentation and workers. The pretraining
benchmark, and the step and page-cache warming both use, are `dptool.bench`, which re-exports this module's names.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import distributed as dist
from .beton import open_beton
from .errors import InputError

__all__ = ["LoaderBench", "bench_loader"]

log = logging.getLogger(__name__)


@dataclass
class LoaderBench:
    """Images/s of the FFCV training pipeline, with the model, and of torchvision's ImageFolder path."""

    path: str
    res: int
    batch_size: int
    workers: int
    device: str
    ffcv_images_per_second: float
    ffcv_with_model_images_per_second: float | None = None
    folder_images_per_second: float | None = None
    folder_with_model_images_per_second: float | None = None
    precision: str | None = None  # of the model step (`auto` resolved), with `arch`
    recipe: str | None = None  # whose optimizer the model step takes, with `arch`
    optimizer: str | None = None

    def to_dict(self) -> dict:
        """Plain-JSON form with the FFCV / ImageFolder ratios."""
        d = asdict(self)
        if self.folder_images_per_second:
            d["loader_ratio"] = self.ffcv_images_per_second / self.folder_images_per_second
        if self.folder_with_model_images_per_second and self.ffcv_with_model_images_per_second:
            d["with_model_ratio"] = self.ffcv_with_model_images_per_second / self.folder_with_model_images_per_second
        return d


def _rate(batches, device, step=None, max_batches: int | None = None, what: str = "The file",
          progress: bool = False, desc: str = "") -> float:
    """Images/s of `batches` delivered on `device` (after one warm-up batch), applying `step(x, y)` to each when
    given; the clock stops once the device has finished the work. `progress`: a bar of batches on stderr."""
    from tqdm import tqdm

    it = iter(batches)
    total = max(len(batches) - 1, 0) if hasattr(batches, "__len__") else None
    if max_batches and total is not None:
        total = min(total, max_batches)
    bar = tqdm(total=total, desc=desc or what, unit="batch", disable=not progress)

    def on_device(batch):
        x, y = batch
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    try:
        first = next(it, None)
        if first is None:
            raise InputError(f"{what} holds less than one batch; give a smaller --batch-size.")
        x, y = on_device(first)
        if step:
            step(x, y)
        dist.synchronize(device)
        images, start = 0, time.perf_counter()
        for n, batch in enumerate(it):
            x, y = on_device(batch)
            if step:
                step(x, y)
            else:
                x[0, 0, 0, 0].add_(0)  # touch the batch without a host sync per batch
            images += len(y)
            bar.update()
            if max_batches and n + 1 >= max_batches:
                break
        dist.synchronize(device)
        elapsed = time.perf_counter() - start  # before close(): shutting a loader down is not delivering batches
    finally:
        bar.close()
        close = getattr(it, "close", None)
        if close is not None:
            close()  # a measurement stopped early leaves no loader thread running
    if images == 0:
        raise InputError(f"{what} holds one batch, all of it spent on the warm-up: nothing was measured; give a "
                         "smaller --batch-size.")
    return images / max(elapsed, 1e-9)


def bench_loader(path: str | os.PathLike, *, res: int = 160, batch_size: int = 256, workers: int = 0,
                 arch: str | None = None, small_input: bool = False, compare_folder: str | os.PathLike | None = None,
                 max_batches: int | None = None, device: str = "auto", precision: str = "auto",
                 recipe: str | None = None, optimizer: str | None = None, progress: bool = False) -> LoaderBench:
    """Images/s of random-resized-crop + flip batches from `path` (FFCV) delivered on `device` and, with
    `compare_folder`, of the same images through torchvision ImageFolder + DataLoader with the same augmentation
    and workers; with `arch`, also with a training step of that model on each batch, with the optimizer of
    `recipe` (`dptool train --recipe`, None: resnet) or `optimizer`. `progress`: a bar of batches on stderr for each
    measurement (each reads a whole epoch unless `max_batches`)."""
    import torch

    from .bench import _step, bench_config, warm_page_cache  # here: dptool.bench imports this module at its top
    from .loaders import IMAGENET_MEAN, IMAGENET_STD, decoding_threads, train_loader
    from .models import create_model
    from .steps import resolve_precision

    if dist.launched_by_torchrun():  # every rank would measure the whole file on one device and write the same JSON
        raise InputError("bench loader measures one process's data pipeline; run it without torchrun (bench "
                         "pretrain runs under torchrun).")
    if not arch and (recipe or optimizer):
        raise InputError("--recipe and --optimizer choose the optimizer of the model step, which only --arch adds; "
                         "give --arch too.")
    config = bench_config(recipe, optimizer, arch=arch) if arch else None
    beton = open_beton(path)
    folder = Path(compare_folder) if compare_folder else None
    if folder is not None and not folder.is_dir():  # refused before minutes of measuring, like a bad --arch
        raise InputError(f"--compare-folder {folder} is not a folder.")
    if folder is not None and not any(p.is_dir() for p in folder.iterdir()):
        raise InputError(f"--compare-folder {folder} has no class subfolders; give an ImageFolder tree "
                         "(one folder of images per class).")
    dev = dist.resolve_device(device)
    step = None
    if arch:
        layout = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
        model = create_model(arch, beton.num_classes, small_input=small_input, image_size=res).to(
            dev, memory_format=layout)
        precision = resolve_precision(dev, precision)
        step, _ = _step(config, model, batch_size, dev, precision)
    workers = decoding_threads(workers)  # the same number for torchvision's DataLoader
    threads = torch.get_num_threads()
    warm_page_cache(beton.path)
    ffcv_loader = train_loader(beton.path, batch_size=batch_size, res=res, workers=workers, device=dev)
    result = LoaderBench(path=str(beton.path), res=res, batch_size=batch_size, workers=workers, device=str(dev),
                         ffcv_images_per_second=_rate(ffcv_loader, dev, max_batches=max_batches, what=str(path),
                                                             progress=progress, desc="FFCV"))
    if step:
        result.precision, result.recipe, result.optimizer = precision, recipe or "resnet", config.optimizer
        result.ffcv_with_model_images_per_second = _rate(ffcv_loader, dev, step, max_batches, str(path),
                                                         progress, f"FFCV + {arch}")
    if folder is not None:
        import torchvision.transforms as T
        from torchvision.datasets import ImageFolder
        from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

        tf = T.Compose([T.RandomResizedCrop(res, antialias=True), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        torch.set_num_threads(threads)
        images = ImageFolder(str(folder), transform=tf, loader=_read_or_blank, allow_empty=True)  # as convert
        # ImageFolder lists files with image extensions only; convert tried (and skipped) every file
        skipped = [s["path"] for s in (beton.sidecar or {}).get("skipped", [])]
        stored = beton.num_samples + sum(has_file_allowed_extension(p, IMG_EXTENSIONS) for p in skipped)
        if len(images) != stored:
            log.warning("--compare-folder %s holds %d images but %s was converted from %d: the two rates are of "
                        "different images", folder, len(images), beton.path, stored)
        dl = torch.utils.data.DataLoader(images, batch_size=batch_size,
                                         shuffle=True, num_workers=workers, drop_last=True,
                                         pin_memory=dev.type == "cuda",
                                         persistent_workers=bool(arch) and workers > 0)
        result.folder_images_per_second = _rate(dl, dev, max_batches=max_batches, what=f"--compare-folder {folder}",
                                                progress=progress, desc="ImageFolder")
        if step:
            result.folder_with_model_images_per_second = _rate(dl, dev, step, max_batches, f"--compare-folder {folder}",
                                                               progress, f"ImageFolder + {arch}")
    return result


def _read_or_blank(path: str):
    """torchvision's image loader, or a black 256 px image for a file it cannot read (`convert` skipped those;
    torchvision's DataLoader would stop the measurement at the first)."""
    from PIL import Image
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except Exception:  # noqa: BLE001 - any unreadable file: the throughput of the rest is what is measured
        return Image.new("RGB", (256, 256))
