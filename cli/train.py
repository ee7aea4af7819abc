"""`dptool train`: pretrain a model on a .beton (ffcv-imagenet recipe), on CPU, GPU or under torchrun."""

from __future__ import annotations

import click

from dptool.distributed import launch_rank
from dptool.errors import MAX_SEED
from dptool.models import list_models
from dptool.recipe import RECIPES, TrainConfig, config_from_options
from dptool.train import train

from ._common import (
    CONTEXT_SETTINGS,
    counted,
    emit,
    force_option,
    json_option,
    precision_option,
    show_progress,
    workers_option,
)

__all__ = ["command"]

DEFAULTS = TrainConfig()  # the library's defaults, shown in --help


def _default(name: str) -> str:
    """The help's default of an option that --recipe sets: the library's, and the ViT recipe's."""
    def show(value) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)

    return f"  [default: {show(getattr(DEFAULTS, name))}; --recipe vit: {show(RECIPES['vit'][name])}]"


def _speed(r) -> str:
    """Training images/s over the run, and the last epoch's when the first one's compilation weighs on the mean."""
    text = f"{r.images_per_second:.0f} images/s"
    if r.epochs - r.start_epoch > 1:
        text += f" (last epoch {r.last_epoch_images_per_second:.0f})"
    return text


def _human(r) -> str:
    f = r.final
    val = f" val top-1 {f['val_top1']:.4f} top-5 {f['val_top5']:.4f}" if "val_top1" in f else ""
    if "val_top1_all" in f:
        val += f" (all classes: top-1 {f['val_top1_all']:.4f})"
    epochs = f"{r.epochs} epoch{'s' if r.epochs != 1 else ''}"
    return (f"{r.checkpoint}: {r.arch}, {epochs} on {counted(r.num_samples, 'images')} ({r.num_classes}-way head), "
            f"{r.world_size} process(es), effective batch {r.effective_batch_size}, lr {r.effective_lr:g}, "
            f"{_speed(r)}; last epoch loss {f.get('train_loss', float('nan')):.4f}{val}")


@click.command("train", context_settings=CONTEXT_SETTINGS)
@click.argument("data", type=click.Path(dir_okay=False, path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="Checkpoint, rewritten after every epoch.")
@click.option("--val", type=click.Path(dir_okay=False, path_type=str), help="Validation .beton, evaluated every epoch.")
@click.option("--recipe", type=click.Choice(sorted(RECIPES)), default=None,
              help="Defaults of --arch and the training options: resnet (ffcv-imagenet's ResNet recipe, SGD + linear "
                   "ramp) or vit (DP4TL's ViT-B/16: AdamW, 10 warm-up epochs + cosine, wd 0.3, LS 0.11, 100 epochs, "
                   "224 px, batch 100 per process); options given override it  [default: resnet]")
@click.option("--arch", type=click.Choice(list_models()), default=None,
              help="Architecture (*_small: 32-64 px stem)." + _default("arch"))
@click.option("--small-input", is_flag=True, help="3x3 stride-1 stem without max-pool (32-64 px images).")
@click.option("--blurpool", is_flag=True, help="Blur before strided convolutions (ffcv-imagenet's option).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Training epochs." + _default("epochs"))
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per step per process." + _default("batch_size"))
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default=None,
              help="SGD with momentum, or AdamW (decoupled weight decay)." + _default("optimizer"))
@click.option("--schedule", type=click.Choice(["ramp", "cosine"]), default=None,
              help="Learning rate after the warm-up: linear down to 0 (ramp) or a half cosine down to 0 (cosine)."
                   + _default("schedule"))
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Peak learning rate per 256 images of effective batch (--recipe vit: DP4TL's 3e-3 at its batch of "
                   "400)." + _default("lr"))
@click.option("--lr-peak-epoch", "--warmup-epochs", "lr_peak_epoch", type=click.FloatRange(min=0), default=None,
              help="Epochs of the linear warm-up from 0 to the peak learning rate (at most half of --epochs)."
                   + _default("lr_peak_epoch"))
@click.option("--momentum", type=click.FloatRange(0, 1), default=DEFAULTS.momentum,
              help="SGD momentum, or AdamW's beta1 (beta2 0.999).")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=None,
              help="Weight decay (all parameters)." + _default("weight_decay"))
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Label smoothing." + _default("label_smoothing"))
@click.option("--min-res", type=click.IntRange(min=8), default=None,
              help="First training resolution, px." + _default("min_res"))
@click.option("--max-res", type=click.IntRange(min=8), default=None,
              help="Last training resolution, px." + _default("max_res"))
@click.option("--start-ramp", type=click.IntRange(min=0), default=None,
              help="Epoch where resizing starts  [default: epochs*11/16]")
@click.option("--end-ramp", type=click.IntRange(min=0), default=None,
              help="Epoch where --max-res is reached  [default: epochs*13/16]")
@click.option("--val-res", type=click.IntRange(min=8), default=None,
              help="Validation resolution (224/256 centre crop)." + _default("val_res"))
@click.option("--val-batch-size", type=click.IntRange(min=1), default=DEFAULTS.val_batch_size,
              help="Validation batch per process.")
@precision_option()
@click.option("--seed", type=click.IntRange(0, MAX_SEED),
              default=DEFAULTS.seed, help="Seed of initialisation, sample order and crops and flips.")
@click.option("--log", "log_path", type=click.Path(dir_okay=False, path_type=str),
              help="JSON-lines log  [default: OUTPUT with .jsonl]")
@click.option("--resume", is_flag=True,
              help="Continue from the epoch saved in OUTPUT (same data, arch and recipe; --epochs may rise).")
@workers_option
@force_option
@json_option
def command(data, output, val, log_path, resume, force, as_json, **options):
    """Pretrain a classifier on a .beton; checkpoint and log every epoch.

    \b
    dptool train imagenet_train.beton --val imagenet_val.beton --arch resnet18 --epochs 16 -o rn18.pt
    torchrun --nproc_per_node 8 -m dptool train in_p60.beton --arch resnet50 -o rn50_p60.pt
    torchrun --nproc_per_node 4 -m dptool train in_p60.beton --val val.beton --recipe vit -o vit.pt
    """
    config = config_from_options(**options)
    result = train(data, output, config=config, val=val, log_path=log_path, resume=resume, force=force,
                   progress=show_progress(as_json))
    if launch_rank() == 0:  # under torchrun every rank returns the same result; print it once
        emit(result, as_json, _human)
