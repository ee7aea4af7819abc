"""Baselines to compare LM/FM against: random classes (seeded) and EL2N, an in-domain score aggregated per class.

* ``random``: each source class gets a distinct score from a seeded permutation; no model, no target.
* ``el2n`` (Paul et al. 2021): per source image, ``||softmax(f(x)) - onehot(y)||_2`` from the surrogate;
  the class score is the mean over at most ``source_sample`` images of the class. It never looks at the
  target: it keeps the classes that are hard *in domain*, which is why it does not serve transfer.
"""

from __future__ import annotations

import numpy as np

from ..features import stream
from ._collective import all_reduce
from .fm import sample_rows
from .registry import register_method
from .run import Context, MethodResult

__all__ = ["random_classes", "el2n", "EL2N_SCALE"]

EL2N_SCALE = float(2**24)  # fixed-point unit of summed EL2N: exact sums in float64 for up to 2^27 images/class


@register_method("random", needs_target=False, needs_surrogate=False, reads=("seed",),
                 help="baseline: a seeded random order of the source classes (--seed)")
def random_classes(ctx: Context) -> MethodResult:
    """Scores = a random permutation of 1..C seeded by ``options.seed`` (no ties)."""
    n_cls = ctx.source.num_classes
    with ctx.stage("random order"):
        scores = np.random.default_rng(ctx.options.seed).permutation(n_cls).astype(np.float64) + 1.0
    return MethodResult(level="class", ids=np.arange(n_cls), names=tuple(ctx.source.class_names), scores=scores,
                        tiebreak=np.zeros(n_cls), tie_break="score (a seeded random permutation of 1..C, all distinct: "
                        "no ties), then class id (lower first)", params={"seed": ctx.options.seed})


@register_method("el2n", needs_target=False, needs_logits=True, reads=("source_sample", "seed"),
                 help="in-domain baseline: mean EL2N (error L2 norm) of the surrogate per source class")
def el2n(ctx: Context) -> MethodResult:
    """Mean EL2N per source class over the sampled source images (higher = harder = kept first)."""
    import torch

    from ..kernels import class_histogram

    src, opts = ctx.source, ctx.options
    n_cls = src.num_classes
    rows = sample_rows(src.labels, n_cls, opts.source_sample, opts.seed)
    sums = np.zeros(n_cls, np.float64)
    counts = np.zeros(n_cls, np.int64)
    with ctx.stage("source inference"):
        for b in stream(ctx.surrogate, src, rows, options=opts.inference, progress=opts.progress,
                        desc="EL2N: source", check_each_batch=True):
            probs = torch.softmax(b.logits, dim=1)
            probs[torch.arange(len(probs), device=probs.device), b.labels] -= 1.0
            score = torch.round(torch.linalg.vector_norm(probs.double(), dim=1) * EL2N_SCALE).cpu().numpy()
            labels = b.labels.cpu().numpy()  # stream checks these against the file's labels of b.rows
            sums += np.asarray(class_histogram(labels, n_cls, weights=score), dtype=np.float64)
            counts += np.asarray(class_histogram(labels, n_cls), dtype=np.int64)
    sums, counts = all_reduce(sums), all_reduce(counts)
    scores = sums / EL2N_SCALE / np.maximum(counts, 1)
    return MethodResult(level="class", ids=np.arange(n_cls), names=tuple(src.class_names), scores=scores,
                        tiebreak=np.zeros(n_cls), tie_break="score (mean EL2N of the class, higher first), then "
                        "class id (lower first)", params={"source_sample": opts.source_sample, "seed": opts.seed,
                                                          "sampled_images": int(len(rows))},
                        extra={"images_per_class": counts.tolist()})
