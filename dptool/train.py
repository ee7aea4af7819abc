"""Pretraining on a `.beton` with the ffcv-imagenet recipe, on a CPU, one GPU or many processes under torchrun.

The recipe (`TrainConfig`) is plain data: logged as the first line of the JSON-lines log and saved in every
checkpoint. By default SGD with momentum; the learning rate ramps linearly from 0 to its peak at `lr_peak_epoch`
and back to 0 at the end (`schedule="ramp"`), or, with `schedule="cosine"`, ramps up the same way and then follows a
half cosine down to 0 at the end; stepped every iteration; label smoothing; progressive resizing from `min_res` to
`max_res`. `RECIPES["vit"]` is DP4TL's ViT-B/16 recipe (AdamW, 10 warm-up epochs then cosine, weight decay 0.3).
A pruned `.beton` keeps its original labels and head width (the sidecar's `num_classes`); validation reports
accuracy on the val images of the kept classes (`val_top1`) and on all of them (`val_top1_all`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from . import distributed as dist
from .atomic import atomic_output, check_output_path, output_group
from .beton import Beton, check_same_classes, fingerprint, known_fingerprints, open_beton
from .errors import DptoolError, InputError, check_number, check_seed

__all__ = ["TrainConfig", "TrainResult", "RECIPES", "train", "config_from_options", "resolution_at", "lr_at",
           "evaluate", "autocast", "grad_scaler", "train_step", "resolve_precision", "JsonLog", "TrainingDiverged",
           "LOSS_CHECK_EVERY"]

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


@dataclass(frozen=True)
class TrainConfig:
    """Every training choice, with ffcv-imagenet's ResNet defaults (as in the DP4TL surrogate where they agree)."""

    arch: str = "resnet18"
    small_input: bool = False  # 3x3 stride-1 stem, no max-pool: for 32-64 px images
    blurpool: bool = False
    epochs: int = 16
    batch_size: int = 512  # per process; the effective batch is batch_size x world size
    # peak learning rate per 256 images of effective batch (linear scaling): ffcv-imagenet's and DP4TL's ResNet-18
    # peak is 0.5 at batch 1024, i.e. 0.125 per 256 (ffcv-imagenet's ResNet-50: 1.7 at 8 x 512, 0.106)
    lr: float = 0.125
    lr_peak_epoch: float = 2.0  # the end of the linear warm-up, for both schedules
    optimizer: str = "sgd"  # sgd (momentum `momentum`) | adamw (betas (`momentum`, 0.999), decoupled weight decay)
    schedule: str = "ramp"  # ramp (linear up, linear down to 0) | cosine (linear up, half cosine down to 0)
    momentum: float = 0.9
    weight_decay: float = 5e-5
    label_smoothing: float = 0.1
    min_res: int = 160
    max_res: int = 192
    start_ramp: int | None = None  # epoch where resizing starts; default round(epochs * 11/16) as ffcv's 16-epoch
    end_ramp: int | None = None  # epoch where max_res is reached; default round(epochs * 13/16)
    res_step: int = 32  # resolutions are rounded to a multiple of this (ffcv: 32)
    val_res: int = 256
    val_batch_size: int = 256
    workers: int = 0  # FFCV decoding threads; 0 = all cores
    precision: str = "auto"  # auto (bf16 on Ampere or newer GPUs, else fp16; fp32 on CPU) | fp32 | bf16 | fp16
    seed: int = 0

    def peak_epoch(self) -> float:
        """The epoch of the learning rate's peak (the end of the warm-up): `lr_peak_epoch`, at most half of
        `epochs`."""
        return min(self.lr_peak_epoch, self.epochs / 2)

    def ramp(self) -> tuple[int, int]:
        """(start_ramp, end_ramp) with the defaults filled in; a default never overrides the other end given (an
        --end-ramp before the default start starts the ramp there too, and the reverse)."""
        start = self.start_ramp if self.start_ramp is not None else round(self.epochs * 11 / 16)
        end = self.end_ramp if self.end_ramp is not None else round(self.epochs * 13 / 16)
        if self.start_ramp is None:
            return min(start, end), end
        return start, max(start, end)

    def validate(self) -> None:
        """One InputError sentence for the first bad value."""
        if self.epochs < 1:
            raise InputError(f"--epochs must be at least 1, got {self.epochs}.")
        if self.batch_size < 1 or self.val_batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {min(self.batch_size, self.val_batch_size)}.")
        if self.start_ramp is not None and self.end_ramp is not None and self.end_ramp < self.start_ramp:
            raise InputError(f"--end-ramp {self.end_ramp} is before --start-ramp {self.start_ramp}; the resizing ramp "
                             "must end at or after its start.")
        if not 8 <= self.min_res <= self.max_res:
            raise InputError(f"--min-res/--max-res must satisfy 8 <= min <= max, got {self.min_res}/{self.max_res}.")
        check_seed("--seed", self.seed)
        check_number("--lr", self.lr, low=0, low_open=True)
        check_number("--lr-peak-epoch", self.lr_peak_epoch, low=0)
        check_number("--momentum", self.momentum, low=0, high=1)
        if self.optimizer not in ("sgd", "adamw"):
            raise InputError(f"--optimizer must be sgd or adamw, got {self.optimizer!r}.")
        if self.schedule not in ("ramp", "cosine"):
            raise InputError(f"--schedule must be ramp or cosine, got {self.schedule!r}.")
        if self.optimizer == "adamw" and self.momentum >= 1:
            raise InputError(f"--momentum is AdamW's beta1 with --optimizer adamw and must be below 1, got "
                             f"{self.momentum}.")
        check_number("--weight-decay", self.weight_decay, low=0)
        if self.res_step < 1 or self.val_res < 8 or self.workers < 0:
            raise InputError(f"res_step must be >= 1, --val-res >= 8 and --workers >= 0, got {self.res_step}, "
                             f"{self.val_res} and {self.workers}.")
        if not 0 <= self.label_smoothing < 1:
            raise InputError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}.")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise InputError(f"--precision must be auto, fp32, bf16 or fp16, got {self.precision!r}.")


#: Named recipes (`dptool train --recipe`): the TrainConfig fields each sets; options given with it override them.
#: "vit" is DP4TL's vit_b_16_100 (dp4tl.md section 7): ViT-B/16, 100 epochs, batch 100 per GPU on 4 GPUs, AdamW at
#: 3e-3 for that batch of 400 (1.92e-3 per 256 images, as --lr counts), weight decay 0.3 on every parameter, label
#: smoothing 0.11, 10 linear warm-up epochs then cosine to 0, 224 px throughout.
RECIPES: dict[str, dict] = {
    "resnet": {},
    "vit": {"arch": "vit_b_16", "optimizer": "adamw", "schedule": "cosine", "epochs": 100, "batch_size": 100,
            "lr": 1.92e-3, "lr_peak_epoch": 10.0, "weight_decay": 0.3, "label_smoothing": 0.11, "min_res": 224,
            "max_res": 224, "val_res": 224},
}


def resolution_at(config: TrainConfig, epoch: int) -> int:
    """Training resolution of `epoch`: linear from min_res to max_res over the ramp, rounded as ffcv does."""
    start, end = config.ramp()
    res = float(np.interp(epoch, [start, end], [config.min_res, config.max_res]))
    res = int(np.round(res / config.res_step)) * config.res_step
    return int(min(max(res, config.min_res), config.max_res))


def lr_at(config: TrainConfig, progress: float, peak_lr: float) -> float:
    """Learning rate at `progress` epochs (fractional): linear from 0 to `peak_lr` at `peak_epoch()`, then down to 0
    at the last epoch, linearly (`ramp`) or along a half cosine (`cosine`)."""
    peak_epoch, epochs = config.peak_epoch(), float(config.epochs)
    if config.schedule == "cosine" and progress > peak_epoch:
        done = min((progress - peak_epoch) / (epochs - peak_epoch), 1.0)
        return float(peak_lr * 0.5 * (1.0 + math.cos(math.pi * done)))
    return float(np.interp(progress, [0.0, peak_epoch, epochs], [0.0, peak_lr, 0.0]))


def autocast(device, precision: str):
    """Autocast context for `precision` on `device` (fp32 or a CPU: no autocast)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(device, precision))
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def grad_scaler(precision: str):
    """The grad scaler of a training loop: active for fp16 (whose small gradients underflow), a pass-through
    otherwise."""
    import torch

    return torch.amp.GradScaler("cuda", enabled=precision == "fp16")


def train_step(model, optimizer, scaler, criterion, x, y, device, precision: str):
    """One optimizer step on the batch (`x`, `y`): forward under autocast at `precision`, backward through
    `scaler` (`grad_scaler`); returns the logits and the loss. `train`, `finetune` and `bench` all step this way."""
    with autocast(device, precision):
        logits = model(x)
        loss = criterion(logits, y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return logits, loss


def resolve_precision(device, precision: str) -> str:
    """`auto` -> bf16 on a CUDA device that computes it natively (Ampere, compute capability 8, or later; else
    fp16), fp32 on the CPU."""
    import torch

    if torch.device(device).type != "cuda":
        return "fp32"
    if precision == "auto":
        # not torch.cuda.is_bf16_supported(): recent torch also says yes where bf16 is only emulated (V100, T4),
        # where bf16 autocast is many times slower than fp16
        native = bool(torch.version.hip) or torch.cuda.get_device_capability(torch.device(device))[0] >= 8
        return "bf16" if native else "fp16"
    return precision


def evaluate(model, loader, device, precision: str, *, kept=None) -> dict:
    """Top-1/top-5 of `model` over `loader`, summed over ranks, every rank with rank 0's buffers (the model rank 0
    checkpoints). With `kept` (bool (C,) tensor), `val_*` counts only images whose label is a kept class and
    `val_*_all` every image."""
    import torch

    model = getattr(model, "module", model)  # evaluate the plain module under DDP: no buffer sync per batch
    dist.broadcast_buffers(model)  # ...but rank 0's BatchNorm statistics on every rank: the model it checkpoints
    model.eval()
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # top1, top5, n (kept), top1, top5, n (all)
    seen = 0  # counted on the host: a tensor made from a Python number per batch would be a blocking copy
    with torch.no_grad(), autocast(device, precision):
        for x, y in loader:
            seen += len(y)
            logits = model(x)
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit1 = top[:, 0].eq(y)
            hit5 = top.eq(y[:, None]).any(dim=1)
            mask = kept[y] if kept is not None else torch.ones_like(hit1)
            sums[:5] += torch.stack([(hit1 & mask).sum(), (hit5 & mask).sum(), mask.sum(),
                                     hit1.sum(), hit5.sum()]).double()
    sums[5] = seen
    dist.all_reduce_sum(sums)
    s = sums.tolist()
    out = {"val_top1": s[0] / max(s[2], 1), "val_top5": s[1] / max(s[2], 1), "val_images": int(s[2])}
    if kept is not None:
        out.update({"val_top1_all": s[3] / max(s[5], 1), "val_top5_all": s[4] / max(s[5], 1),
                    "val_images_all": int(s[5])})
    return out


class JsonLog:
    """A JSON-lines log rewritten atomically after each record (an interrupted run leaves the last complete one).

    With `hold`, records stay in memory until `release()`: a run interrupted before its first checkpoint then
    leaves no log behind that would block the rerun (and that no --resume could continue).
    """

    def __init__(self, path: str | os.PathLike | None, records: list[dict] | None = None, *, hold: bool = False):
        self.path = Path(path) if path else None
        self.records: list[dict] = list(records or [])
        self.hold = hold

    @classmethod
    def resume(cls, path: str | os.PathLike | None, before_epoch: int, history: Sequence[dict] = ()) -> JsonLog:
        """Reopen an earlier log, keeping records of epochs before `before_epoch`, held until the first epoch's
        record: a resume stopped or diverged before it leaves the log as it was. A line that is not a log record
        is an InputError naming it; an incomplete last line (a copy of the log made while it was rewritten) is left
        out with a warning, as `dptool info` leaves it out, and the epochs it held are taken from `history`, the
        checkpoint's records of the epochs it trained."""
        from .runlog import read_records

        if not path or not Path(path).exists():
            return cls(path, [], hold=True)
        try:
            found, partial = read_records(path)
        except InputError as exc:
            text = str(exc).rstrip(".")
            raise InputError(f"Cannot resume: {text[:1].lower() + text[1:] if text.startswith('Line ') else text}; "
                             "mend it, or give --log a new file.") from exc
        records = [r for r in found if r["event"] != "epoch" or r["epoch"] < before_epoch]
        if partial:
            logged = max((r["epoch"] for r in records if r["event"] == "epoch"), default=-1)
            restored = [h for h in history if isinstance(h.get("epoch"), int) and logged < h["epoch"] < before_epoch]
            records += [{"event": "epoch", **h} for h in restored]
            if dist.is_main():
                log.warning("the last line of %s is incomplete (a copy made while it was written?); it is left out%s",
                            path, f", and the checkpoint's records of the {len(restored)} epoch(s) missing from the "
                            "log put in its place" if restored else "")
        return cls(path, _without_idle_resumes(records), hold=True)

    def write(self, record: dict) -> None:
        """Append `record` (on rank 0; other ranks keep nothing)."""
        if not dist.is_main():
            return
        self.records.append(record)
        self._flush()

    def release(self) -> None:
        """Stop holding: write the records so far, and every later one as it comes."""
        if self.hold:
            self.hold = False
            self._flush()

    def _flush(self) -> None:
        if self.path is not None and not self.hold and dist.is_main():
            with atomic_output(self.path) as tmp:
                tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in self.records))


def _without_idle_resumes(records: list[dict]) -> list[dict]:
    """`records` less the resume lines that no epoch record follows (before the next resume line, or the end): resumes
    that trained no epoch, which `train` wrote as they started before it held the line until the first epoch. The
    resume about to be written supersedes them; `dptool info` would show each as a resume."""
    kept: list[dict] = []
    for rec in records:
        if rec["event"] == "resume" and kept and kept[-1]["event"] == "resume":
            kept.pop()
        kept.append(rec)
    return kept[:-1] if kept and kept[-1]["event"] == "resume" else kept


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


# what a resumed run must share with the checkpoint's: the rest of its trajectory depends on them
_RESUME_FIXED = ("optimizer", "schedule", "batch_size", "lr", "lr_peak_epoch", "momentum", "weight_decay",
                 "label_smoothing", "min_res", "max_res", "start_ramp", "end_ramp", "res_step", "seed")
# what checkpoints written before a field was recorded followed
_BEFORE_FIELD = {"optimizer": "sgd", "schedule": "ramp"}


def _flag(name: str) -> str:
    """The command-line option of a `TrainConfig` field (`res_step` has none)."""
    return name if name == "res_step" else "--" + name.replace("_", "-")


def _resume_state(output: Path, config: TrainConfig, data: Path, data_fp: str, num_classes: int,
                  known: set[str]) -> dict:
    """The checkpoint to resume from, after checking it continues this run (`known`: the data's fingerprints)."""
    from .checkpoint import check_finite_weights, read_checkpoint
    from .models import canonical_name

    if not output.exists():
        raise InputError(f"Cannot resume: checkpoint {output} does not exist (run without --resume first).")
    ckpt = read_checkpoint(output)
    want = canonical_name(config.arch, config.small_input)
    if (ckpt["arch"], bool(ckpt["small_input"])) != want or bool(ckpt.get("blurpool")) != config.blurpool:
        def onoff(flag) -> str:
            return "on" if flag else "off"

        raise InputError(f"Cannot resume: {output} holds a {ckpt['arch']} with small input "
                         f"{onoff(ckpt['small_input'])} and blurpool {onoff(ckpt.get('blurpool'))}, but this run asks "
                         f"for a {want[0]} with small input {onoff(want[1])} and blurpool {onoff(config.blurpool)}; "
                         "give the --arch, --small-input and --blurpool it was trained with.")
    if ckpt.get("data_fingerprint") not in known or int(ckpt["num_classes"]) != num_classes:
        trained_on = (ckpt.get("extra") or {}).get("data") or "another file"
        raise InputError(f"Cannot resume: {output} was trained on {trained_on} with fingerprint "
                         f"{ckpt.get('data_fingerprint')} ({ckpt['num_classes']} classes), but {data} has "
                         f"{data_fp} ({num_classes} classes); resume on the data it was trained on.")
    if ckpt.get("optimizer_state") is None:
        raise InputError(f"Cannot resume: {output} holds no optimizer state (dptool finetune writes such "
                         "checkpoints); only a checkpoint of dptool train can be resumed.")
    if int(ckpt["epoch"]) >= config.epochs:
        raise InputError(f"Cannot resume: {output} already holds {ckpt['epoch']} epochs; raise --epochs above that.")
    recipe = {**_BEFORE_FIELD, **(ckpt.get("recipe") or {})} if ckpt.get("recipe") else {}
    # a ramp left to its default (None) follows --epochs, which may change
    changed = [name for name in _RESUME_FIXED
               if recipe.get(name) is not None and recipe[name] != getattr(config, name)]
    if changed:
        def flags(values) -> str:
            return " ".join(f"{_flag(name)} {values(name)}" for name in changed)

        preset = next((f" (--recipe {name} sets them)" for name, values in RECIPES.items()
                       if set(changed) <= set(values) and all(values[k] == recipe[k] for k in changed)), "")
        raise InputError(f"Cannot resume: {output} was trained with {flags(recipe.get)} but this run gives "
                         f"{flags(lambda name: getattr(config, name))}; give the options it was trained with{preset} "
                         "(--epochs, --val, --val-res, --val-batch-size, --workers and --precision may change).")
    was, world = recipe.get("world_size"), dist.world_size()
    if was is not None and int(was) != world:  # the effective batch, and the peak learning rate scaled by it
        how = f"torchrun --nproc_per_node {was}" if int(was) > 1 else "one process, without torchrun"
        raise InputError(f"Cannot resume: {output} was trained by {was} process{'es' if int(was) > 1 else ''} "
                         f"(effective batch {recipe.get('effective_batch_size')}), but this run has {world} "
                         f"(effective batch {config.batch_size * world}); resume it as it ran ({how}).")
    # the momentum buffers too: a NaN there would turn the first resumed step's weights into NaN
    moments = {f"optimizer.{i}.{k}": v for i, st in (ckpt["optimizer_state"].get("state") or {}).items()
               for k, v in st.items()}
    check_finite_weights({**ckpt["state_dict"], **moments}, f"Cannot resume: checkpoint {output}")
    return ckpt


def train(data: str | os.PathLike, output: str | os.PathLike, *, config: TrainConfig = TrainConfig(),
          val: str | os.PathLike | None = None, log_path: str | os.PathLike | None = None, resume: bool = False,
          force: bool = False, progress: bool = False) -> TrainResult:
    """Train `config.arch` on `data`, checkpointing to `output` after every epoch; under torchrun, with DDP.

    `log_path` (default: `output` with suffix `.jsonl`) gets the config line, then one line per epoch.
    `resume` continues from the epoch saved in `output` (same data and architecture required).
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
    ckpt = (_resume_state(output, config, data, data_fp, num_classes, known_fingerprints(beton, data_fp))
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
    optimizer = _optimizer(config, model.parameters(), peak_lr)
    scaler = grad_scaler(precision)
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer_state"])
        if ckpt["extra"].get("scaler_state"):
            scaler.load_state_dict(ckpt["extra"]["scaler_state"])
    return model, optimizer, scaler


def _optimizer(config: TrainConfig, params, lr: float):
    """`config.optimizer` over `params`, weight decay on every parameter (as DP4TL, biases and norms included):
    SGD with `momentum`, or AdamW with betas (`momentum`, 0.999) and its decoupled decay."""
    import torch

    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(config.momentum, 0.999), weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)


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
    if exc.epoch > start_epoch or resume:
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
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    eff_batch = config.batch_size * world
    peak_lr = config.lr * eff_batch / 256
    top = float(np.finfo(np.float32).max)
    if peak_lr > top:  # torch's optimizers take it as a float32 scalar
        raise InputError(f"--lr {config.lr:g} gives a peak learning rate of {peak_lr:g} at effective batch "
                         f"{eff_batch}, beyond float32's range; give an --lr below {top * 256 / eff_batch:.3g}.")
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
              "world_size": world, "precision": precision, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
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


def config_from_options(*, recipe: str | None = None, **options) -> TrainConfig:
    """A TrainConfig from CLI options: the `RECIPES` entry `recipe` (None: "resnet", the defaults), with the
    options that are not None on top. Warns when a ViT is given the SGD recipe without `recipe` naming it."""
    if recipe is not None and recipe not in RECIPES:
        raise InputError(f"Unknown recipe {recipe!r}; accepted: {', '.join(sorted(RECIPES))}.")
    config = replace(TrainConfig(), **{**RECIPES.get(recipe, {}), **{k: v for k, v in options.items()
                                                                      if v is not None}})
    if recipe is None and config.arch.startswith("vit") and config.optimizer == "sgd" and dist.launch_rank() == 0:
        log.warning("%s trains with the ResNet recipe (SGD, linear ramp, weight decay %g), which ViTs train poorly "
                    "with; --recipe vit gives DP4TL's ViT-B/16 recipe (AdamW, warm-up then cosine, weight decay 0.3), "
                    "--recipe resnet keeps this one without this warning", config.arch, config.weight_decay)
    return config
