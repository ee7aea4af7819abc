"""`dptool finetune`: linear probe or full finetune of a checkpoint on a target task."""

from __future__ import annotations

import click

from dptool.errors import MAX_SEED
from dptool.finetune import CHECKPOINT_EVERY_S, FinetuneConfig, finetune
from dptool.models import list_models
from dptool.runlog import resumed_text

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

DEFAULTS = FinetuneConfig()  # the library's defaults, shown in --help


def _human(r) -> str:
    epochs = f"{r.epochs} epoch{'s' if r.epochs != 1 else ''}"
    lines = [f"{r.mode.upper()} of {r.checkpoint} on {counted(r.target_classes, 'classes')}, {epochs}, "
             f"{r.train_images} train / {r.val_images} val / {r.test_images} test images"
             + (f", {resumed_text([r.start_epoch])}" if r.start_epoch else ""),
             f"final-epoch test top-1:       {r.final_test_top1:.4f}",
             f"best-over-epochs test top-1:  {r.best_test_top1:.4f} (epoch {r.best_test_epoch + 1} of {r.epochs}; "
             f"selected on the test set, as the paper reports)"]
    if r.best_val_top1 is not None:  # epochs counted from 1 here, from 0 in --json (as the history's)
        lines.append(f"test top-1 at best val epoch: {r.test_top1_at_best_val:.4f} (epoch {r.best_val_epoch + 1} of "
                     f"{r.epochs}, val top-1 {r.best_val_top1:.4f})")
    return "\n".join(lines)


@click.command("finetune", context_settings=CONTEXT_SETTINGS)
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=str))
@click.argument("train_data", metavar="TRAIN.beton", type=click.Path(dir_okay=False, path_type=str))
@click.argument("test_data", metavar="TEST.beton", type=click.Path(dir_okay=False, path_type=str))
@click.option("--mode", type=click.Choice(["lp", "ff"]), default=DEFAULTS.mode,
              help="lp: frozen backbone; ff: all weights.")
@click.option("--arch", type=click.Choice(list_models()), default=None,
              help="Read CHECKPOINT as weights of this architecture: a state dict or a self-supervised checkpoint "
                   "(MoCo, DINO, SwAV)  [default: CHECKPOINT is a dptool checkpoint]")
@click.option("--weights-prefix", default=None,
              help="With --arch: the prefix of the backbone's entries, when the file holds several copies.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs  [default: lp 50, ff 200]")
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULTS.batch_size, help="Training batch.")
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default=None, help="Optimizer  [default: adam]")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Learning rate (cosine decay)  [default: lp 0.01; ff adam 1e-4, sgd 0.1]")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=None,
              help="Weight decay  [default: adam 0, sgd 5e-4]")
@click.option("--momentum", type=click.FloatRange(0, 1), default=DEFAULTS.momentum, help="SGD momentum.")
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=DEFAULTS.label_smoothing,
              help="Label smoothing.")
@click.option("--res", type=click.IntRange(min=8), default=DEFAULTS.res, help="Train and test resolution, px.")
@click.option("--test-batch-size", type=click.IntRange(min=1), default=DEFAULTS.test_batch_size,
              help="Evaluation batch; with --mode lp also the batch its features are extracted in.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=DEFAULTS.val_fraction,
              help="Hold out this fraction of each training class for model selection (at least one image of a "
                   "class of two or more; never a whole class).")
@precision_option()
@click.option("--seed", type=click.IntRange(0, MAX_SEED),
              default=DEFAULTS.seed, help="Seed of the head, the split, the sample order and the crops.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=str), help="Write the finetuned checkpoint.")
@click.option("--resume", is_flag=True,
              help="Continue the stopped run whose checkpoint OUTPUT is (same data, checkpoint and recipe).")
@click.option("--checkpoint-every", type=click.FloatRange(min=0), default=CHECKPOINT_EVERY_S,
              help="With -o: write the checkpoint (for --resume) once this many seconds of epochs have passed since "
                   "the last; 0: after every epoch.")
@click.option("--log", "log_path", type=click.Path(dir_okay=False, path_type=str),
              help="JSON-lines log  [default: OUTPUT with .jsonl when -o is given]")
@workers_option
@force_option
@json_option
def command(checkpoint, train_data, test_data, arch, weights_prefix, output, resume, checkpoint_every, log_path, force,
            as_json, **options):
    """Transfer a checkpoint to a target task: linear probe (lp) or full finetune (ff).

    \b
    dptool finetune rn101_p60.pt flowers_train.beton flowers_test.beton --mode lp
    dptool finetune rn18.pt pets_train.beton pets_test.beton --mode ff --optimizer sgd --val-fraction 0.1
    dptool finetune moco_v2_800ep_pretrain.pth.tar flowers_train.beton flowers_test.beton --arch resnet50
    dptool finetune rn18.pt pets_train.beton pets_test.beton --mode ff -o ff.pt --resume   # after a stop
    """
    config = FinetuneConfig(**options)
    result = finetune(checkpoint, train_data, test_data, config=config, output=output, log_path=log_path,
                      force=force, progress=show_progress(as_json), arch=arch, weights_prefix=weights_prefix,
                      resume=resume, checkpoint_every=checkpoint_every)
    emit(result, as_json, _human)
