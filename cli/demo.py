"""`dptool demo`: the whole method on built-in data, on a CPU."""

from __future__ import annotations

from pathlib import Path

import click

from dptool.demo import DemoConfig, run_demo, with_overrides
from dptool.errors import MAX_SEED

from ._common import CONTEXT_SETTINGS, emit, force_option, json_option, show_progress

__all__ = ["command"]


def _table(result) -> str:
    lines = [f"{'method':<8}{'ratio':>6}{'pretrain images':>17}{'pretrain s':>12}{'target top-1 final':>20}"
             f"{'top-1 best epoch':>18}"]
    for r in result.rows:
        lines.append(f"{r.method:<8}{r.ratio:>6g}{r.pretrain_images:>17}{r.pretrain_seconds:>12.1f}"
                     f"{r.target_top1_final:>20.3f}{r.target_top1_best:>18.3f}")
    total = sum(result.stage_seconds.values())
    lines.append(f"stages: {total:.0f} s in all; plot {result.plot}; everything under {result.workdir}")
    return "\n".join(lines)


@click.command("demo", context_settings=CONTEXT_SETTINGS)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("dptool-demo"),
              help="Folder for the generated data, models, scores and pruned files.")
@click.option("--quick", is_flag=True, help="A smaller, shorter run (about a minute on two cores).")
@click.option("--ratio", type=click.FloatRange(0, 1, max_open=True), default=None, help="Pruning ratio  [default: 0.6]")
@click.option("--seed", type=click.IntRange(0, MAX_SEED),
              default=None, help="Seed of the data, training and baselines  [default: 0]")
@force_option
@json_option
def command(workdir, quick, ratio, seed, force, as_json):
    """Run the whole method on built-in data: convert, surrogate, score, prune, pretrain, linear probe.

    \b
    dptool demo --quick
    """
    config = with_overrides(DemoConfig.quick() if quick else DemoConfig(), ratio=ratio, seed=seed)
    emit(run_demo(workdir, config, force=force, progress=show_progress(as_json)), as_json, _table)
