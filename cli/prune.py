"""`dptool prune`: keep the top-scored classes (or FM clusters) of a source .beton, by byte copy."""

from __future__ import annotations

import click

from dptool.prune import prune

from ._common import CONTEXT_SETTINGS, ExistingFile, counted, emit, force_option, json_option, show_progress

__all__ = ["command"]


class _FloatList(click.ParamType):
    """Comma-separated numbers: 0.2,0.4,0.6."""

    name = "R1,R2,..."

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        try:
            return [float(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"must be comma-separated numbers such as 0.2,0.4,0.6, got {value!r}.", param, ctx)


def _human(r) -> str:
    lines = [
        f"{f.output}: {counted(f.num_samples, 'samples')}, {counted(f.num_classes_kept, 'classes')}, "
        f"{counted(f.kept_groups, 'clusters' if r.level == 'cluster' else 'classes')} kept (ratio {f.ratio:g}), "
        f"{f.bytes / 1e6:.1f} MB"
        for f in r.files
    ]
    train = [f for f in r.files if f.split == "train"]
    if len(train) == 1:
        kept = f"{counted(train[0].num_samples, 'samples')}, {counted(train[0].num_classes_kept, 'classes')}"
    else:
        kept = (f"{', '.join(str(f.num_samples) for f in train)} samples, "
                f"{', '.join(str(f.num_classes_kept) for f in train)} classes")
    lines.append(f"kept {kept}; {r.bytes_written / 1e6:.1f} MB written in {r.seconds:.2f} s "
                 f"({r.mb_per_second:.0f} MB/s)")
    lines += _ties(r, train)
    return "\n".join(lines)


def _ties(r, train) -> list[str]:
    """One line per score at which a cut fell among equal scores: how many of the tied groups the tie-break kept."""
    noun = "clusters" if r.level == "cluster" else "classes"
    by_tie: dict[tuple, list] = {}
    for f in train:
        if f.tie_score is not None:
            by_tie.setdefault((f.tie_score, f.tied), []).append(f)
    lines = []
    for (score, tied), files in by_tie.items():
        kept = ", ".join(str(f.tied_kept) for f in files)
        ratios = ", ".join(f"{f.ratio:g}" for f in files)
        lines.append(f"ratio {ratios}: the cut fell among the {tied} {noun} scoring {score:g}; {kept} of them kept, "
                     f"picked by the tie-break")
    if lines:
        lines.append(f"ties broken by {r.tie_break}")
    return lines


@click.command("prune", context_settings=CONTEXT_SETTINGS)
@click.argument("source", type=ExistingFile(path_type=str))
@click.option("--scores", "scores_path", required=True, type=ExistingFile(path_type=str),
              help="Scores file written by `dptool score`.")
@click.option("--ratio", type=float, default=None,
              help="Fraction of classes (or clusters) removed, in [0, 1): ratio x groups with samples, rounded half "
                   "up (0.5 of 3 removes 2).")
@click.option("--keep", type=int, default=None, help="Number of classes (or clusters) kept, instead of --ratio.")
@click.option("--ratios", type=_FloatList(), default=None, help="Several ratios in one pass; -o must hold {ratio}.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="Pruned .beton; 'out_{ratio}.beton' with --ratios.")
@click.option("--val", type=ExistingFile(path_type=str), default=None,
              help="Validation .beton to prune to the same classes (class-level scores only).")
@click.option("--val-out", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Pruned validation .beton (holds {ratio} with --ratios).")
@force_option
@json_option
def command(source, scores_path, ratio, keep, ratios, output, val, val_out, force, as_json):
    """Write the top-scored classes (or FM clusters) of SOURCE to a new .beton by copying their stored bytes.

    \b
    dptool prune in_train.beton --scores scores.json --ratio 0.6 -o in_train_p60.beton
    dptool prune in_train.beton --scores scores.json --ratios 0.2,0.4,0.6,0.8 -o 'in_train_p{ratio}.beton'
    """
    result = prune(source, scores_path, output, ratio=ratio, keep=keep, ratios=ratios, val=val, val_output=val_out,
                   force=force, progress=show_progress(as_json))
    emit(result, as_json, _human)
