"""`dptool train`: pretrain a model on a .beton (ffcv-imagenet recipe), on CPU, GPU or under torchrun."""

from __future__ import annotations

import click

from dptool.distributed import launch_rank
from dptool.errors import MAX_SEED
from dptool.models import list_models
from dptool.train import TrainConfig, config_from_options, train

from ._common import CONTEXT_SETTINGS, emit, force_option, json_option, precision_option, show_progress, workers_option

__all__ = ["command"]

DEFAULTS = TrainConfig()  # the library's defaults, shown in --help


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
    return (f"{r.checkpoint}: {r.arch}, {epochs} on {r.num_samples} images ({r.num_classes}-way head), "
            f"{r.world_size} process(es), effective batch {r.effective_batch_size}, lr {r.effective_lr:g}, "
            f"{_speed(r)}; last epoch loss {f.get('train_loss', float('nan')):.4f}{val}")


@click.command("train", context_settings=CONTEXT_SETTINGS)
@click.argument("data", type=click.Path(dir_okay=False, path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="Checkpoint, rewritten after every epoch.")
@click.option("--val", type=click.Path(dir_okay=False, path_type=str), help="Validation .beton, evaluated every epoch.")
@click.option("--arch", type=click.Choice(list_models()), default=DEFAULTS.arch,
              help="Architecture (*_small: 32-64 px stem).")
@click.option("--small-input", is_flag=True, help="3x3 stride-1 stem without max-pool (32-64 px images).")
@click.option("--blurpool", is_flag=True, help="Blur before strided convolutions (ffcv-imagenet's option).")
@click.option("--epochs", type=click.IntRange(min=1), default=DEFAULTS.epochs, help="Training epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULTS.batch_size,
              help="Images per step per process.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS.lr,
              help="Peak learning rate per 256 images of effective batch.")
@click.option("--lr-peak-epoch", type=click.FloatRange(min=0), default=DEFAULTS.lr_peak_epoch,
              help="Epoch of the peak of the linear ramp up and down (at most half of --epochs).")
@click.option("--momentum", type=click.FloatRange(0, 1), default=DEFAULTS.momentum, help="SGD momentum.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=DEFAULTS.weight_decay,
              help="Weight decay (all parameters).")
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=DEFAULTS.label_smoothing,
              help="Label smoothing.")
@click.option("--min-res", type=click.IntRange(min=8), default=DEFAULTS.min_res, help="First training resolution, px.")
@click.option("--max-res", type=click.IntRange(min=8), default=DEFAULTS.max_res, help="Last training resolution, px.")
@click.option("--start-ramp", type=click.IntRange(min=0), default=None,
              help="Epoch where resizing starts  [default: epochs*11/16]")
@click.option("--end-ramp", type=click.IntRange(min=0), default=None,
              help="Epoch where --max-res is reached  [default: epochs*13/16]")
@click.option("--val-res", type=click.IntRange(min=8), default=DEFAULTS.val_res,
              help="Validation resolution (224/256 centre crop).")
@click.option("--val-batch-size", type=click.IntRange(min=1), default=DEFAULTS.val_batch_size,
              help="Validation batch per process.")
@precision_option()
@click.option("--seed", type=click.IntRange(0, MAX_SEED),
              default=DEFAULTS.seed, help="Seed of initialisation, sample order and crops and flips.")
@click.option("--log", "log_path", type=click.Path(dir_okay=False, path_type=str),
              help="JSON-lines log  [default: OUTPUT with .jsonl]")
@click.option("--resume", is_flag=True, help="Continue from the epoch saved in OUTPUT (same data and arch).")
@workers_option
@force_option
@json_option
def command(data, output, val, log_path, resume, force, as_json, **options):
    """Pretrain a classifier on a .beton; checkpoint and log every epoch.

    \b
    dptool train imagenet_train.beton --val imagenet_val.beton --arch resnet18 --epochs 16 -o rn18.pt
    torchrun --nproc_per_node 8 -m dptool train in_p60.beton --arch resnet50 -o rn50_p60.pt
    """
    config = config_from_options(**options)
    result = train(data, output, config=config, val=val, log_path=log_path, resume=resume, force=force,
                   progress=show_progress(as_json))
    if launch_rank() == 0:  # under torchrun every rank returns the same result; print it once
        emit(result, as_json, _human)
