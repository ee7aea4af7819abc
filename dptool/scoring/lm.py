"""LM (label mapping): score of source class c = number of target training images the surrogate predicts as c.

Each rank runs the surrogate over its shard of the target, keeping 8 bytes per image (top-1 prediction and
target label, int32) and one fixed-point sum of softmax probabilities per source class. The histograms are
computed with the `dptool.kernels` histogram kernels and summed over ranks. Probabilities are summed as
integers (units of 2^-40) so that summing them adds no rounding of its own, whatever the sharding and order;
the probabilities themselves can still differ in the last bits with the batch size (the forward pass's own
floating point), measured up to 4e-7 of a class's sum between batch sizes 3 and 256.
"""

from __future__ import annotations

import time

import numpy as np

from ..features import stream
from ._collective import all_reduce
from .registry import register_method
from .run import Context, MethodResult

__all__ = ["label_mapping", "TIE_BREAK", "PROB_SCALE", "FIRST_BATCH_STAGE"]

PROB_SCALE = float(2**40)  # fixed-point unit of the summed softmax; 2^40 x 1.3M images < 2^63
TIE_BREAK = ("score (target images predicted as the class), then summed softmax probability of the class over "
             "all target images (higher first), then class id (lower first)")
FIRST_BATCH_STAGE = "target inference: first batch (loader set-up)"  # a timing: loader set-up + first batch


@register_method("lm", needs_logits=True,
                 help="label mapping: count target images the surrogate predicts as each source class")
def label_mapping(ctx: Context) -> MethodResult:
    """LM scores (C_source,), the summed-softmax tie-break, and the source x target joint histogram in extra."""
    import torch

    from ..kernels import class_histogram, joint_histogram

    n_src, n_tgt = ctx.source.num_classes, ctx.target.num_classes
    opts = ctx.options.inference
    preds, labels = [], []
    prob_sum = torch.zeros(n_src, dtype=torch.int64, device=opts.device)
    start, first = time.perf_counter(), None
    with ctx.stage("target inference"):
        for batch in stream(ctx.surrogate, ctx.target, np.arange(ctx.target.num_samples), options=opts,
                            progress=ctx.options.progress, desc="LM: target"):
            if first is None:  # loader set-up: FFCV compiles its stages (or loads them from the disk cache)
                first = time.perf_counter() - start
            probs = torch.softmax(batch.logits, dim=1)
            preds.append(batch.logits.argmax(dim=1).to(torch.int32))
            labels.append(batch.labels.to(torch.int32))
            prob_sum += torch.round(probs.double() * PROB_SCALE).to(torch.int64).sum(dim=0)
    ctx.timings[FIRST_BATCH_STAGE] = first or 0.0
    with ctx.stage("histograms"):
        p = torch.cat(preds).cpu().numpy() if preds else np.zeros(0, np.int32)
        y = torch.cat(labels).cpu().numpy() if labels else np.zeros(0, np.int32)
        counts = all_reduce(np.asarray(class_histogram(p, n_src), dtype=np.int64))
        joint = all_reduce(np.asarray(joint_histogram(p, y, n_src, n_tgt), dtype=np.int64))
        mass = all_reduce(prob_sum.cpu().numpy())
    tiebreak = mass.astype(np.float64) / PROB_SCALE
    nonzero = np.nonzero(joint.sum(axis=1))[0]
    extra = {
        "target_class_names": list(ctx.target.class_names),
        "joint_histogram": {  # sparse rows: only the source classes some target image maps to
            "rows": "source class", "columns": "target class",
            "counts": {str(int(c)): joint[c].tolist() for c in nonzero},
        },
        "target_images": int(counts.sum()),
    }
    return MethodResult(level="class", ids=np.arange(n_src), names=tuple(ctx.source.class_names),
                        scores=counts.astype(np.float64), tiebreak=tiebreak, tie_break=TIE_BREAK, extra=extra)
