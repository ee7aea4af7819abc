"""`dptool convert`: ImageFolder / tar / .npz / torchvision / CoOp split / label list -> FFCV .beton + sidecar."""

from __future__ import annotations

import click

from dptool.convert import PRESETS, convert, writer_params
from dptool.errors import MAX_SEED
from dptool.writer import MAX_RESOLUTION

from ._common import CONTEXT_SETTINGS, counted, emit, force_option, json_option, show_progress

__all__ = ["command"]


def _human(r) -> str:
    lines = [f"skipped {s['path']}: {s['reason']}" for s in r.skipped[:20]]
    if len(r.skipped) > 20:
        lines.append(f"... and {len(r.skipped) - 20} more (listed in {r.sidecar})")
    lines.append(
        f"{r.output}: {counted(r.num_samples, 'images')}, {counted(r.num_classes, 'classes')}, {r.bytes / 1e6:.1f} MB, "
        f"{r.images_per_second:.0f} images/s, {len(r.skipped)} skipped"
    )
    return "\n".join(lines)


@click.command("convert", context_settings=CONTEXT_SETTINGS)
@click.argument("src", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "--format", "fmt", default="auto",
    help="auto (a folder: imagefolder; FILE.npz: npz; FILE.tar: tar), imagefolder, npz, tar (an uncompressed tar "
         "read in place: ILSVRC2012_img_train.tar as downloaded, or a tar of an ImageFolder tree), "
         "torchvision:NAME (e.g. torchvision:Flowers102), coop:SPLIT.json (a CoOp split file; SRC is then the "
         "dataset's image folder) or list:FILE (lines 'path class', Kaggle's LOC_val_solution.csv, or image-net.org's "
         "ILSVRC2012_devkit_t12.tar.gz; SRC is the folder of the images, or their tar: ILSVRC2012_img_val.tar).",
)
@click.option("--classes-from", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Label by this .beton's class list, by name (the train file, for its val split): classes it has "
                   "and SRC lacks keep their labels with no samples; a class of SRC it lacks is refused.")
@click.option("--split", default=None,
              help="Split of a torchvision dataset: train, test (val where it has one; all for SUN397, which has "
                   "no official split); of a CoOp split file: train, val, test or trainval (train then val)  "
                   "[default: train]")
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    default=None,
    help="FFCV ImageNet write settings (rn18: 400 px, 10% JPEG, q90; rn50: 500 px, 50% JPEG, q90).",
)
@click.option("--max-res", type=click.IntRange(8, MAX_RESOLUTION), default=None,
              help="Longest side stored, px  [default: 256]")
@click.option("--jpeg-quality", type=click.IntRange(1, 100), default=None, help="JPEG quality  [default: 90]")
@click.option(
    "--compress-prob",
    type=click.FloatRange(0, 1),
    default=None,
    help="Fraction JPEG-compressed in proportion mode  [default: 0.5]",
)
@click.option(
    "--write-mode",
    type=click.Choice(["raw", "jpg", "smart", "proportion"]),
    default=None,
    help="How images are stored  [default: jpg]",
)
@click.option("--seed", type=click.IntRange(0, MAX_SEED),
              default=0, help="Seed of the sample shuffle in the file (class-balanced FFCV order).")
@click.option(
    "--on-error",
    type=click.Choice(["skip", "fail"]),
    default="skip",
    help="Unreadable images: skip and list them, or stop.",
)
@click.option("--workers", type=click.IntRange(min=0), default=0,
              help="Encoding worker processes; 0 = every CPU the process may run on (taskset, cpuset, Slurm).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted conversion to OUT (same source and options; --workers may differ).")
@force_option
@json_option
def command(
    src,
    out,
    fmt,
    split,
    preset,
    max_res,
    jpeg_quality,
    compress_prob,
    write_mode,
    seed,
    on_error,
    workers,
    resume,
    classes_from,
    force,
    as_json,
):
    """Convert an image dataset on disk to an FFCV .beton with a JSON sidecar.

    \b
    dptool convert ~/data/imagenet/train imagenet_train.beton --preset rn18
    dptool convert ~/data/imagenet/train imagenet_train.beton --preset rn18 --resume   # after a stop
    dptool convert ILSVRC2012_img_train.tar imagenet_train.beton --preset rn18   # the tar as downloaded
    dptool convert --format torchvision:Flowers102 ~/data flowers_train.beton --split train
    dptool convert --format coop:split_zhou_OxfordPets.json oxford_pets/images pets_train.beton --split train
    dptool convert --format list:LOC_val_solution.csv ILSVRC/Data/CLS-LOC/val val.beton --classes-from train.beton
    """
    params = writer_params(preset=preset, shuffle_seed=seed, num_workers=workers, max_resolution=max_res,
                           jpeg_quality=jpeg_quality, compress_probability=compress_prob, write_mode=write_mode)
    result = convert(
        src,
        out,
        format=fmt,
        split=split,
        params=params,
        on_error=on_error,
        force=force,
        progress=show_progress(as_json),
        resume=resume,
        classes_from=classes_from,
    )
    emit(result, as_json, _human)
