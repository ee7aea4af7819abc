"""FFCV loader pipelines for training, evaluation and scoring inference.

Each loader yields ``(images, labels)``: images float32 ``(B, 3, res, res)`` on `device`, labels int64 ``(B,)`` on
`device`. Pixels are decoded, cropped and flipped by FFCV's compiled operations; uint8 crosses to the device (a
quarter of the bytes of float32) and is normalised there by torch in one fused pass (on this 2-core CPU about
2.4k img/s at 128 px, against 1.9k for convert-then-normalise). Images are channels-last on CUDA and contiguous
NCHW on the CPU, where channels-last made ResNet training about 3x slower here (`channels_last` overrides).
Torch's thread count is put back after FFCV changes it.

* `train_loader`: random-resized crop (scale 0.08-1, ratio 3/4-4/3) + horizontal flip, both seeded per image
  (`dptool.augment`), so one `seed` gives the same batches in every run. QUASI_RANDOM order on one process
  (RANDOM when `indices` are given, avoiding FFCV #208), RANDOM under `distributed` (FFCV #92); an epoch's
  order depends on the seed and the epoch alone (FFCV's quasi-random order also drifted with earlier epochs).
* `eval_loader`: centre crop of 224/256 of the short side resized to `res`, file order.
* `inference_loader`: centre square crop of the whole short side resized to `res`, file order; the preprocessing
  of the paper's LM/FM scoring.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence

import numpy as np

from ._ffcv import import_ffcv, restore_threads
from .beton import Beton, check_image_field, open_beton
from .distributed import shard_rows
from .errors import DptoolError, InputError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FfcvLoader",
    "train_loader",
    "eval_loader",
    "inference_loader",
    "EVAL_CROP_RATIO",
    "decoding_threads",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
EVAL_CROP_RATIO = 224 / 256


class FfcvLoader:
    """An FFCV `Loader` that normalises on the device and keeps torch's thread count.

    Iterating yields ``(images, labels)``: float32 (B, 3, res, res) and int64 (B,), on `device`.
    `set_resolution` changes the output size from the next epoch on (progressive resizing, no recompilation).
    """

    def __init__(self, loader, decoder, *, device, mean: Sequence[float], std: Sequence[float], threads: int,
                 channels_last: bool | None = None, path: str | os.PathLike | None = None,
                 label_first: bool = False):
        import torch

        self.loader = loader
        self.path = path  # named in errors
        self.decoder = decoder
        # FFCV yields its fields in the file's field order: a file written with label before image (FFCV's
        # DatasetWriter keeps the order of its fields dict) yields (labels, images)
        self._label_first = bool(label_first)
        self.device = torch.device(device)
        shape = (1, 3, 1, 1)
        # x_norm = (x - 255 mean) / (255 std) = x * inv_std + bias: one fused pass (addcmul) from uint8 to float32
        self._inv_std = torch.tensor([1.0 / (s * 255.0) for s in std], device=self.device).view(shape)
        self._bias = -torch.tensor([m * 255.0 for m in mean], device=self.device).view(shape) * self._inv_std
        self._threads = threads  # torch's thread count before FFCV touched it
        if channels_last is None:
            channels_last = self.device.type == "cuda"
        self._format = torch.channels_last if channels_last else torch.contiguous_format

    @property
    def batch_size(self) -> int:
        """Images per batch (per process)."""
        return int(self.loader.batch_size)

    @property
    def resolution(self) -> int:
        """Side length in pixels of the images the next epoch yields."""
        return int(self.decoder.output_size[0])

    def set_resolution(self, res: int) -> None:
        """Yield `res`x`res` images from the next epoch on."""
        self.decoder.output_size = (int(res), int(res))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple]:
        import torch

        threads = self._threads
        # FFCV's thread copies each batch to the GPU on streams of its own, which nothing orders after the work
        # already queued on the caller's stream. Memory that queued work still writes, freed to torch's caching
        # allocator, can become this epoch's buffers, and the late write then lands on a batch already copied
        # (labels read as garbage: a device-side assert in the loss, ResNet-50 `bench pretrain` on an H200).
        _synchronize(self.device)
        # FFCV allocates the epoch's buffers here, and its thread copies into them (ToDevice) outside any
        # inference mode: buffers made under the caller's torch.inference_mode() would be inference tensors,
        # whose in-place update kills that thread (and FFCV then waits forever for its next batch).
        with torch.inference_mode(False):
            epoch = iter(self.loader)
        try:
            while True:
                _wait_for_batch(epoch, self.path)
                try:
                    images, labels = next(epoch)
                except StopIteration:
                    break
                if self._label_first:
                    images, labels = labels, images
                restore_threads(threads)
                # FFCV reuses its output buffers: the float output and the label copy own their memory.
                u = images.to(self.device, non_blocking=True)
                x = torch.empty(u.shape, dtype=torch.float32, device=self.device, memory_format=self._format)
                torch.addcmul(self._bias, u, self._inv_std, out=x)
                y = labels.reshape(-1).to(device=self.device, dtype=torch.int64, copy=True)
                yield x, y
        finally:
            _stop_epoch(epoch)
            # the copies of batches fetched ahead and never taken may still be queued on FFCV's streams: they
            # must land before the epoch's buffers go back to the allocator (on the caller's stream) and are reused
            _synchronize(self.device)
            restore_threads(threads)


def _synchronize(device) -> None:
    """Wait for every stream of a CUDA `device` (a no-op elsewhere); a CUDA error already raised is not raised again."""
    if device.type != "cuda":
        return
    import torch

    try:
        torch.cuda.synchronize(device)
    except RuntimeError:  # a broken device (e.g. a device-side assert) fails the next CUDA call with its own error
        log.debug("torch.cuda.synchronize failed", exc_info=True)


def _wait_for_batch(epoch, path) -> None:
    """Block until FFCV's epoch thread has queued a batch (or the epoch's end); raise if it died without one.

    FFCV's own `__next__` waits on its queue with no timeout, so an error inside its thread (printed to stderr
    by Python) would otherwise leave the caller waiting forever.
    """
    queue = getattr(epoch, "output_queue", None)
    if queue is None:
        return
    with queue.not_empty:  # the queue's own condition, notified on every put
        while not len(queue.queue) and epoch.is_alive():
            queue.not_empty.wait(1.0)
        if len(queue.queue):
            return
    name = f" for {path}" if path is not None else ""
    raise DptoolError(f"FFCV's loading thread{name} stopped before the end of the epoch; its error is printed "
                      "above.")


def _stop_epoch(epoch, timeout_s: float = 60.0) -> None:
    """Stop an FFCV epoch iterator left before its end and wait for its prefetch thread to finish.

    FFCV's own `close()` only raises a flag, and frees the epoch's memory while the thread may still be decoding
    into it. The thread reads the flag only when its queue stays full for 0.5 s, and at the epoch's end it blocks
    on putting its end marker into a full queue for good. A thread left running inside compiled code when the
    process exits aborts it ("terminate called without an active exception", seen once on a GPU host at the end
    of `bench pretrain --steps`). So: flag; wait; if it still runs, take one queued batch (the end marker then
    fits, or it decodes at most one more batch before it sees the flag); repeat; then release the memory.
    """
    import contextlib
    import queue
    import time

    if getattr(epoch, "terminate_event", None) is None:
        return
    epoch.terminate_event.set()
    deadline = time.monotonic() + timeout_s
    while epoch.is_alive() and time.monotonic() < deadline:
        epoch.join(1.0)
        if epoch.is_alive():
            with contextlib.suppress(queue.Empty):
                epoch.output_queue.get_nowait()
    if epoch.is_alive():
        log.warning("FFCV's loading thread did not stop within %.0f s of the epoch being left", timeout_s)
    epoch.close()


def _check_indices(indices, n: int, path) -> np.ndarray | None:
    if indices is None:
        return None
    idx = np.asarray(indices)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise InputError(f"indices for {path} must be a 1-D integer array, got shape {idx.shape} {idx.dtype}.")
    if idx.size == 0:
        raise InputError(f"indices for {path} select no samples.")
    if idx.min() < 0 or idx.max() >= n:
        raise InputError(f"indices for {path} must lie in [0, {n}), got [{idx.min()}, {idx.max()}].")
    return idx.astype(np.int64)


def usable_cpus() -> int:
    """The CPUs this process may run on, as Numba counts them: its affinity mask (taskset, a cgroup cpuset, a Slurm
    allocation), or NUMBA_NUM_THREADS when set. `--workers` of every command is at most this; 0 means all of it."""
    import numba

    return max(1, int(numba.config.NUMBA_NUM_THREADS))


def decoding_threads(workers: int) -> int:
    """FFCV's decoding threads for `--workers` (0: every CPU this process may run on). FFCV sets Numba's thread
    count to it, which cannot exceed Numba's limit: the CPUs of the process's affinity mask (taskset, a cgroup
    cpuset, a Slurm allocation), or NUMBA_NUM_THREADS. More is refused in one sentence."""
    limit = usable_cpus()
    if workers <= 0:
        return limit
    if workers > limit:
        raise InputError(f"--workers {workers} is more than the {limit} CPU(s) this process may run on (Numba's "
                         f"thread limit, NUMBA_NUM_THREADS); give at most {limit}, or 0 for all of them.")
    return workers


def _build(path, *, decoder, flip, batch_size: int, workers: int, device, order: str,
           distributed: bool, seed: int, indices, drop_last: bool, mean, std,
           channels_last: bool | None = None) -> FfcvLoader:
    """Assemble the image and label pipelines around `decoder` and wrap the FFCV Loader."""
    import torch

    beton = open_beton(path)
    path = beton.path  # a Beton opened by the caller, or the file just opened
    if "image" not in beton.field_names:
        raise InputError(f"{path} has no 'image' field (fields: {', '.join(beton.field_names)}).")
    check_image_field(beton)
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}.")
    idx = _check_indices(indices, beton.num_samples, path)
    n = beton.num_samples if idx is None else len(idx)
    if drop_last and batch_size > n:
        raise InputError(f"Batch size {batch_size} is larger than the {n} samples of {path}; use a smaller batch.")

    threads = torch.get_num_threads()
    loader_mod = import_ffcv("ffcv.loader")
    transforms = import_ffcv("ffcv.transforms")
    fields = import_ffcv("ffcv.fields.decoders")
    dev = torch.device(device)
    image_ops = [decoder]
    if flip is not None:
        image_ops.append(flip)
    image_ops.append(transforms.ToTensor())
    if dev.type == "cuda":
        image_ops.append(transforms.ToDevice(dev, non_blocking=True))
    image_ops.append(transforms.ToTorchImage(channels_last=True))
    label_ops = [fields.IntDecoder(), transforms.ToTensor()]
    if dev.type == "cuda":
        label_ops.append(transforms.ToDevice(dev, non_blocking=True))

    Order = loader_mod.OrderOption
    order_opt = {"sequential": Order.SEQUENTIAL, "random": Order.RANDOM, "quasi_random": Order.QUASI_RANDOM}[order]
    if order_opt == Order.RANDOM:
        # FFCV's random order (and torch's DistributedSampler) seeds epoch e with seed + e: seed s + 1 would replay
        # seed s's epochs shifted by one, crops included (they follow the order). A spread seed cannot collide so.
        seed = (int(seed) * 1_000_003 + 1) % 2**31
    pipelines = {"image": image_ops, "label": label_ops}
    pipelines.update({name: None for name in beton.field_names if name not in ("image", "label")})
    loader = loader_mod.Loader(
        str(path), batch_size=batch_size, num_workers=decoding_threads(workers),
        order=order_opt, os_cache=True, distributed=distributed,
        seed=seed, indices=idx, pipelines=pipelines, drop_last=drop_last,
    )
    restore_threads(threads)
    beton.check_unchanged()  # FFCV opened the path again: the file of the tables above, not one renamed over it
    if order_opt == Order.QUASI_RANDOM:
        _make_order_a_function_of_epoch(loader)
    label_first = beton.field_names.index("label") < beton.field_names.index("image")
    return FfcvLoader(loader, decoder, device=dev, mean=mean, std=std, threads=threads, channels_last=channels_last,
                      path=path, label_first=label_first)


def _make_order_a_function_of_epoch(loader) -> None:
    """Make FFCV's quasi-random order depend on (seed, epoch) alone, so a resumed run sees the epochs it would have.

    FFCV 1.0.2 shuffles each page's sample list in place, in the array it keeps: epoch e's order then depends
    on every epoch drawn before it, and a loader started at epoch 1 (a resume) orders differently from one that
    ran epoch 0 first. Each epoch here starts from the array as it stood when the loader was built (FFCV's
    constructor has drawn epoch 0 once by then: a fixed function of the seed).
    """
    order = loader.traversal_order
    if not hasattr(order, "page_to_samples_array"):  # another FFCV release: leave it as it is
        return
    pristine = order.page_to_samples_array.copy()
    draw = order.sample_order

    def sample_order(epoch: int):
        np.copyto(order.page_to_samples_array, pristine)
        return draw(epoch)

    order.sample_order = sample_order


def train_loader(path: Beton | str | os.PathLike, *, batch_size: int, res: int, workers: int = 0, device="cpu",
                 distributed: bool = False, seed: int = 0, indices: Sequence[int] | None = None,
                 drop_last: bool = True, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), channels_last: bool | None = None) -> FfcvLoader:
    """Training batches: random-resized crop to `res` + flip, shuffled per epoch; all of it repeats for one `seed`.

    Yields images float32 (B, 3, res, res) and labels int64 (B,), both on `device`.
    `workers` = decoding threads (0 = all cores). `indices` restricts to a subset of file rows.
    At `batch_size` 1 the crops and flips are FFCV's own, unseeded: seeded ones follow the batch, and a batch
    of one image is the same batch every epoch, so that image would be cropped one way for the whole run.
    """
    if batch_size == 1:
        log.warning("batch size 1: crops and flips are drawn unseeded, so a rerun will not repeat them")
        rgb = import_ffcv("ffcv.fields.rgb_image")
        decoder = rgb.RandomResizedCropRGBImageDecoder((res, res), scale=tuple(scale), ratio=tuple(ratio))
        flip = import_ffcv("ffcv.transforms").RandomHorizontalFlip()
    else:
        augment = import_ffcv("dptool.augment")
        decoder = augment.SeededRandomResizedCrop((res, res), scale=tuple(scale), ratio=tuple(ratio))
        flip = augment.SeededHorizontalFlip()
    order = "random" if distributed or indices is not None else "quasi_random"
    return _build(path, decoder=decoder, flip=flip, batch_size=batch_size, workers=workers, device=device,
                  order=order, distributed=distributed, seed=seed, indices=indices, drop_last=drop_last,
                  mean=mean, std=std, channels_last=channels_last)


def _shard(beton: Beton, indices, distributed: bool):
    """Under torch.distributed, give each rank every world-th sample (exact: no padding, no duplicates)."""
    if not distributed:
        return indices
    return shard_rows(np.arange(beton.num_samples) if indices is None else indices)


def eval_loader(path: Beton | str | os.PathLike, *, batch_size: int, res: int, workers: int = 0, device="cpu",
                distributed: bool = False, indices: Sequence[int] | None = None,
                mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                crop_ratio: float = EVAL_CROP_RATIO, channels_last: bool | None = None) -> FfcvLoader:
    """Evaluation batches: centre crop of `crop_ratio` (224/256) of the short side, resized to `res`; file order.

    Every sample is yielded once (the last batch may be short). Under `distributed`, rank r gets samples
    r, r + world, ... so that summing counts over ranks gives exact metrics.
    """
    rgb = import_ffcv("ffcv.fields.rgb_image")
    decoder = rgb.CenterCropRGBImageDecoder((res, res), ratio=crop_ratio)
    beton = open_beton(path)  # once, for the shard and the loader
    return _build(beton, decoder=decoder, flip=None, batch_size=batch_size, workers=workers, device=device,
                  order="sequential", distributed=False, seed=0, indices=_shard(beton, indices, distributed),
                  drop_last=False, mean=mean, std=std, channels_last=channels_last)


def inference_loader(path: Beton | str | os.PathLike, *, batch_size: int, res: int, workers: int = 0, device="cpu",
                     indices: Sequence[int] | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD, channels_last: bool | None = None) -> FfcvLoader:
    """Scoring batches: deterministic centre square crop of the whole short side, resized to `res`; file order.

    Every sample once (no sharding here: `dptool.features.stream` hands each rank its own rows as `indices`).
    FFCV's random-resized crop with scale=(1, 1) and ratio=(1, 1) is not this crop: when the sides differ by one
    pixel a full-area square fits, and it picks the offset from Numba's unseeded generator.
    """
    rgb = import_ffcv("ffcv.fields.rgb_image")
    decoder = rgb.CenterCropRGBImageDecoder((res, res), ratio=1.0)
    return _build(path, decoder=decoder, flip=None, batch_size=batch_size, workers=workers, device=device,
                  order="sequential", distributed=False, seed=0, indices=indices, drop_last=False, mean=mean,
                  std=std, channels_last=channels_last)
