"""Scoring source classes (or clusters) for transfer to a target: LM, FM and baselines, behind one registry.

``score(method, source=..., target=..., surrogate=..., options=ScoreOptions(...))`` returns a `ScoreRun`
whose `scores` is the `dptool.scores.Scores` written by ``run.write(path)``. Methods register themselves with
`register_method`; `list_methods()` gives the names (the CLI's ``--method`` choices).
"""

from . import baselines, fm, lm  # noqa: F401 - importing registers the methods
from .kmeans import faiss_gpus, kmeans
from .pipeline import SURROGATE_KEYS, check_method_options, score_files
from .plot import plot_scores
from .registry import MethodSpec, get_method, list_methods, register_method
from .run import (
    MAX_UPSCALE,
    Context,
    MethodResult,
    ScoreOptions,
    ScoreRun,
    check_resolution,
    default_res,
    score,
    stored_resolution,
)

__all__ = [
    "MAX_UPSCALE",
    "Context",
    "MethodResult",
    "MethodSpec",
    "SURROGATE_KEYS",
    "ScoreOptions",
    "ScoreRun",
    "check_method_options",
    "check_resolution",
    "default_res",
    "faiss_gpus",
    "get_method",
    "kmeans",
    "list_methods",
    "plot_scores",
    "register_method",
    "score",
    "score_files",
    "stored_resolution",
]
