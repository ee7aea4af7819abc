"""The sorted score curve as a PNG: scores of all groups from best to worst, the top groups labelled."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..atomic import atomic_output, check_output_path
from ..scores import Scores

__all__ = ["plot_scores"]


def plot_scores(scores: Scores, path: str | os.PathLike, *, top: int = 10, force: bool = False) -> Path:
    """Write a PNG of the scores sorted by rank, with the `top` groups' names beside their points (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out = check_output_path(path, force=force)
    order = np.argsort(scores.ranks, kind="stable")
    values = scores.scores[order]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    try:
        ax.plot(np.arange(len(values)), values, lw=1.5, color="tab:blue")
        ax.fill_between(np.arange(len(values)), values, alpha=0.15, color="tab:blue")
        for rank, i in enumerate(order[:top]):
            ax.annotate(scores.names[i][:28], (rank, scores.scores[i]), fontsize=7, rotation=30,
                        xytext=(4, 4), textcoords="offset points")
        ax.scatter(np.arange(min(top, len(values))), values[:top], s=10, color="tab:red", zorder=3)
        noun = "classes" if scores.level == "class" else "clusters"
        zero = int((values == 0).sum())
        ax.set_title(f"{scores.method} scores of {len(values)} {noun}, best first ({zero} score zero)")
        ax.set_xlabel(f"{scores.level} rank (0 = kept first)")
        ax.set_ylabel("score")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_output(out) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return out
