"""Pretraining on a `.beton` with the ffcv-imagenet recipe, on a CPU, one GPU or many processes under torchrun.

The recipe (`TrainConfig`, in `dptool.recipe`) is plain data: logged as the first line of the JSON-lines log and saved
in every checkpoint. Each step is `dptool.steps.train_step`; the log is a `dptool.runlog.JsonLog`.
A pruned `.beton` keeps its original labels and head width (the sidecar's `num_classes`); validation reports
accuracy on the val images of the kept classes (`val_top1`) and on all of them (`val_top1_all`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import distributed as dist
from .atomic import check_output_path, output_group
from .beton import Beton, check_same_classes, fingerprint, known_fingerprints, open_beton
from .errors import DptoolError, InputError
from .recipe import RECIPES, TrainConfig, lr_at, resolution_at
from .runlog import JsonLog
from .steps import evaluate, grad_scaler, make_optimizer, resolve_precision, train_step
from .train_resume import resume_state

# TrainConfig and RECIPES from here too: the README's "From Python" imports them from dptool.train
__all__ = ["TrainConfig", "RECIPES", "TrainResult", "train", "TrainingDiverged", "LOSS_CHECK_EVERY"]

log = logging.getLogger(__name__)

#: Steps between two reads of the losses on a GPU, which stop a run whose loss became NaN or infinite: a read waits
#: for the device to finish its queued work, so it is not made every step (on the CPU, where nothing waits, it is).
LOSS_CHECK_EVERY = 20


class TrainingDiverged(DptoolError):
    """The loss became NaN or infinite (or an update made the weights so): the run stops before its next checkpoint,
    so the last checkpoint and log stay as they were. `epoch` and `step` count from 0; `step` is None when the loss
    stayed finite and the epoch's last update made the weights non-finite."""

    def __init__(self, message: str, *, epoch: int = 0, step: int | None = None, loss: float | None = None,
                 lr: float | None = None):
        super().__init__(message)
        self.epoch, self.step, self.loss, self.lr = epoch, step, loss, lr


@dataclass
class TrainResult:
    """What `train` did: the files, the effective batch and learning rate, the last and best metrics."""

    checkpoint: str
    log: str | None
    arch: str
    num_classes: int
    num_samples: int
    epochs: int
    start_epoch: int
    world_size: int
    effective_batch_size: int
    effective_lr: float
    device: str
    precision: str
    pruned: bool
    final: dict = field(default_factory=dict)
    best_val_top1: float | None = None
    images_per_second: float = 0.0  # over this run's epochs, the first one's compilation included
    last_epoch_images_per_second: float = 0.0  # the steady rate, once FFCV's and torch's compilation is done
    seconds: float = 0.0
    images_trained: int = 0  # over this run's epochs, all ranks (whole batches only: the last partial one is dropped)

    def to_dict(self) -> dict:
        """Plain-JSON form for `--json`."""
        return asdict(self)


def _kept_classes(beton: Beton) -> np.ndarray | None:
    """Kept classes of a pruned `.beton` (sidecar `pruning.kept_classes`, else the labels present), or None."""
    pruning = (beton.sidecar or {}).get("pruning")
    if not pruning:
        return None
    kept = pruning.get("kept_classes")
    if kept is None:
        kept = np.flatnonzero(beton.class_counts())
    return np.asarray(kept, dtype=np.int64)


def _check_val(val: Beton, data: Beton) -> None:
    num_classes = data.num_classes
    if val.num_samples and int(val.labels.max()) >= num_classes:
        raise InputError(f"Validation file {val.path} has label {int(val.labels.max())}, beyond the "
                         f"{num_classes}-class head of the training data.")
    check_same_classes(data, val, "Validation file", "validation")


def _fixed_size(config: TrainConfig, has_val: bool) -> int | None:
    """A ViT's input side (its position embeddings fix it): one resolution for training and validation."""
    if not config.arch.startswith("vit"):
        return None
    sizes = {config.min_res, config.max_res} | ({config.val_res} if has_val else set())
    if len(sizes) != 1:
        raise InputError(f"{config.arch} trains at one fixed resolution; give --min-res, --max-res and --val-res "
                         f"the same value (e.g. 224), got {sorted(sizes)}.")
    return config.max_res


def train(data: str | os.PathLike, output: str | os.PathLike, *, config: TrainConfig = TrainConfig(),
          val: str | os.PathLike | None = None, log_path: str | os.PathLike | None = None, resume: bool = False,
          force: bool = False, progress: bool = False) -> TrainResult:
    """Train `config.arch` on `data`, checkpointing to `output` after every epoch; under torchrun, with DDP.

    `log_path` (default: `output` with suffix `.jsonl`) gets the config line, then one line per epoch.
    `resume` continues from the epoch saved in `output` (same data, architecture and recipe required;
    `config.epochs` may rise).
    """
    config.validate()
    with dist.distributed_session() as device:
        return _train(Path(data), Path(output), config, Path(val) if val else None,
                      Path(log_path) if log_path else Path(output).with_suffix(".jsonl"), resume, force, progress,
                      device)


def _open_inputs(data: Path, output: Path, config: TrainConfig, val: Path | None, log_path: Path, resume: bool,
                 force: bool) -> tuple[Beton, str, dict | None]:
    """Open and check the training file (and the validation file, the outputs, the batch size per process):
    the opened file, its fingerprint, and the checkpoint state to resume from (None without `resume`)."""
    beton = open_beton(data)
    num_classes = beton.num_classes
    if beton.num_samples == 0 or int(beton.labels.max()) >= num_classes:
        raise InputError(f"{data} holds no samples or labels beyond its {num_classes} classes.")
    val_beton = open_beton(val) if val else None
    world = dist.world_size()
    if val_beton is not None:
        _check_val(val_beton, beton)
        if val_beton.num_samples < world:  # each process validates a share of the file: none may be empty
            raise InputError(f"Validation file {val} holds {val_beton.num_samples} image(s), fewer than the {world} "
                             "processes that share it; give a larger validation file or fewer processes.")
    check_output_path(output, force=force or resume, inputs=(data, val))
    if os.path.realpath(log_path) == os.path.realpath(output):  # also through a linked folder
        raise InputError(f"The log would be written over the checkpoint {output}; give -o a .pt name or --log "
                         "another path.")
    check_output_path(log_path, force=force or resume, inputs=(data, val, output))
    data_fp = fingerprint(beton)
    dist.check_same_inputs({f"The training file {data}": data_fp,
                            **({f"The validation file {val}": fingerprint(val_beton)} if val_beton else {})})
    if val_beton is not None and dist.is_main() and (os.path.samefile(data, val) or fingerprint(val_beton) == data_fp):
        log.warning("the validation file %s holds the training file's samples: its top-1 measures fit, not accuracy "
                    "on held-out images", val)
    ckpt = (resume_state(output, config, data, data_fp, num_classes, known_fingerprints(beton, data_fp))
            if resume else None)
    per_rank = math.ceil(beton.num_samples / world)
    if config.batch_size > per_rank:
        raise InputError(f"--batch-size {config.batch_size} is larger than the {per_rank} samples each of the "
                         f"{world} process(es) gets from {data}; use a smaller batch.")
    return beton, data_fp, ckpt


def _model_and_optimizer(config: TrainConfig, num_classes: int, image_size: int | None, ckpt: dict | None, device,
                         precision: str, world: int, peak_lr: float):
    """The model (DDP-wrapped under torchrun), its optimizer and the fp16 grad scaler, on `device`; with
    `ckpt` (a resume) all three continue from the checkpoint's state."""
    import torch

    from .models import create_model

    model = create_model(config.arch, num_classes, small_input=config.small_input, blurpool=config.blurpool,
                         image_size=image_size)
    if ckpt:
        model.load_state_dict(ckpt["state_dict"])
    model = model.to(device=device, memory_format=torch.channels_last if device.type == "cuda" else
                     torch.contiguous_format)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.index is not None
                                                          else None)
    optimizer = make_optimizer(config, model.parameters(), peak_lr)
    scaler = grad_scaler(precision)
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer_state"])
        if ckpt["extra"].get("scaler_state"):
            scaler.load_state_dict(ckpt["extra"]["scaler_state"])
    return model, optimizer, scaler


def _train_epoch(model, loader, optimizer, scaler, criterion, config: TrainConfig, epoch: int, peak_lr: float,
                 device, precision: str, rank: int, show: bool) -> dict:
    """Train one epoch at its resolution, the learning rate set every step; its log record, with loss, top-1 and
    images summed over the ranks."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(config.seed * 1000 + epoch * 10 + rank)
    res = resolution_at(config, epoch)
    loader.set_resolution(res)
    model.train()
    iters = len(loader)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss x n, correct, n
    every = 1 if device.type == "cpu" else LOSS_CHECK_EVERY
    losses = torch.zeros(every, dtype=torch.float64, device=device)  # the steps' losses since the last read
    seen = 0  # counted on the host, as in evaluate()
    t0 = time.perf_counter()
    bar = tqdm(loader, total=iters, desc=f"epoch {epoch + 1}/{config.epochs} @{res}px", unit="batch",
               disable=not show, leave=False)
    for i, (x, y) in enumerate(bar):
        lr = lr_at(config, epoch + (i + 1) / iters, peak_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits, loss = train_step(model, optimizer, scaler, criterion, x, y, device, precision)
        sums[:2] += torch.stack([loss.detach().double() * len(y), logits.argmax(1).eq(y).sum().double()])
        seen += len(y)
        losses[i % every] = loss.detach()
        if (i + 1) % every == 0 or i + 1 == iters:
            _check_losses(losses[:i % every + 1], epoch, i - i % every, iters, config, peak_lr)
        if show and i % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}")
    sums[2] = seen
    dist.all_reduce_sum(sums)
    dist.synchronize(device)
    epoch_time = time.perf_counter() - t0
    loss_sum, correct, n = sums.tolist()
    return {"event": "epoch", "epoch": epoch, "res": res, "lr": lr, "train_loss": loss_sum / max(n, 1),
            "train_top1": correct / max(n, 1), "train_images": int(n), "epoch_time_s": epoch_time,
            "images_per_s": n / max(epoch_time, 1e-9)}


def _check_step(config: TrainConfig, peak_lr: float, eff_batch: int) -> None:
    """Refuse a peak learning rate the optimizer's step cannot compute in float32, in one sentence before any work:
    AdamW's divides it by its bias correction (1 - beta1 at the first step, 0.1 by default), so a peak within
    float32's range can still overflow there (it ended in 'internal error: RuntimeError: value cannot be converted to
    type float without overflow'); found by one step at the peak on a one-element tensor, as finetune checks."""
    import torch

    from .steps import make_optimizer

    p = torch.zeros(1, requires_grad=True)
    p.grad = torch.ones(1)
    try:
        make_optimizer(config, [p], peak_lr).step()
    except RuntimeError as exc:
        if "overflow" not in str(exc):
            raise
        raise InputError(f"--lr {config.lr:g} gives a peak learning rate of {peak_lr:g} at effective batch "
                         f"{eff_batch}, beyond what {config.optimizer}'s step can compute in float32; give a smaller "
                         "--lr.") from None


def _check_losses(losses, epoch: int, first_step: int, iters: int, config: TrainConfig, peak_lr: float) -> None:
    """Raise TrainingDiverged at the first NaN or infinite loss of `losses` (steps `first_step`...), on every rank
    alike: the losses are summed over the ranks first (a NaN on one rank is a NaN in the sum)."""
    values = dist.all_reduce_sum(losses.clone()).tolist()
    bad = next((j for j, v in enumerate(values) if not math.isfinite(v)), None)
    if bad is None:
        return
    step = first_step + bad
    lr = lr_at(config, epoch + (step + 1) / iters, peak_lr)
    loss = values[bad] / dist.world_size()
    raise TrainingDiverged(f"the loss was {loss} at epoch {epoch + 1} of {config.epochs}, step {step + 1} of "
                           f"{iters} (learning rate {lr:.4g}, peak {peak_lr:.4g})", epoch=epoch, step=step, loss=loss,
                           lr=lr)


def _check_parameters(model, epoch: int, config: TrainConfig) -> None:
    """Raise TrainingDiverged if a parameter holds a NaN or an infinity after the epoch (the last step's update:
    no loss of this epoch saw it). The same on every rank: DDP keeps the parameters equal."""
    from .checkpoint import nonfinite_tensors

    params = dict(getattr(model, "module", model).named_parameters())
    bad = nonfinite_tensors(params)
    if bad:
        raise TrainingDiverged(f"the last update of epoch {epoch + 1} of {config.epochs} made {len(bad)} of the "
                               f"{len(params)} parameter tensors non-finite (first: {bad[0]})", epoch=epoch,
                               step=None, loss=None, lr=None)


def _diverged(exc: TrainingDiverged, config: TrainConfig, precision: str, output: Path, log_path: Path,
              start_epoch: int, resume: bool) -> TrainingDiverged:
    """`exc` as the one sentence a user reads: what happened, what was kept, what to try."""
    if exc.epoch > start_epoch or resume:  # exc.epoch (from 0) epochs are saved: the last is epoch exc.epoch from 1
        kept = (f"the checkpoint {output} of epoch {exc.epoch} and its log {log_path} are kept as they were, "
                "not overwritten")
    else:
        kept = "no checkpoint or log was written"
    advice = f"lower --lr (now {config.lr:g} per 256 images)"
    if precision in ("fp16", "bf16"):
        advice += f", or train in float32 with --precision fp32 (this run used {precision} autocast)"
    return TrainingDiverged(f"Training diverged: {exc}; {kept}; {advice}.", epoch=exc.epoch, step=exc.step,
                            loss=exc.loss, lr=exc.lr)


def _train(data: Path, output: Path, config: TrainConfig, val: Path | None, log_path: Path, resume: bool,
           force: bool, progress: bool, device) -> TrainResult:
    """`train` inside the process group: checks, model, then per epoch train, evaluate, log and checkpoint."""
    import torch

    from .checkpoint import save_checkpoint
    from .loaders import IMAGENET_MEAN, IMAGENET_STD, eval_loader, train_loader

    image_size = _fixed_size(config, val is not None)
    beton, data_fp, ckpt = _open_inputs(data, output, config, val, log_path, resume, force)
    num_classes = beton.num_classes
    world, rank = dist.world_size(), dist.rank()
    start_epoch = int(ckpt["epoch"]) if ckpt else 0
    # read before any model is built: a log that cannot be continued is refused in a second
    jlog = (JsonLog.resume(log_path, start_epoch, ckpt["extra"].get("history", []) if ckpt else [])
            if resume else JsonLog(log_path, hold=True))

    torch.manual_seed(config.seed + rank)
    precision = resolve_precision(device, config.precision)
    if config.precision not in ("auto", precision) and dist.is_main():  # as score names it
        log.warning("--precision %s applies to CUDA; on %s training runs in %s", config.precision, device, precision)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    eff_batch = config.batch_size * world
    peak_lr = config.lr * eff_batch / 256
    top = float(np.finfo(np.float32).max)
    if peak_lr > top:  # torch's optimizers take it as a float32 scalar
        raise InputError(f"--lr {config.lr:g} gives a peak learning rate of {peak_lr:g} at effective batch "
                         f"{eff_batch}, beyond float32's range; give an --lr below {top * 256 / eff_batch:.3g}.")
    _check_step(config, peak_lr, eff_batch)
    dist.mark_progress()  # checks done; DDP's set-up is a collective: a rank refused above ends without waiting
    model, optimizer, scaler = _model_and_optimizer(config, num_classes, image_size, ckpt, device, precision, world,
                                                    peak_lr)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    kept_np = _kept_classes(beton)
    kept = None
    if kept_np is not None:
        kept = torch.zeros(num_classes, dtype=torch.bool, device=device)
        kept[torch.as_tensor(kept_np, device=device)] = True
    loader = train_loader(data, batch_size=config.batch_size, res=resolution_at(config, start_epoch),
                          workers=config.workers, device=device, distributed=world > 1, seed=config.seed)
    vloader = (eval_loader(val, batch_size=config.val_batch_size, res=config.val_res, workers=config.workers,
                           device=device, distributed=world > 1) if val else None)
    # FFCV's epoch counter drives its shuffle seed: continue it where the checkpoint stopped.
    loader.loader.next_epoch = start_epoch

    # what the run follows where the config leaves it to --epochs: the peak epoch (at most half of them) and the ramp
    used = {"effective_lr_peak_epoch": config.peak_epoch(),
            "effective_ramp": list(config.ramp())}
    recipe = {**asdict(config), "effective_batch_size": eff_batch, "effective_lr": peak_lr, **used,
              "world_size": world, **dist.launch_layout(), "precision": precision, "mean": list(IMAGENET_MEAN),
              "std": list(IMAGENET_STD)}
    jlog.write({"event": "resume" if resume else "config", "config": asdict(config), "data": str(data),
                "val": str(val) if val else None, "data_fingerprint": data_fp, "num_samples": beton.num_samples,
                "num_classes": num_classes, "kept_classes": None if kept_np is None else len(kept_np),
                "world_size": world, "effective_batch_size": eff_batch, "effective_lr": peak_lr, **used,
                "device": str(device), "precision": precision, "start_epoch": start_epoch})
    history = list(ckpt["extra"].get("history", [])) if ckpt else []
    show = progress and dist.is_main()
    started = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        try:
            record = _train_epoch(model, loader, optimizer, scaler, criterion, config, epoch, peak_lr, device,
                                  precision, rank, show)
            _check_parameters(model, epoch, config)
        except TrainingDiverged as exc:
            raise _diverged(exc, config, precision, output, log_path, start_epoch, resume) from None
        if vloader is not None:
            t1 = time.perf_counter()
            record.update(evaluate(model, vloader, device, precision, kept=kept))
            record["val_time_s"] = time.perf_counter() - t1
        history.append(record)
        with output_group():  # this epoch's log and checkpoint are placed together; a failure leaves the last pair
            jlog.write(record)
            if dist.is_main():
                best = max((h["val_top1"] for h in history if "val_top1" in h), default=None)
                save_checkpoint(output, arch=config.arch, num_classes=num_classes, state_dict=model.state_dict(),
                                recipe=recipe, data_fingerprint=data_fp, epoch=epoch + 1,
                                optimizer_state=optimizer.state_dict(), small_input=config.small_input,
                                blurpool=config.blurpool, image_size=image_size,
                                extra={"history": history, "best_val_top1": best,
                                       "scaler_state": scaler.state_dict(),
                                       "kept_classes": None if kept_np is None else kept_np.tolist(),
                                       "data": str(data)})
                jlog.release()  # from the first checkpoint on, the log is written as it grows
        if dist.is_main():
            log.info("epoch %d/%d: %s", epoch + 1, config.epochs, json.dumps(record, default=str))
        dist.mark_progress()  # rank 0 may fail alone above (its checkpoint cannot be written)
        dist.barrier()
    seconds = time.perf_counter() - started
    final = history[-1] if history else {}
    done = [h for h in history if h.get("epoch", -1) >= start_epoch]
    trained = sum(int(h["train_images"]) for h in done)
    return TrainResult(
        checkpoint=str(output), log=str(log_path) if log_path else None, arch=config.arch, num_classes=num_classes,
        num_samples=beton.num_samples, epochs=config.epochs, start_epoch=start_epoch, world_size=world,
        effective_batch_size=eff_batch, effective_lr=peak_lr, device=str(device), precision=precision,
        pruned=kept_np is not None, final=final,
        best_val_top1=max((h["val_top1"] for h in history if "val_top1" in h), default=None),
        images_per_second=trained / max(sum(h["epoch_time_s"] for h in done), 1e-9),
        last_epoch_images_per_second=float(done[-1]["images_per_s"]) if done else 0.0,
        seconds=seconds, images_trained=trained,
    )
