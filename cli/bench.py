"""`dptool bench`: throughput of pruned pretraining and of the data path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from dptool.atomic import atomic_output, check_output_path, check_plot_path, output_group
from dptool.bench import bench_loader, bench_pretrain, plot_pretrain
from dptool.distributed import launch_rank
from dptool.errors import InputError
from dptool.models import list_models
from dptool.recipe import RECIPES

from ._common import (
    CONTEXT_SETTINGS,
    Group,
    emit,
    force_option,
    json_option,
    precision_option,
    show_progress,
    workers_option,
)

__all__ = ["command"]

_out_options = [
    click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Also write the result as JSON to this file."),
    force_option,
    json_option,
]


_recipe_options = [
    click.option("--recipe", type=click.Choice(sorted(RECIPES)), default=None,
                 help="The `dptool train --recipe` whose optimizer, weight decay and label smoothing the model step "
                      "takes, at its peak learning rate: resnet (SGD) or vit (AdamW)  [default: resnet]"),
    click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default=None,
                 help="SGD with momentum or AdamW, in place of the recipe's  [default: the recipe's]"),
]


def _with(options):
    def deco(fn):
        for opt in reversed(options):
            fn = opt(fn)
        return fn
    return deco


def _check_outputs(inputs, force: bool, json_out: Path | None, plot: Path | None = None) -> None:
    """Before the measurement: refuse an output that is an input (or its sidecar), exists (without --force), or
    sits in a missing or read-only folder, and a --plot that is not a .png."""
    if json_out is not None and plot is not None and os.path.abspath(json_out) == os.path.abspath(plot):
        raise InputError("--json-out and --plot are the same file; give each its own path.")
    if json_out is not None:
        check_output_path(json_out, force=force, inputs=inputs)
    if plot is not None:
        check_plot_path(plot, force=force, inputs=inputs)


def _save(result: dict, json_out: Path | None) -> None:
    if json_out:
        with atomic_output(json_out) as tmp:
            tmp.write_text(json.dumps(result, indent=1) + "\n")


def _pretrain_table(d: dict) -> str:
    lines = [f"{d['arch']} at {d['res']} px, batch {d['batch_size']} x {d['world_size']}, {d['device']}, "
             f"{d['precision']}, {d['optimizer']} (lr {d['lr']:.3g}, weight decay {d['weight_decay']:g})",
             f"{'file':<34}{'samples':>9}{'img/s':>9}{'epoch s':>9}{'speed-up':>10}{'ideal':>7}{'eff.':>7}{'wait':>7}"]
    for r in d["rows"]:
        epoch = r["measured_epoch_seconds"] or r["projected_epoch_seconds"]
        lines.append(f"{Path(r['path']).name[:33]:<34}{r['samples']:>9}{r['images_per_second']:>9.1f}{epoch:>9.2f}"
                     f"{r['speedup']:>9.2f}x{r['ideal_speedup']:>6.2f}x{r['efficiency']:>7.0%}"
                     f"{r['data_wait_share']:>7.0%}")
    lines.append(f"epoch time: {d['rows'][0]['speedup_basis']}; eff. = speed-up / ideal; wait = share of time "
                 "waiting on data")
    if any((r["efficiency"] or 0) > 1.05 for r in d["rows"]):
        lines.append("an efficiency above 100% is run-to-run noise, not a gain: measure longer (--epochs, --steps, "
                     "--rounds)")
    return "\n".join(lines)


def _loader_table(d: dict) -> str:
    rows = [("FFCV train pipeline", d["ffcv_images_per_second"]),
            ("FFCV + model step", d["ffcv_with_model_images_per_second"]),
            ("ImageFolder + DataLoader", d["folder_images_per_second"]),
            ("ImageFolder + model step", d["folder_with_model_images_per_second"])]
    lines = [f"{d['path']} at {d['res']} px, batch {d['batch_size']}, {d['workers']} workers, {d['device']}"
             + (f", model step in {d['precision']} with {d['optimizer']}" if d.get("precision") else "")]
    lines += [f"  {name:<26}{rate:>10.1f} img/s" for name, rate in rows if rate]
    if d.get("loader_ratio"):
        lines.append(f"  FFCV / ImageFolder: {d['loader_ratio']:.2f}x (loader only)")
    if d.get("with_model_ratio"):
        lines.append(f"  FFCV / ImageFolder: {d['with_model_ratio']:.2f}x (with the model)")
    return "\n".join(lines)


@click.group("bench", cls=Group, context_settings=CONTEXT_SETTINGS)
def command():
    """Measure throughput: pruned vs full pretraining, and the data path.

    \b
    dptool bench pretrain full.beton pruned_p60.beton --arch resnet50 --steps 50
    dptool bench loader full.beton --compare-folder ~/data/imagenet/train
    """


@command.command("pretrain", context_settings=CONTEXT_SETTINGS)
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=str))
@_with(_recipe_options)
@click.option("--arch", type=click.Choice(list_models()), default=None,
              help="Architecture  [default: resnet50; --recipe vit: vit_b_16]")
@click.option("--small-input", is_flag=True, help="Small-image ResNet stem (32-64 px data).")
@click.option("--res", type=click.IntRange(min=8), default=None,
              help="Training resolution, px  [default: 160; --recipe vit: 224]")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Batch per process  [default: 256; --recipe vit: 100]")
@workers_option
@click.option("--epochs", type=click.IntRange(min=0), default=0, help="Whole epochs per file (0: use --steps).")
@click.option("--steps", type=click.IntRange(min=1), default=50, help="Steps per file per round.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, help="Interleaved rounds (steps mode).")
@precision_option("Training precision")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG bar chart (a .png path).")
@_with(_out_options)
def pretrain(files, recipe, optimizer, arch, small_input, res, batch_size, workers, epochs, steps, rounds, precision,
             plot, json_out, force, as_json):
    """Train one recipe on each file, interleaved; report images/s, epoch time and speed-up over the first.

    \b
    dptool bench pretrain in_train.beton in_train_p60.beton --arch resnet50 --epochs 1 --plot bench.png
    """
    ctx = click.get_current_context()
    given = [f"--{n}" for n in ("steps", "rounds")
             if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]
    if epochs > 0 and given:
        raise click.UsageError(f"--epochs {epochs} measures whole epochs, so {' and '.join(given)} would be ignored; "
                               "give --epochs, or --steps and --rounds, not both.")
    _check_outputs(files, force, json_out, plot)
    result = bench_pretrain(list(files), recipe=recipe, optimizer=optimizer, arch=arch, small_input=small_input,
                            res=res, batch_size=batch_size, workers=workers, epochs=epochs, steps=steps,
                            rounds=rounds, precision=precision, progress=show_progress(as_json)).to_dict()
    if launch_rank() != 0:  # under torchrun every rank returns the same summed result; rank 0 writes and prints
        return
    with output_group():  # --json-out and --plot renamed into place together, or neither
        _save(result, json_out)
        if plot:
            plot_pretrain(result, plot)
    emit(result, as_json, _pretrain_table)


@command.command("loader", context_settings=CONTEXT_SETTINGS)
@click.argument("path", type=click.Path(path_type=str))
@click.option("--res", type=click.IntRange(min=8), default=160, help="Crop resolution, px.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, help="Batch size.")
@click.option("--workers", type=click.IntRange(min=0), default=0,
              help="Workers for both paths; 0 = every CPU this process may run on.")
@click.option("--arch", type=click.Choice(list_models()), default=None,
              help="Also measure with a training step of this model.")
@click.option("--small-input", is_flag=True, help="Small-image ResNet stem for --arch.")
@_with(_recipe_options)
@click.option("--compare-folder", type=click.Path(path_type=str), default=None,
              help="The same images as an ImageFolder tree, read by torchvision for comparison.")
@click.option("--max-batches", type=click.IntRange(min=1), default=None,
              help="Batches per measurement (after one warm-up batch)  [default: a whole epoch]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              help="Where batches are delivered (and the model runs): auto = CUDA when present.")
@precision_option("Model step precision with --arch")
@_with(_out_options)
def loader(path, res, batch_size, workers, arch, small_input, recipe, optimizer, compare_folder, max_batches, device,
           precision, json_out, force, as_json):
    """Images/s through the training data pipeline (decode, crop, flip, to device).

    \b
    dptool bench loader in_train.beton --res 160 --compare-folder ~/data/imagenet/train --arch resnet18
    """
    _check_outputs([path], force, json_out)
    result = bench_loader(path, res=res, batch_size=batch_size, workers=workers, arch=arch, small_input=small_input,
                          compare_folder=compare_folder, max_batches=max_batches, device=device,
                          precision=precision, recipe=recipe, optimizer=optimizer,
                          progress=show_progress(as_json)).to_dict()
    _save(result, json_out)
    emit(result, as_json, _loader_table)
