"""Throughput of (pruned) pretraining, measured side by side in one run; the loader benchmark is beside it.

`bench_pretrain` trains the same model with the same recipe on each file (the step `dptool train` takes: the optimizer,
weight decay and label smoothing of its `--recipe`, at its peak learning rate), interleaving the files round by round
so that drift in the machine's speed hits all of them alike. Every loader is built, JIT-compiled and warmed
(a few steps, and the file read once into the page cache) before any clock starts: these are one-off costs of a
run, not of an epoch, and leaving them in would make a small pruned file look slower per sample than it is.
`bench_loader` (`dptool.bench_loader`, re-exported here) measures images/s through the training pipeline, with and
without the model, and optionally the same images through torchvision's `ImageFolder` + `DataLoader`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import distributed as dist
from .atomic import atomic_output, check_plot_path
from .bench_loader import LoaderBench, bench_loader
from .beton import fingerprint, open_beton
from .errors import InputError
from .recipe import RECIPES, TrainConfig, config_from_options

__all__ = ["PretrainRow", "PretrainBench", "LoaderBench", "bench_pretrain", "bench_loader", "bench_config",
           "warm_page_cache", "is_pruned_from", "plot_pretrain"]

log = logging.getLogger(__name__)


def warm_page_cache(path: str | os.PathLike, chunk: int = 1 << 24) -> int:
    """Read `path` once so that the first measured epoch does not pay disk reads; returns bytes read."""
    total = 0
    with open(path, "rb", buffering=0) as f:
        while block := f.read(chunk):
            total += len(block)
    return total


@dataclass
class PretrainRow:
    """One file's measurement: samples, images/s, projected and measured epoch time, data-wait share."""

    path: str
    samples: int
    images: int = 0
    seconds: float = 0.0
    wait_seconds: float = 0.0
    epoch_seconds: list[float] = field(default_factory=list)
    cold_seconds: float = 0.0  # loader construction + JIT + warm-up steps, excluded from the rates

    @property
    def images_per_second(self) -> float:
        """Training images per second over the measured steps."""
        return self.images / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        """Plain-JSON form with the derived rates."""
        d = asdict(self)
        d["images_per_second"] = self.images_per_second
        d["projected_epoch_seconds"] = self.samples / self.images_per_second if self.images else None
        # the mean, as images/s is: a per-file minimum would pick each file's luckiest epoch on a noisy machine
        d["measured_epoch_seconds"] = sum(self.epoch_seconds) / len(self.epoch_seconds) if self.epoch_seconds else None
        d["data_wait_share"] = self.wait_seconds / self.seconds if self.seconds else None
        return d


@dataclass
class PretrainBench:
    """All rows plus the speed-ups of every file over the first (the full file)."""

    arch: str
    res: int
    batch_size: int
    device: str
    world_size: int
    rows: list[PretrainRow]
    precision: str = "fp32"  # as trained: `auto` resolved, fp32 on the CPU whatever was asked
    recipe: str = "resnet"  # `dptool train --recipe` whose optimizer, weight decay and label smoothing were used
    optimizer: str = "sgd"
    lr: float = 0.0  # the recipe's peak learning rate at this effective batch, held for every step
    weight_decay: float = 0.0
    label_smoothing: float = 0.0

    def to_dict(self) -> dict:
        """Plain-JSON form: rows, and for each file after the first its measured and ideal speed-up."""
        rows = [r.to_dict() for r in self.rows]
        base = rows[0]
        for r in rows:
            r["ideal_speedup"] = base["samples"] / r["samples"]
            key = "measured_epoch_seconds" if r["measured_epoch_seconds"] else "projected_epoch_seconds"
            r["speedup"] = base[key] / r[key] if r[key] else None
            r["speedup_basis"] = key.split("_")[0]
            r["efficiency"] = r["speedup"] / r["ideal_speedup"] if r["speedup"] else None
        return {"arch": self.arch, "res": self.res, "batch_size": self.batch_size, "device": self.device,
                "precision": self.precision, "world_size": self.world_size, "recipe": self.recipe,
                "optimizer": self.optimizer, "lr": self.lr, "weight_decay": self.weight_decay,
                "label_smoothing": self.label_smoothing, "rows": rows}


def is_pruned_from(pruned, full) -> bool:
    """Whether the sidecar of `pruned` (a Beton) records `dptool prune` of the file `full` (by fingerprint)."""
    full_fp = (full.sidecar or {}).get("fingerprint")
    return full_fp is not None and ((pruned.sidecar or {}).get("pruning") or {}).get("source_fingerprint") == full_fp


def bench_config(recipe: str | None = None, optimizer: str | None = None, **options) -> TrainConfig:
    """The `TrainConfig` a benchmark steps with, as `dptool train --recipe RECIPE --optimizer OPTIMIZER` would
    build it (None: the recipe's; recipe None: resnet, with train's warning for a ViT), with `options` (those not
    None) on top; validated."""
    config = config_from_options(recipe=recipe, optimizer=optimizer, **options)
    config.validate()
    return config


def _step(config: TrainConfig, model, batch_size: int, device, precision: str):
    """`train_step(x, y)` of `model` with `config`'s optimizer at its peak learning rate for an effective batch of
    `batch_size` x the ranks (as `train` scales --lr), its label smoothing and the fp16 grad scaler; and that lr."""
    import torch

    from .steps import grad_scaler, make_optimizer, train_step

    lr = config.lr * batch_size * dist.world_size() / 256
    optimizer = make_optimizer(config, model.parameters(), lr)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    scaler = grad_scaler(precision)
    return (lambda x, y: train_step(model, optimizer, scaler, criterion, x, y, device, precision)), lr


def _measure(row: PretrainRow, it, n_steps: int | None, step, device, restart=None):
    """Train `n_steps` steps from the batch iterator `it` (None: until it ends, one whole epoch) and add the
    images, seconds and data-wait seconds, over all ranks, to `row`. An iterator that ends before `n_steps` is
    replaced by ``iter(restart)``; returns the iterator the next measurement continues from."""
    import torch

    done, wait, images = 0, 0.0, 0
    dist.synchronize(device)
    start = time.perf_counter()
    while n_steps is None or done < n_steps:
        t0 = time.perf_counter()
        try:
            x, y = next(it)
        except StopIteration:
            if n_steps is None:
                break
            it = iter(restart)
            continue
        wait += time.perf_counter() - t0
        step(x, y)
        images += len(y)
        done += 1
    dist.synchronize(device)
    elapsed = time.perf_counter() - start
    counts = torch.tensor([images, elapsed, wait], dtype=torch.float64, device=device)
    dist.all_reduce_sum(counts)
    row.images += int(counts[0])
    row.seconds += float(counts[1]) / dist.world_size()
    row.wait_seconds += float(counts[2]) / dist.world_size()
    if n_steps is None:
        row.epoch_seconds.append(float(counts[1]) / dist.world_size())  # the ranks' mean
    return it


def bench_pretrain(files: list[str | os.PathLike], *, arch: str | None = None, res: int | None = None,
                   batch_size: int | None = None, recipe: str | None = None, optimizer: str | None = None,
                   workers: int = 0, epochs: int = 0, steps: int = 50, rounds: int = 3, warmup_steps: int = 3,
                   small_input: bool = False, precision: str = "auto", warm_cache: bool = True,
                   progress: bool = False) -> PretrainBench:
    """Train `arch` on each file with one recipe, interleaved, and measure images/s and epoch time.

    `recipe` (`dptool train --recipe`, None: resnet) sets the optimizer (`optimizer` overrides it), its weight
    decay and momentum, the label smoothing, and the defaults of `arch`, `res` and `batch_size` (resnet: resnet50,
    160 px, 256; vit: vit_b_16, 224 px, 100). `epochs` > 0: that many whole epochs per file, alternating files
    (measured epoch time). Otherwise `rounds` rounds of `steps` steps per file (projected epoch time = samples /
    images/s). The first file is the reference for speed-ups. Under torchrun every rank trains with DDP and the
    counts are summed.
    """
    import torch
    from tqdm import tqdm

    from .loaders import train_loader
    from .models import create_model
    from .steps import resolve_precision

    if len(files) < 1:
        raise InputError("bench pretrain needs at least one .beton file.")
    if epochs < 0 or steps < 1 or rounds < 1:
        raise InputError(f"--epochs must be >= 0 and --steps/--rounds >= 1, got {epochs}/{steps}/{rounds}.")
    preset = RECIPES.get(recipe or "resnet", {})  # an unknown name is refused by bench_config
    res = res if res is not None else preset.get("max_res", 160)
    config = bench_config(recipe, optimizer, arch=arch or preset.get("arch", "resnet50"), min_res=res, max_res=res,
                          batch_size=batch_size or preset.get("batch_size", 256))
    arch, batch_size = config.arch, config.batch_size
    betons = [open_beton(f) for f in files]
    num_classes = max(b.num_classes for b in betons)
    for b in betons[1:] if dist.launch_rank() == 0 else ():
        if not is_pruned_from(b, betons[0]):
            log.warning("%s is not a pruned copy of %s (by their sidecars): its speed-up compares other data",
                        b.path, betons[0].path)
    with dist.distributed_session() as device:
        world = dist.world_size()
        if world > 1:  # on several machines each rank reads its own copies: they must be the same
            dist.check_same_inputs({f"The file {b.path}": fingerprint(b) for b in betons})
        for b in betons:  # before any file's page cache is warmed and loader compiled: found in a second, not later
            if -(-b.num_samples // world) < batch_size:  # each rank's share, as FFCV's distributed order pads it
                raise InputError(f"--batch-size {batch_size} is larger than the samples each of the {world} "
                                 f"process(es) gets from {b.path}; use a smaller batch.")
        precision = resolve_precision(device, precision)
        torch.manual_seed(0)
        # channels-last only on CUDA: on the CPU it made ResNet training ~3x slower (as in dptool.train)
        layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        model = create_model(arch, num_classes, small_input=small_input, image_size=res).to(device,
                                                                                            memory_format=layout)
        if dist.world_size() > 1:
            model = torch.nn.parallel.DistributedDataParallel(model)
        model.train()
        step, lr = _step(config, model, batch_size, device, precision)

        rows, loaders, iters = [], [], []
        for b in betons:
            start = time.perf_counter()
            if warm_cache:
                warm_page_cache(b.path)
            loader = train_loader(b.path, batch_size=batch_size, res=res, workers=workers, device=device,
                                  distributed=dist.world_size() > 1)
            if len(loader) == 0:  # under torchrun each rank gets 1/world of the samples
                raise InputError(f"--batch-size {batch_size} is larger than the samples each of the "
                                 f"{dist.world_size()} process(es) gets from {b.path}; use a smaller batch.")
            it = iter(loader)
            for _ in range(min(warmup_steps, len(loader))):  # JIT compilation and first batches
                step(*next(it))
            dist.synchronize(device)
            if epochs > 0:
                it.close()  # whole epochs start from fresh iterators; stop this one's prefetch threads
            rows.append(PretrainRow(path=str(b.path), samples=b.num_samples, cold_seconds=time.perf_counter() - start))
            loaders.append(loader)
            iters.append(it)

        n_rounds = epochs if epochs > 0 else rounds
        bar = tqdm(total=n_rounds * len(files), desc="bench pretrain", unit="run",
                   disable=not progress or not dist.is_main())
        for _ in range(n_rounds):
            for i in range(len(files)):
                if epochs > 0:
                    _measure(rows[i], iter(loaders[i]), None, step, device)
                else:
                    iters[i] = _measure(rows[i], iters[i], steps, step, device, restart=loaders[i])
                bar.update()
        bar.close()
        for it in iters:
            it.close()
        return PretrainBench(arch=arch, res=res, batch_size=batch_size, device=str(device),
                             world_size=dist.world_size(), rows=rows, precision=precision, recipe=recipe or "resnet",
                             optimizer=config.optimizer, lr=lr, weight_decay=config.weight_decay,
                             label_smoothing=config.label_smoothing)


def plot_pretrain(bench: dict, path: str | os.PathLike) -> Path:
    """Bar chart of measured (or projected) epoch seconds per file, with the ideal for each pruned file, as a PNG at
    `path` (a .png; an existing file there is replaced only when it is a PNG)."""
    check_plot_path(path, force=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = bench["rows"]
    names = [Path(r["path"]).stem for r in rows]
    key = "measured_epoch_seconds" if rows[0]["measured_epoch_seconds"] else "projected_epoch_seconds"
    times = [r[key] for r in rows]
    ideal = [times[0] / r["ideal_speedup"] for r in rows]
    fig, ax = plt.subplots(figsize=(1.8 * len(rows) + 2, 3.5))
    xs = range(len(rows))
    ax.bar(xs, times, color="tab:blue", label=f"{key.split('_')[0]} epoch time")
    ax.scatter(xs, ideal, color="black", marker="_", s=600, zorder=3, label="ideal (full / kept samples)")
    top = max(max(times), max(ideal))
    for x, r, t, i in zip(xs, rows, times, ideal):
        # above both the bar and the ideal mark, so neither hides the label
        label = f"{r['speedup']:.2f}x" + (f"\n(ideal {r['ideal_speedup']:.2f}x)" if x else "")
        ax.text(x, max(t, i) + 0.02 * top, label, ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, top * 1.3)  # room for the labels and the legend
    ax.set_xticks(list(xs), names, rotation=15)
    ax.set_ylabel("seconds per epoch")
    ax.set_title(f"{bench['arch']} at {bench['res']} px, batch {bench['batch_size']}, {bench['device']}")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    try:
        with atomic_output(out) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return out
