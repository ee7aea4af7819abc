"""Stream a surrogate over a `.beton`: logits and/or penultimate features per batch, with file positions.

Images come from `dptool.loaders.inference_loader` (deterministic centre square crop of the short side,
resized, normalised). Features are read by a forward pre-hook on the module whose *input* is the feature
(the final classifier), flattened to (B, D). Nothing is accumulated here: callers reduce each batch to a
few bytes per sample (a prediction, a cluster id) or to per-class sums, so memory does not grow with N.

Under torch.distributed every rank reads its own shard of the rows, ``rows[rank::world]`` (exact: no
padding, no duplicates), so that summing per-rank histograms gives the single-process result.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .beton import Beton, open_beton
from .distributed import is_main, shard_rows
from .errors import DptoolError, InputError
from .loaders import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["PRECISIONS", "InferenceOptions", "inference_precision", "Batch", "stream", "feature_hook", "forward_error"]

log = logging.getLogger(__name__)

#: what `InferenceOptions.precision` (`score --precision`) accepts
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass(frozen=True)
class InferenceOptions:
    """How images reach the surrogate: resolution, batch size, decoding threads, device, normalisation, precision.

    `precision` is the autocast of the forward pass on CUDA: "auto" is float16 (as the paper does), "fp32" none,
    "fp16"/"bf16" that dtype; the CPU computes in float32 whatever is asked (see `inference_precision`).
    """

    res: int = 224
    batch_size: int = 256
    workers: int = 0
    device: str = "cpu"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    precision: str = "auto"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}.")


def inference_precision(options: InferenceOptions) -> str:
    """The precision the forward pass runs at, as the scores file records it: "auto" is fp16 on CUDA; on the CPU
    always fp32, as `train` and `bench` resolve it (CPU float16 autocast ran a ResNet-18 about 19x slower than
    float32 on one thread here)."""
    if not str(options.device).startswith("cuda"):
        return "fp32"
    return "fp16" if options.precision == "auto" else options.precision


_AUTOCAST = {"fp16": "float16", "bf16": "bfloat16"}


#: What CUDA and its libraries say when the device itself failed (a device-side assert, an illegal address)
_DEVICE_FAULT = re.compile(r"CUDA error|CUBLAS_STATUS|CUDNN_STATUS|cuDNN error")


def forward_error(exc: Exception, options: InferenceOptions, where: str = "") -> DptoolError:
    """The error to raise for a surrogate forward pass that raised `exc`: a fault of the device or its libraries is
    not the images' (an internal DptoolError, exit 1); anything else, a layer's RuntimeError or the model's own
    assertion about its input (torchvision's ViT: "Wrong image height!"), is a model that cannot take images of
    the scoring resolution (an InputError naming it). Out-of-memory is caught before, by the caller."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if _DEVICE_FAULT.search(first):
        return DptoolError(f"The surrogate's forward pass failed on {options.device}, a fault of the device or its "
                           f"libraries rather than of the images: {first} (CUDA_LAUNCH_BLOCKING=1 with --debug "
                           "locates it).")
    return InputError(f"The surrogate cannot take {options.res}x{options.res} images{where}: {first}")


@dataclass(frozen=True)
class Batch:
    """One batch: file rows (B,) int64 NumPy, labels (B,) int64 and, when asked for, logits (B, C) float32
    and features (B, D) float32, all three torch tensors on the options' device."""

    rows: np.ndarray
    labels: object
    logits: object | None = None
    features: object | None = None


@contextlib.contextmanager
def feature_hook(module) -> Iterator[list]:
    """Capture the input of `module` on every forward: yields a one-slot list holding the last (B, D) input."""
    slot: list = [None]

    def hook(_mod, inputs):
        x = inputs[0]
        slot[0] = x.reshape(x.shape[0], -1)

    handle = module.register_forward_pre_hook(hook)
    try:
        yield slot
    finally:
        handle.remove()


def _progress(total: int, desc: str, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not show or not is_main(),
                dynamic_ncols=True, leave=False)


def stream(surrogate, path: Beton | str | os.PathLike, rows: Sequence[int] | np.ndarray, *, options: InferenceOptions,
           logits: bool = True, features: bool = False, progress: bool = False,
           desc: str = "inference", check_each_batch: bool = False) -> Iterator[Batch]:
    """Run `surrogate` over the given file `rows` of `path` (this rank's share only) in file-row order.

    Yields one `Batch` per loader batch; rows of the batch are checked against the file's labels, so a
    loader that reorders samples is an error rather than silently wrong scores. Outputs with a NaN or an infinity
    are an InputError naming the surrogate: counted on the device and checked once, over all ranks, after the last
    batch (before the caller reduces what it kept), or with `check_each_batch` before each batch is yielded (for a
    caller that reduces each batch on the host, and so synchronises with the device there anyway).
    """
    import torch

    from .loaders import inference_loader

    mine = shard_rows(np.asarray(rows, dtype=np.int64))
    what = " and ".join(name for name, asked in (("logits", logits), ("features", features)) if asked)
    if len(mine) == 0:
        _check_finite(0, len(rows), surrogate, path, what, options)  # a collective: every rank takes part
        return
    model = surrogate.model
    hook = feature_hook(surrogate.feature_module()) if features and not surrogate.scripted else None
    forward_features = getattr(model, "forward_features", None) if features and surrogate.scripted else None
    if features and surrogate.scripted and forward_features is None:
        surrogate.feature_module()  # raises the one-sentence InputError
    beton = open_beton(path)  # a Beton the caller opened is used as it is
    path, file_labels = beton.path, beton.labels
    whole = len(mine) == len(file_labels) and np.array_equal(mine, np.arange(len(file_labels)))
    loader = inference_loader(beton, batch_size=options.batch_size, res=options.res, workers=options.workers,
                              device=options.device, indices=None if whole else mine, mean=options.mean,
                              std=options.std)
    device = torch.device(options.device)
    dtype = _AUTOCAST.get(inference_precision(options))
    pos = 0
    mismatches = torch.zeros((), dtype=torch.int64, device=device)  # checked once at the end: no sync per batch
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)  # images with a NaN/inf output, the same way
    with contextlib.ExitStack() as stack:
        slot = stack.enter_context(hook) if hook is not None else None
        bar = stack.enter_context(_progress(len(mine), desc, progress))
        stack.enter_context(torch.inference_mode())
        # autocast around the forward pass only: entered for the whole loop, it would also hold in the caller's loop
        # body while this generator waits at its yield
        half = (lambda: torch.autocast("cuda", dtype=getattr(torch, dtype))) if dtype else contextlib.nullcontext
        for images, labels in loader:
            b = int(labels.shape[0])
            batch_rows = mine[pos:pos + b]
            pos += b
            if len(batch_rows) != b:
                raise DptoolError(f"The loader of {path} yielded more than its {len(mine)} rows; cannot score.")
            expected = torch.from_numpy(file_labels[batch_rows]).to(labels.device, non_blocking=True)
            mismatches += (labels.reshape(-1) != expected).sum()
            try:
                with half():
                    if forward_features is not None:
                        out, feats = None, forward_features(images)
                        if logits:
                            out = model(images)
                    else:
                        if slot is not None:
                            slot[0] = None
                        out = model(images)
                        feats = slot[0] if slot is not None else None
            except torch.cuda.OutOfMemoryError as exc:  # a RuntimeError too, but not a resolution problem
                raise InputError(f"A batch of {b} {options.res}x{options.res} images does not fit in the memory of "
                                 f"{options.device}; lower --batch-size (now {options.batch_size}).") from exc
            except (RuntimeError, AssertionError) as exc:  # a model's own check of its input: torchvision's ViT
                raise forward_error(exc, options, f" from {path}") from exc
            batch = Batch(rows=batch_rows, labels=labels, logits=_as_float(out) if logits else None,
                          features=_as_float(feats) if features else None)
            nonfinite += _nonfinite_rows(batch.logits, batch.features)
            if check_each_batch and int(nonfinite):  # this rank alone: the ranks' batch counts may differ
                _check_finite(int(nonfinite), len(rows), surrogate, path, what, options, collective=False)
            yield batch
            bar.update(b)
    if pos != len(mine) or int(mismatches):
        raise DptoolError(f"The loader of {path} did not yield its {len(mine)} rows in file order; cannot score.")
    # after the last batch and before the caller reduces what it kept: no score is made of NaN outputs
    _check_finite(int(nonfinite), len(rows), surrogate, path, what, options)


def _nonfinite_rows(*outputs):
    """How many rows of the (B, ...) tensors `outputs` (None skipped) hold a NaN or an infinity, as a 0-d tensor on
    their device (no host synchronisation)."""
    import torch

    bad = None
    for t in outputs:
        if t is not None:
            rows = ~torch.isfinite(t).reshape(t.shape[0], -1).all(dim=1)
            bad = rows if bad is None else bad | rows
    return bad.sum()


def _surrogate_name(surrogate) -> str:
    identity = getattr(surrogate, "identity", None) or {}
    if identity.get("kind") == "factory":
        weights = f" with {identity['path']}" if "path" in identity else ""
        return f"--model-factory {identity.get('factory')}{weights}"
    return str(identity.get("path") or identity.get("arch") or type(getattr(surrogate, "model", surrogate)).__name__)


def _check_finite(count: int, total: int, surrogate, path, what: str, options: InferenceOptions, *,
                  collective: bool = True) -> None:
    """Refuse, on every rank alike (the counts are summed over ranks), outputs of the surrogate with a NaN or an
    infinity: an argmax or a nearest centroid of NaN picks some index, and the scores file would look valid."""
    from .distributed import world_size

    counts = np.array([count], np.int64)
    if collective and world_size() > 1:
        from .scoring._collective import all_reduce

        counts = all_reduce(counts)
    if not counts[0]:
        return
    precision = inference_precision(options)
    cause = {"fp16": f" (its forward pass ran under float16 autocast on {options.device}, which overflows above "
                     "65504: score with --precision bf16 or fp32)",
             "bf16": f" (its forward pass ran under bfloat16 autocast on {options.device}; --precision fp32 tells "
                     "whether the precision or the weights are at fault)"}.get(precision, "")
    some = "" if collective else "at least "
    raise InputError(f"The surrogate {_surrogate_name(surrogate)} gave non-finite {what} (NaN or inf) for "
                     f"{some}{int(counts[0])} of the {total} images of {getattr(path, 'path', path)} it ran on{cause}: "
                     "scores made of them would be meaningless, so none are written.")


def _as_float(t):
    if t is None:
        raise DptoolError("The surrogate produced no output for a batch (is --feature-layer on the forward path?).")
    if isinstance(t, (tuple, list)):  # some models return (logits, aux)
        t = t[0]
    return t.float()
