"""`score_files`: the whole `dptool score` run as one library call (surrogate, score, scores file, plot).

Under torchrun it joins the process group, every rank scores its shard, and rank 0 alone writes the outputs.
The output path is checked before any work, so an existing file is refused in a second, not after an hour.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import fields, replace

from ..atomic import check_output_path, check_plot_path, output_group
from ..beton import fingerprint, open_beton
from ..distributed import (
    barrier,
    check_same_inputs,
    distributed_session,
    is_main,
    launch_rank,
    launched_by_torchrun,
    mark_progress,
    resolve_device,
)
from ..errors import InputError
from ..features import InferenceOptions
from ..loaders import IMAGENET_MEAN, IMAGENET_STD
from ..scores import assignment_path, centroids_path, companion_path, fingerprint_file
from .fm import CLUSTERING_OPTIONS, read_groups_file, refuse_clustering_options
from .plot import plot_scores
from .registry import get_method
from .run import ScoreOptions, default_res, score

__all__ = ["score_files", "check_method_options", "SURROGATE_KEYS"]

log = logging.getLogger(__name__)

#: the keys `score_files` accepts in `surrogate` (the keyword arguments of `dptool.surrogate.load_surrogate`)
SURROGATE_KEYS = ("model", "arch", "weights", "weights_prefix", "factory", "feature_layer")
# Option names below are `dptool score`'s, without dashes: `score_files` arguments, `ScoreOptions` fields, the
# inference options batch_size and workers, and the surrogate's keys (`factory` is "model_factory").
# FM's clustering options but those other methods take too (seed, source_sample), and its feature layer;
# (centroids_from, FM's too, is refused by `score`)
_FM_ONLY = {**{n: flag for n, flag in CLUSTERING_OPTIONS.items() if n not in ("seed", "source_sample")},
            "feature_layer": "--feature-layer"}
# options that only a method running a surrogate reads (the random baseline reads the source's labels alone), and the
# shared ones each method declares in `reads`: given to a method that does not read them, they are warned about,
# not refused, since a script looping over methods may pass them all
_SURROGATE_FLAGS = {"model": "--model", "arch": "--arch", "weights": "--weights", "weights_prefix": "--weights-prefix",
                    "model_factory": "--model-factory", "res": "--res", "mean": "--mean", "std": "--std",
                    "allow_upscale": "--allow-upscale", "batch_size": "--batch-size", "workers": "--workers",
                    "device": "--device", "precision": "--precision"}
_SHARED_FLAGS = {"seed": "--seed", "source_sample": "--source-sample"}


def check_method_options(method: str, given: Iterable[str], centroids_from: str | os.PathLike | None = None, *,
                         refuse: bool = True) -> None:
    """Refuse FM's options given to another method (and, with FM's `centroids_from`, its clustering options); warn
    about options `method` does not read, which change nothing. `given`: the names (as in `dptool score`, without
    dashes) of the options the caller set. `refuse=False` warns about FM's options too (one `ScoreOptions` passed
    to every method of a loop)."""
    given = list(given)
    if centroids_from is not None and method == "fm":
        refuse_clustering_options(given, centroids_from)
    fm_only = [n for n in _FM_ONLY if n in given and method != "fm"]
    if fm_only and refuse:
        raise InputError(f"{_FM_ONLY[fm_only[0]]} applies to --method fm, not to --method {method}.")
    spec = get_method(method)
    unread = {**({} if spec.needs_surrogate else _SURROGATE_FLAGS),
              **{n: f for n, f in _SHARED_FLAGS.items() if n not in spec.reads}, **_FM_ONLY}
    flags = [unread[n] for n in given if n in unread and (n not in _FM_ONLY or method != "fm")]
    if flags:
        log.warning("--method %s does not use %s; ignored", method, ", ".join(flags))


def _set_options(options: ScoreOptions, surrogate: dict, res, mean, std, device: str) -> list[str]:
    """The names of the options a library caller set: those whose value is not the default (the CLI passes the
    ones given on its command line instead, even at their default value)."""
    names = [f.name for f in fields(ScoreOptions) if f.name not in ("inference", "progress")
             and getattr(options, f.name) != f.default]
    names += [n for n in ("batch_size", "workers", "precision")
              if getattr(options.inference, n) != getattr(InferenceOptions(), n)]
    names += ["model_factory" if k == "factory" else k for k in SURROGATE_KEYS if surrogate.get(k) is not None]
    names += [n for n, v in (("res", res), ("mean", mean), ("std", std)) if v is not None]
    return names + (["device"] if device != "auto" else [])


def _norm(value: Sequence[float] | None, recipe: dict, key: str, fallback) -> tuple[float, float, float]:
    """An explicit --mean/--std, else the checkpoint recipe's, else ImageNet's."""
    if value:
        return tuple(float(v) for v in value)
    got = recipe.get(key) if isinstance(recipe, dict) else None
    return tuple(float(v) for v in got) if isinstance(got, (list, tuple)) and len(got) == 3 else fallback


def score_files(output: str | os.PathLike, *, method: str, source: str | os.PathLike,
                target: str | os.PathLike | None = None, surrogate: dict | str | os.PathLike | None = None,
                options: ScoreOptions | None = None, res: int | None = None,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None, device: str = "auto",
                plot: str | os.PathLike | None = None, force: bool = False, top: int = 10,
                given: Iterable[str] | None = None) -> dict:
    """Score `source` for `target` with `method`, write the scores file to `output` (and `plot`), return a summary.

    `surrogate` holds the keyword arguments of `dptool.surrogate.load_surrogate` (`SURROGATE_KEYS`: model, or
    arch + weights, or factory; feature_layer, weights_prefix), or is the path of a checkpoint (the same as
    ``{"model": path}``). `res`, `mean`, `std` default to what the checkpoint's recipe records, else
    min(224, the source's stored resolution) and ImageNet statistics; with `options.centroids_from`, they and the
    feature layer default to that scores file's. `device` "auto" is the process's CUDA device under torchrun, else
    CUDA when present, else the CPU. Options that `method` does not read are named in a warning
    (`check_method_options`); `given` names the options the caller set (default: those not at their default
    value), and when it is passed (as the CLI does) FM's options given to another method are refused instead.
    """
    from ..surrogate import load_surrogate

    options = options or ScoreOptions()
    spec = get_method(method)
    if isinstance(surrogate, (str, os.PathLike)):
        surrogate = {"model": surrogate}
    if surrogate is not None and not isinstance(surrogate, dict):
        raise InputError(f"surrogate must be a checkpoint path or a dict with keys {', '.join(SURROGATE_KEYS)}, got "
                         f"{type(surrogate).__name__}.")
    unknown = sorted(set(surrogate or {}) - set(SURROGATE_KEYS))
    if unknown:
        raise InputError(f"Unknown surrogate key {unknown[0]!r}; accepted: {', '.join(SURROGATE_KEYS)}.")
    # the CLI refuses FM's options typed for another method; a script may pass one ScoreOptions to every method
    check_method_options(method, _set_options(options, surrogate or {}, res, mean, std, device) if given is None
                         else given, options.centroids_from, refuse=given is not None)
    # refused here if not FM: its res, mean and std would become this run's defaults, and be refused instead
    reused = read_groups_file(options.centroids_from) if options.centroids_from is not None and method == "fm" else None
    surrogate = dict(surrogate or {})
    if reused is not None:  # its groups live at its resolution, normalisation and feature layer: the defaults here
        res = res or reused.params.get("res")
        mean = mean or reused.params.get("mean")
        std = std or reused.params.get("std")
        surrogate["feature_layer"] = surrogate.get("feature_layer") or (reused.surrogate or {}).get("feature_layer")
    for flag, values in (("--mean", mean), ("--std", std)):
        if values is not None and len(values) != 3:
            raise InputError(f"{flag} takes 3 values (red, green, blue), got {len(values)}.")
    if std is not None and not all(v > 0 and math.isfinite(v) for v in std):  # also refuses NaN
        raise InputError(f"--std values must all be > 0 and finite (they divide the pixels), got "
                         f"{' '.join(map(str, std))}.")
    if mean is not None and not all(math.isfinite(v) for v in mean):
        raise InputError(f"--mean values must all be finite, got {' '.join(map(str, mean))}.")
    if res is not None and (isinstance(res, bool) or not isinstance(res, int) or res < 8):
        raise InputError(f"--res must be an integer of at least 8, got {res!r}.")
    # the surrogate's files, and a scores file whose centroids are reused, are inputs too
    inputs = (source, target, surrogate.get("model"), surrogate.get("weights"), options.centroids_from)
    if reused is not None:
        inputs += tuple(companion_path(options.centroids_from, n) for n in (reused.assignment, reused.centroids) if n)
    out = check_output_path(output, force=force, inputs=inputs)
    companions = []  # FM: the centroids, and for clusters the assignment, go beside the scores
    if method == "fm":
        companions.append(centroids_path(out))
        if (reused.level == "cluster") if reused is not None else options.groups == "clusters":
            companions.append(assignment_path(out))
    for path in companions:
        check_output_path(path, force=force, inputs=inputs)
    if plot is not None:  # nor over the files written beside it: the plot, renamed last, would replace one
        beside = ((c, "a file written beside the scores file") for c in companions)
        for path, what in ((out, "the scores file"), *beside):
            if os.path.realpath(plot) == os.path.realpath(path):  # also through a linked folder, or a link
                raise InputError(f"--plot {plot} is the same path as {what}, {path}; give --plot another path.")
        check_plot_path(plot, force=force, inputs=inputs)
    if device == "cuda" and spec.needs_surrogate:
        resolve_device(device)  # refuses it at once where torch sees no GPU
    began = time.perf_counter()
    # a method without a surrogate, outside torchrun, needs neither torch nor a device (seconds of imports)
    session = (distributed_session() if spec.needs_surrogate or launched_by_torchrun()
               else contextlib.nullcontext("cpu"))
    with session as session_device:
        # every rank has checked the outputs before rank 0 may write one: the random baseline has no collective
        # step, so a rank still finishing the previous call would find this call's output written and refuse it
        barrier()
        dev = str(session_device) if device == "auto" else device
        start = time.perf_counter()
        sur = load_surrogate(device=dev, **surrogate) if spec.needs_surrogate else None
        loaded = time.perf_counter() - start
        recipe = getattr(sur, "recipe", {}) or {}
        src = open_beton(source)  # opened once: score() and the loaders take the Beton as it is
        if launched_by_torchrun():  # on several machines each rank reads its own copy: they must be the same
            model = surrogate.get("model") or surrogate.get("weights") or surrogate.get("arch")
            check_same_inputs({
                f"The source {source}": fingerprint(src),
                **({f"The target {target}": fingerprint(target)} if target is not None else {}),
                **({f"The surrogate {model}": sur.identity["weights"]} if sur is not None else {}),
                **({f"The scores file {options.centroids_from}": fingerprint_file(options.centroids_from)}
                   if reused is not None else {})})
        inference = replace(
            options.inference, res=res or (default_res(sur, src) if sur is not None else 224),
            device=dev, mean=_norm(mean, recipe, "mean", IMAGENET_MEAN), std=_norm(std, recipe, "std", IMAGENET_STD))
        run = score(method, source=src, target=target, surrogate=sur,
                    options=replace(options, inference=inference, progress=options.progress and is_main()))
        summary = run.summary(top)
        summary["timings"] = {"load surrogate": round(loaded, 3), **summary["timings"]}
        if is_main():
            start = time.perf_counter()
            with output_group():  # the scores file, its assignment and the plot are renamed into place together
                summary["output"] = str(run.write(out, force=force))
                summary["assignment"] = str(assignment_path(out)) if run.assignment is not None else None
                summary["centroids"] = str(centroids_path(out)) if run.centroids is not None else None
                if plot is not None:
                    summary["plot"] = str(plot_scores(run.scores, plot, top=top, force=force))
            summary["timings"]["write"] = round(time.perf_counter() - start, 3)
        mark_progress()  # rank 0 may fail alone above (an output it cannot write): it then ends without waiting
        barrier()
    summary.update(seconds=round(time.perf_counter() - began, 3), rank=launch_rank(), source=str(source),
                   target=str(target) if target is not None else None,
                   res=inference.res, device=dev, surrogate=run.scores.surrogate)
    return summary
