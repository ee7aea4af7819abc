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


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _plan_table(r) -> str:
    """`--dry-run`: one row per output (the training file's, then the validation file's), totals, the ties."""
    noun = "clusters" if r.level == "cluster" else "classes"
    # the classes an output holds samples of: those its clusters touch, or at class level those of the kept classes a
    # validation file holds (one converted with --classes-from may lack some)
    classes = r.level == "cluster" or any(f.num_classes_kept != f.kept_groups for f in r.files)
    held = "classes" if r.level == "cluster" else "with samples"
    rows = [("split", "ratio", f"{noun} kept", *((held,) if classes else ()), "samples", "of", "share",
             "speed-up", "size", "output")]
    for f in r.files:
        rows.append((f.split, f"{f.ratio:g}", f"{f.kept_groups}", *((f"{f.num_classes_kept}",) if classes else ()),
                     f"{f.num_samples:,}", f"{f.source_samples:,}", f"{f.share:.1%}", f"{f.speedup:.2f}x",
                     _size(f.bytes), f"{f.output}{' (exists)' if f.exists else ''}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [f"dry run, nothing written: {r.method} scores, {r.groups} {noun} with samples"
             + (f" ({r.empty_groups} without)" if r.empty_groups else "")]
    lines += ["  ".join([c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
                        + [row[-1]]) for row in rows]
    # what prune can use: the free space, and the stale temporary files it removes before writing
    free = {id(d): d["free_bytes"] + d["stale_bytes"] for d in r.space}
    lines.append(f"{_size(r.bytes_to_write)} to write (.beton files), {_size(r.bytes_to_read)} to read; " + ", ".join(
        f"{_size(free[id(d)])} free in {d['folder']}"
        + (f" ({_size(d['stale_bytes'])} of it stale temporary files prune removes)" if d["stale_bytes"] else "")
        for d in r.space))
    lines += [f"{d['folder']}: {_size(d['bytes_to_write'])} to write but {_size(free[id(d)])} free; prune would "
              "fail there when the disk fills"
              + (f" (the {_size(d['replaced_bytes'])} of the files --force replaces are freed only after the new "
                 "ones are written)" if r.force and d["replaced_bytes"] else "")
              for d in r.space if d["bytes_to_write"] > free[id(d)]]
    existing = sum(f.exists for f in r.files)
    if existing:
        them = "it" if existing == 1 else "them"
        lines.append(f"{counted(existing, 'outputs')} {'exists' if existing == 1 else 'exist'}: "
                     + (f"--force replaces {them}" if r.force else f"prune refuses {them} without --force"))
    lines += _ties(r, [f for f in r.files if f.split == "train"])
    return "\n".join(lines)


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
@click.option("--dry-run", is_flag=True,
              help="Run every check and print what each ratio would keep (groups, samples, bytes, speed-up); "
                   "write nothing.")
@force_option
@json_option
def command(source, scores_path, ratio, keep, ratios, output, val, val_out, dry_run, force, as_json):
    """Write the top-scored classes (or FM clusters) of SOURCE to a new .beton by copying their stored bytes.

    \b
    dptool prune in_train.beton --scores scores.json --ratio 0.6 -o in_train_p60.beton
    dptool prune in_train.beton --scores scores.json --ratios 0.2,0.4,0.6,0.8 -o 'in_train_p{ratio}.beton'
    dptool prune in_train.beton --scores scores.json --ratios 0.2,0.4,0.6,0.8 -o 'in_train_p{ratio}.beton' --dry-run
    """
    result = prune(source, scores_path, output, ratio=ratio, keep=keep, ratios=ratios, val=val, val_output=val_out,
                   force=force, progress=show_progress(as_json), dry_run=dry_run)
    emit(result, as_json, _plan_table if dry_run else _human)
