"""The training recipe as plain data: `TrainConfig`, the named `RECIPES`, and the schedules they set.

By default SGD with momentum; the learning rate ramps linearly from 0 to its peak at `lr_peak_epoch`
and back to 0 at the end (`schedule="ramp"`), or, with `schedule="cosine"`, ramps up the same way and then follows a
half cosine down to 0 at the end; stepped every iteration; label smoothing; progressive resizing from `min_res` to
`max_res`. `RECIPES["vit"]` is DP4TL's ViT-B/16 recipe (AdamW, 10 warm-up epochs then cosine, weight decay 0.3).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np

from . import distributed as dist
from .errors import InputError, check_number, check_seed

__all__ = ["TrainConfig", "RECIPES", "config_from_options", "resolution_at", "lr_at"]

log = logging.getLogger(__name__)


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


def config_from_options(*, recipe: str | None = None, **options) -> TrainConfig:
    """A TrainConfig from CLI options: the `RECIPES` entry `recipe` (None: "resnet", the defaults), with the
    options that are not None on top. Warns when a ViT is given the SGD recipe without `recipe` naming it."""
    if recipe is not None and recipe not in RECIPES:
        raise InputError(f"Unknown recipe {recipe!r}; accepted: {', '.join(sorted(RECIPES))}.")
    config = replace(TrainConfig(), **{**RECIPES.get(recipe, {}), **{k: v for k, v in options.items()
                                                                      if v is not None}})
    _check_res_pair(config, recipe, {k for k, v in options.items() if v is not None})
    if recipe is None and config.arch.startswith("vit") and config.optimizer == "sgd" and dist.launch_rank() == 0:
        log.warning("%s trains with the ResNet recipe (SGD, linear ramp, weight decay %g), which ViTs train poorly "
                    "with; --recipe vit gives DP4TL's ViT-B/16 recipe (AdamW, warm-up then cosine, weight decay 0.3), "
                    "--recipe resnet keeps this one without this warning", config.arch, config.weight_decay)
    return config


def _check_res_pair(config: TrainConfig, recipe: str | None, given: set[str]) -> None:
    """One InputError sentence when the one of --min-res/--max-res given crosses the other, which the user did not
    give: say where that one came from (--recipe vit's 224 or the default), which `validate`'s "got 224/160"
    does not."""
    if (config.min_res <= config.max_res or len(given & {"min_res", "max_res"}) != 1
            or min(config.min_res, config.max_res) < 8):  # under 8 px: validate's range sentence says it
        return
    mine, other = ("min_res", "max_res") if "min_res" in given else ("max_res", "min_res")
    origin = f"which --recipe {recipe} sets" if other in RECIPES.get(recipe, {}) else "its default"
    flag, other_flag = (f"--{name.replace('_', '-')}" for name in (mine, other))
    side, bound = ("above", "or more") if mine == "min_res" else ("below", "or less")
    raise InputError(f"{flag} {getattr(config, mine)} is {side} {other_flag} {getattr(config, other)}, {origin}; "
                     f"give {other_flag} {getattr(config, mine)} {bound} with it.")
