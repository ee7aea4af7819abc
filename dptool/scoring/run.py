"""`score()`: check the inputs, run one registered method, and wrap its result as a `dptool.scores.Scores`.

Refusals (InputError, one sentence each): an empty source or target, a method that needs a target or a
surrogate without one, a surrogate whose output width is not the source's class count (methods that use
logits), a surrogate that cannot take `res`-pixel images, and a resolution mismatch.

Resolution mismatch. Both files are read at one resolution, ``res`` (centre square crop of the short side,
resized). A file's stored resolution is the median short side of its stored images, read from the .beton
metadata table (no decoding). When ``res`` is more than `MAX_UPSCALE` (2x) a file's stored resolution, that
file's images would be blown up to a scale the other file (and the surrogate trained on the source) does not
have; this is refused unless ``allow_upscale`` (``--allow-upscale``) is set, e.g. for 32 px CIFAR scored
against 224 px ImageNet, as the paper does. Downscaling is always accepted.

A torchvision ViT surrogate made for another image size than ``res`` has its position embeddings resampled to
``res``'s patch grid (`fit_resolution`, with a warning); its identity in the scores file records both sizes.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..beton import Beton, check_image_field, fingerprint, known_fingerprints, open_beton
from ..distributed import synchronize, world_size
from ..errors import InputError, check_seed
from ..features import InferenceOptions, forward_error, inference_precision
from ..scores import Scores, score_summary, write_scores
from .registry import get_method

if TYPE_CHECKING:
    from ..surrogate import Surrogate

__all__ = ["MAX_UPSCALE", "ScoreOptions", "Context", "MethodResult", "ScoreRun", "score", "stored_resolution",
           "check_resolution", "default_res", "fit_resolution"]

log = logging.getLogger(__name__)

MAX_UPSCALE = 2.0


@dataclass(frozen=True)
class ScoreOptions:
    """Everything a method may read besides the files and the surrogate (plain data, saved as params).

    `clusters`: FM's K (None = number of source classes with samples). `source_sample`: source images per class used for
    k-means training, FM class means and EL2N (0 = all). `groups`: FM's groups, "clusters" (k-means) or
    "labels" (class-mean centroids). `seed`: k-means, sampling and the random baseline. `centroids_from`: an
    earlier FM scores file of the same source and surrogate whose groups FM reuses (its centroids and assignment,
    beside it): only the target is read, and the clustering options must stay at their defaults.
    """

    inference: InferenceOptions = field(default_factory=InferenceOptions)
    clusters: int | None = None
    source_sample: int = 256
    groups: str = "clusters"
    seed: int = 0
    kmeans_iters: int = 20
    allow_upscale: bool = False
    progress: bool = False
    centroids_from: str | None = None


@dataclass(frozen=True)
class MethodResult:
    """What a method returns: per-group scores and tie-break values, the rule in words, and extras.

    `ids` (G,) int, `scores` and `tiebreak` (G,) float, `names` (G,) str; `assignment` (N_source,) int32 for
    cluster-level results; `extra` plain JSON kept in the scores file.
    """

    level: str
    ids: np.ndarray
    names: tuple[str, ...]
    scores: np.ndarray
    tiebreak: np.ndarray
    tie_break: str
    params: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    assignment: np.ndarray | None = None
    centroids: np.ndarray | None = None


@dataclass
class Context:
    """What a method gets: the opened files (and the source's fingerprint, computed once), the surrogate, the
    options, and a stage timer."""

    source: Beton
    target: Beton | None
    surrogate: object | None
    options: ScoreOptions
    timings: dict[str, float] = field(default_factory=dict)
    source_fingerprint: str | None = None

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block and add it to `timings[name]` (seconds), waiting for a GPU's queued work at both ends."""
        synchronize(self.options.inference.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.options.inference.device)
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
            log.info("%s: %.2f s", name, self.timings[name])


@dataclass(frozen=True)
class ScoreRun:
    """The outcome of `score`: the `Scores`, the per-sample cluster ids and (K, D) centroids (FM), seconds per stage."""

    scores: Scores
    assignment: np.ndarray | None
    timings: dict[str, float]
    centroids: np.ndarray | None = None

    def write(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Write the scores file (and the assignment and centroids beside it) atomically; refuses to overwrite without
        force."""
        return write_scores(path, self.scores, assignment=self.assignment, centroids=self.centroids, force=force)

    def summary(self, top: int = 10) -> dict:
        """Plain-JSON summary for the terminal: top groups with names and scores, zero-score count, timings."""
        return {
            **score_summary(self.scores, top),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }


def stored_resolution(beton: Beton) -> int | None:
    """Median short side in pixels of the images stored in `beton` (from metadata; None without images)."""
    if "image" not in beton.field_names or beton.num_samples == 0:
        return None
    check_image_field(beton)
    meta = beton.field_metadata("image")
    return int(np.median(np.minimum(meta["height"], meta["width"])))


def default_res(surrogate, source: Beton) -> int:
    """The surrogate checkpoint's recorded evaluation resolution, else min(224, source's stored resolution); for a
    ViT, the image size its position embeddings were made for, unless that is more than `MAX_UPSCALE` times the
    source's stored resolution (then the largest multiple of its patch size up to the stored resolution)."""
    from ..surrogate import default_resolution

    stored = stored_resolution(source) or 224
    geometry = _vit_geometry(surrogate)
    if geometry is not None:  # at its own size it needs no resampling, which costs a pretrained ViT more accuracy
        native, patch = geometry
        return native if native <= MAX_UPSCALE * stored else max(patch, stored // patch * patch)
    return default_resolution(getattr(surrogate, "recipe", {}) or {}, fallback=min(224, stored))


def _vit_geometry(surrogate) -> tuple[int, int] | None:
    """(image size, patch size) of a torchvision ViT surrogate, whose position embeddings fix its input size; None
    for any other surrogate (a TorchScript module included: it cannot be resampled)."""
    vit = sys.modules.get("torchvision.models.vision_transformer")  # not imported: the model cannot be one
    if vit is None or surrogate is None or getattr(surrogate, "scripted", False):
        return None
    inner = getattr(surrogate.model, "module", surrogate.model)
    if not isinstance(inner, vit.VisionTransformer):
        return None
    return int(inner.image_size), int(inner.patch_size)


def fit_resolution(surrogate, res: int, files: dict[str, Beton] | None = None, *, allow_upscale: bool = False):
    """The surrogate to score `res` px images with. A torchvision ViT made for another image size gets its position
    embeddings resampled bicubically to the patch grid of `res` (`dptool.models.resize_vit`, as `finetune` does),
    with a warning, in a copy that shares every other weight (the caller's module is left as it was); a `res` that
    is not a multiple of its patch size is refused in one sentence. Its identity records `image_size`, the size
    the loaded weights were made for, and `resampled_to`, `res` when they were resampled; `weights` stays the
    fingerprint of the loaded weights, which with the recorded `res` determines the resampled ones. Any other
    surrogate is returned as it is. The warning's hint at scoring at the ViT's own size adds --allow-upscale where
    `check_resolution` would refuse that size for `files`."""
    from ..models import resize_vit

    geometry = _vit_geometry(surrogate)
    if geometry is None:
        return surrogate
    native = geometry[0]
    identity = {**surrogate.identity, "image_size": native}
    if res == native:
        return replace(surrogate, identity=identity)
    shared = {id(t): t for t in (*surrogate.model.parameters(), *surrogate.model.buffers())}
    model = copy.deepcopy(surrogate.model, memo=shared)  # new modules around the same tensors
    resize_vit(model, res)  # refuses a res that is not a multiple of the patch size; puts in a new embedding
    own = f"--res {native}"
    try:
        check_resolution(files or {}, native, allow_upscale=allow_upscale)
    except InputError:  # its own size upscales a file more than MAX_UPSCALE: refused without --allow-upscale
        own += " --allow-upscale"
    log.warning("the %s surrogate was made for %d px images; its position embeddings are resampled (bicubic) to "
                "--res %d, so it scores images at a size it was not trained on (%s scores at its own)",
                identity.get("arch", "ViT"), native, res, own)
    return replace(surrogate, model=model, identity={**identity, "resampled_to": res})


def check_resolution(files: dict[str, Beton], res: int, *, allow_upscale: bool = False) -> None:
    """Refuse (InputError) when `res` is more than `MAX_UPSCALE` times a file's stored resolution."""
    for role, beton in files.items():
        stored = stored_resolution(beton)
        if stored is None or allow_upscale or res <= MAX_UPSCALE * stored:
            continue
        others = ", ".join(f"{r} {stored_resolution(b)} px" for r, b in files.items() if r != role)
        raise InputError(
            f"Resolution mismatch: {role} {beton.path} stores {stored} px images but scoring runs at --res {res} "
            f"({res / stored:.3g}x upscaling, more than {MAX_UPSCALE:g}x){'; ' + others if others else ''}; "
            "lower --res, reconvert with a larger --max-res, or pass --allow-upscale.")


def _probe(surrogate, options: InferenceOptions):
    """The surrogate's output for one image of zeros at the scoring resolution: a model that cannot take that size
    fails here, in one sentence, before any image is read (torchvision's ViT asserts its image size)."""
    import torch

    x = torch.zeros(1, 3, options.res, options.res, device=options.device)
    try:
        with torch.inference_mode():
            out = surrogate.model(x)
    except torch.cuda.OutOfMemoryError as exc:  # a RuntimeError too, but not a resolution problem
        raise InputError(f"The surrogate does not fit in the memory of {options.device} even for one "
                         f"{options.res}x{options.res} image; lower --res or free the device.") from exc
    except (RuntimeError, AssertionError) as exc:
        raise forward_error(exc, options) from exc
    return out[0] if isinstance(out, (tuple, list)) else out


def _output_width(surrogate, options: InferenceOptions) -> int:
    """Logit count of the surrogate, from one forward pass of zeros at the scoring resolution."""
    out = _probe(surrogate, options)
    if out.ndim != 2:
        raise InputError(f"The surrogate returns an output of shape {tuple(out.shape)}, not (batch, classes).")
    return int(out.shape[1])


def _file_info(beton: Beton) -> dict:
    return {"path": str(beton.path.resolve()), "fingerprint": fingerprint(beton),
            "num_samples": int(beton.num_samples), "num_classes": int(beton.num_classes)}


def score(method: str, *, source: Beton | str | os.PathLike, target: Beton | str | os.PathLike | None = None,
          surrogate: Surrogate | None = None, options: ScoreOptions | None = None) -> ScoreRun:
    """Score the classes (or clusters) of `source` for transfer to `target` with registered `method`.

    `surrogate` is a `dptool.surrogate.Surrogate` (not needed by the random baseline). Under
    torch.distributed every rank must call this; each scores a shard and all get the same result.
    """
    options = options or ScoreOptions()
    spec = get_method(method)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    src = open_beton(source)
    tgt = open_beton(target) if target is not None else None
    if src.num_samples == 0:
        raise InputError(f"Source {src.path} has no samples; there is nothing to score.")
    if spec.needs_target and tgt is None:
        raise InputError(f"--method {method} needs --target, the target task's training .beton.")
    if tgt is not None and tgt.num_samples == 0:
        raise InputError(f"Target {tgt.path} has no samples; score needs at least one target training image.")
    if spec.needs_surrogate and surrogate is None:
        raise InputError(f"--method {method} needs a surrogate model (--model, --arch/--weights or "
                         "--model-factory).")
    check_seed("--seed", options.seed)
    if options.centroids_from is not None and method != "fm":
        raise InputError(f"--centroids-from applies to --method fm, not to --method {method}.")
    if options.groups not in ("clusters", "labels"):
        raise InputError(f"--groups must be clusters or labels, got {options.groups!r}.")
    if spec.needs_surrogate:
        files = {"source": src, **({"target": tgt} if tgt is not None else {})}
        check_resolution(files, options.inference.res, allow_upscale=options.allow_upscale)
        surrogate = fit_resolution(surrogate, options.inference.res, files, allow_upscale=options.allow_upscale)
    if spec.needs_logits and not getattr(surrogate, "has_classifier", True):
        raise InputError(f"--method {method} needs the surrogate's class scores, but weights "
                         f"{surrogate.identity.get('path')} hold a backbone without a classifier; score with "
                         "--method fm, which reads features, or give weights that include the classifier.")
    if spec.needs_surrogate and not spec.needs_logits:
        _probe(surrogate, options.inference)
    if spec.needs_logits:
        width = _output_width(surrogate, options.inference)
        if width != src.num_classes:
            raise InputError(f"The surrogate outputs {width} class scores but source {src.path} has "
                             f"{src.num_classes} classes; --method {method} needs a surrogate trained on this "
                             "source, with one output per source class.")
    if spec.needs_surrogate and options.inference.precision not in ("auto", inference_precision(options.inference)):
        log.warning("--precision %s applies to CUDA; on %s the surrogate runs in fp32", options.inference.precision,
                    options.inference.device)
    src_info = _file_info(src)
    _warn_fingerprint(surrogate, src, src_info["fingerprint"])
    timings["open and check"] = time.perf_counter() - start
    ctx = Context(source=src, target=tgt, surrogate=surrogate, options=options, timings=timings,
                  source_fingerprint=src_info["fingerprint"])
    result = spec.fn(ctx)
    # how images reached the surrogate, for the methods that read images (the random baseline reads none)
    inference = ({"res": options.inference.res, "mean": list(options.inference.mean),
                  "std": list(options.inference.std), "batch_size": options.inference.batch_size,
                  "precision": inference_precision(options.inference)}
                 if spec.needs_surrogate else {})
    params = {**inference, "world_size": world_size(), **result.params}
    scores = Scores(method=method, level=result.level, ids=result.ids, names=result.names, scores=result.scores,
                    tiebreak=result.tiebreak, source=src_info, tie_break=result.tie_break, params=params,
                    surrogate=getattr(surrogate, "identity", None),
                    target=_file_info(tgt) if tgt is not None else None, extra=result.extra)
    return ScoreRun(scores=scores, assignment=result.assignment, timings=dict(ctx.timings),
                    centroids=result.centroids)


def _warn_fingerprint(surrogate, src: Beton, src_fp: str) -> None:
    """Warn when the surrogate's checkpoint records training data other than this source (its real fingerprint)."""
    trained_on = (getattr(surrogate, "identity", None) or {}).get("data_fingerprint")
    if trained_on and trained_on != src_fp and trained_on not in known_fingerprints(src, src_fp):
        log.warning("the surrogate was trained on data with fingerprint %s, not on source %s (%s)",
                    trained_on, src.path, src_fp)
