"""The sorted score curve as a PNG: scores of all groups from best to worst, the top groups marked and listed."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..atomic import atomic_output, check_plot_path
from ..scores import Scores

__all__ = ["plot_scores", "top_lines"]

NAME_WIDTH = 36  # characters of a group's name in the plot's list; a longer one is cut with an ellipsis


def top_lines(scores: Scores, indices: np.ndarray) -> list[str]:
    """The plot's list: a heading, then one line per group at `indices` (positions in `scores`, best first): its rank
    as the scores file and the terminal's table count it (0 = kept first, as the x axis; a list numbered from 1 put
    "1." beside the axis's rank 0 and the table's "rank 0"), its name (cut to NAME_WIDTH with "…", never silently:
    "cluster 9: n04562313 100%" cut to "... 1" read as 1%) and score."""
    names = [scores.names[i] for i in indices]
    width = max(4, min(NAME_WIDTH, max((len(n) for n in names), default=0)))
    cut = [n if len(n) <= width else n[: width - 1] + "…" for n in names]
    return [f"{'rank':>4} {'name':<{width}} {'score':>10}",
            *(f"{int(scores.ranks[i]):>4} {name:<{width}} {scores.scores[i]:>10.4g}" for i, name in zip(indices, cut))]


def plot_scores(scores: Scores, path: str | os.PathLike, *, top: int = 10, force: bool = False) -> Path:
    """Write a PNG of the scores sorted by rank, the `top` groups marked on the curve and listed by name (Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out = check_plot_path(path, force=force)
    order = np.argsort(scores.ranks, kind="stable")
    values = scores.scores[order]
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=120)
    try:
        ax.plot(np.arange(len(values)), values, lw=1.5, color="tab:blue")
        ax.fill_between(np.arange(len(values)), values, alpha=0.15, color="tab:blue")
        shown = min(top, len(values))
        ax.scatter(np.arange(shown), values[:shown], s=10, color="tab:red", zorder=3)
        # a list rather than labels at the points: tied groups (often many at zero) sit side by side on the curve;
        # beside the axes, not over them, where it hid the tail of a curve that stays high (EL2N's)
        lines = top_lines(scores, order[:shown])
        if shown > 1 and len(np.unique(values[:shown])) < shown:
            lines.append("equal scores ordered by the tie-break")
        box = {"boxstyle": "round", "facecolor": "white", "alpha": 0.85}
        ax.text(1.02, 1.0, "\n".join([f"top {shown}", *lines]), transform=ax.transAxes, ha="left", va="top",
                multialignment="left", family="monospace", fontsize=7, bbox=box)
        noun = "classes" if scores.level == "class" else "clusters"
        zero = int((values == 0).sum())
        ax.set_title(f"{scores.method} scores of {len(values)} {noun}, best first ({zero} score zero)")
        ax.set_xlabel(f"{scores.level} rank (0 = kept first)")
        ax.set_ylabel("score")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_output(out) as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return out
