"""The sorted score curve as a PNG: scores of all groups from best to worst, the top groups marked and listed."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..atomic import atomic_output, check_plot_path
from ..scores import Scores

__all__ = ["plot_scores"]


def plot_scores(scores: Scores, path: str | os.PathLike, *, top: int = 10, force: bool = False) -> Path:
    """Write a PNG of the scores sorted by rank, the `top` groups marked on the curve and listed by name (Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out = check_plot_path(path, force=force)
    order = np.argsort(scores.ranks, kind="stable")
    values = scores.scores[order]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    try:
        ax.plot(np.arange(len(values)), values, lw=1.5, color="tab:blue")
        ax.fill_between(np.arange(len(values)), values, alpha=0.15, color="tab:blue")
        shown = min(top, len(values))
        ax.scatter(np.arange(shown), values[:shown], s=10, color="tab:red", zorder=3)
        # a list rather than labels at the points: tied groups (often many at zero) sit side by side on the curve
        lines = [f"{rank + 1:>2}. {scores.names[i][:24]:<24} {scores.scores[i]:>10.4g}"
                 for rank, i in enumerate(order[:shown])]
        if shown > 1 and len(np.unique(values[:shown])) < shown:
            lines.append("equal scores ordered by the tie-break")
        box = {"boxstyle": "round", "facecolor": "white", "alpha": 0.85}
        ax.text(0.98, 0.96, "\n".join([f"top {shown}", *lines]), transform=ax.transAxes, ha="right", va="top",
                multialignment="left", family="monospace", fontsize=7, bbox=box)
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
