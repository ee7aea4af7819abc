"""`dptool score`: score the source's classes (or FM clusters) for a target with LM, FM or a baseline."""

from __future__ import annotations

import click
from click.core import ParameterSource

from dptool.distributed import launch_rank
from dptool.errors import MAX_SEED
from dptool.features import InferenceOptions
from dptool.loaders import IMAGENET_MEAN, IMAGENET_STD
from dptool.models import list_models
from dptool.scoring import ScoreOptions, get_method, list_methods, score_files

from ._common import (
    CONTEXT_SETTINGS,
    ExistingFile,
    emit,
    force_option,
    group_noun,
    json_option,
    precision_option,
    score_table,
    show_progress,
    workers_option,
)

__all__ = ["command"]

_PATH = ExistingFile(path_type=str)
_METHODS_HELP = "; ".join(f"{m}: {get_method(m).help}" for m in list_methods())


def _human(s: dict) -> str:
    lines = [f"{s['output']}: {s['method']} scores of {s['groups']} {group_noun(s['level'])}", *score_table(s)]
    lines.append("time: " + ", ".join(f"{k} {v:.2f} s" for k, v in s["timings"].items())
                 + f"; total {s['seconds']:.2f} s")
    if s.get("assignment"):
        lines.append(f"cluster of every source image: {s['assignment']}")
    if s.get("centroids"):
        lines.append(f"centroids: {s['centroids']}")
    if s.get("plot"):
        lines.append(f"plot: {s['plot']}")
    return "\n".join(lines)


@click.command("score", context_settings=CONTEXT_SETTINGS)
@click.option("--method", type=click.Choice(list_methods()), default="lm", help=_METHODS_HELP)
@click.option("--source", required=True, type=_PATH, help="Source (pretraining) training .beton.")
@click.option("--target", type=_PATH, default=None, help="Target task's training .beton (LM, FM).")
@click.option("--model", type=_PATH, default=None, help="Surrogate: a dptool checkpoint or a TorchScript file.")
@click.option("--arch", type=click.Choice(list_models()), default=None, help="Surrogate architecture (with --weights).")
@click.option("--weights", type=_PATH, default=None,
              help="State-dict file for --arch or --model-factory, or a self-supervised checkpoint (MoCo, DINO, "
                   "SwAV: the backbone is found in it).")
@click.option("--weights-prefix", default=None,
              help="The prefix of the backbone's entries in --weights, when it holds several copies "
                   "(e.g. encoder_k.)  [default: found]")
@click.option("--model-factory", default=None, help="package.module:function returning a torch.nn.Module.")
@click.option("--feature-layer", default=None, help="Module whose input is the FM feature  [default: the classifier]")
@click.option("--res", type=click.IntRange(min=8), default=None,
              help="Scoring resolution, px  [default: the checkpoint's, else min(224, source's)]")
@click.option("--mean", type=float, nargs=3, default=None, help=f"Normalisation mean  [default: {IMAGENET_MEAN}]")
@click.option("--std", type=float, nargs=3, default=None, help=f"Normalisation std  [default: {IMAGENET_STD}]")
@click.option("--allow-upscale", is_flag=True, help="Accept a --res more than 2x a file's stored resolution.")
@click.option("--clusters", type=click.IntRange(min=1), default=None,
              help="FM k-means K  [default: source classes with samples]")
@click.option("--groups", type=click.Choice(["clusters", "labels"]), default="clusters",
              help="FM groups: k-means clusters, or source classes with class-mean centroids.")
@click.option("--source-sample", type=click.IntRange(min=0), default=256,
              help="Source images per class for k-means, class means and EL2N; 0 = all.")
@click.option("--kmeans-iters", type=click.IntRange(min=1), default=20, help="k-means iterations.")
@click.option("--centroids-from", type=_PATH, default=None,
              help="FM: reuse the groups of this earlier FM scores file (same source and surrogate) and read only "
                   "the target; --res, --mean, --std, --feature-layer default to its.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED),
              default=0, help="Seed of sampling, k-means and --method random.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, help="Images per forward pass (per process).")
@workers_option
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", help="Where the model runs.")
@precision_option("Autocast of the forward pass on CUDA; fp32 or bf16 if fp16 overflows", auto="fp16, as the paper")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=str), help="Scores file.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="PNG of the score curve (a .png path).")
@force_option
@json_option
def command(method, source, target, model, arch, weights, weights_prefix, model_factory, feature_layer, res, mean,
            std, allow_upscale, clusters, groups, source_sample, kmeans_iters, centroids_from, seed, batch_size,
            workers, device, precision, output, plot, force, as_json):
    """Score every source class (or FM cluster) by its usefulness for the target task; write a scores file.

    \b
    dptool score --method lm --source in_train.beton --target flowers.beton --model rn18.pt -o scores.json
    dptool score --method fm --source in_train.beton --target flowers.beton --arch resnet50 \\
        --weights moco_v2_800ep_pretrain.pth.tar --clusters 1000 -o fm.json --plot fm.png
    dptool score --method fm --source in_train.beton --target pets.beton --arch resnet50 \\
        --weights moco_v2_800ep_pretrain.pth.tar --centroids-from fm.json -o fm_pets.json   # reads only the target
    torchrun --nproc-per-node 8 -m dptool score --method lm ...    # each rank scores a shard
    """
    ctx = click.get_current_context()
    given = [n for n in ctx.params if ctx.get_parameter_source(n) not in
             (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)]
    surrogate = {"model": model, "arch": arch, "weights": weights, "weights_prefix": weights_prefix,
                 "factory": model_factory, "feature_layer": feature_layer}
    inference = InferenceOptions(batch_size=batch_size, workers=workers, precision=precision)
    options = ScoreOptions(inference=inference, clusters=clusters, source_sample=source_sample, groups=groups,
                           seed=seed, kmeans_iters=kmeans_iters, allow_upscale=allow_upscale,
                           progress=show_progress(as_json), centroids_from=centroids_from)
    summary = score_files(output, method=method, source=source, target=target, surrogate=surrogate, options=options,
                          res=res, mean=mean, std=std, device=device, plot=plot, force=force,
                          given=given)  # given at all, even at the default value: refused or warned about
    if launch_rank() == 0:  # under torchrun every rank returns the summary; rank 0 alone wrote and prints
        emit(summary, as_json, _human)
