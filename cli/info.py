"""`dptool info`: what a .beton, a scores file, a checkpoint or a run's log holds (and a run's curves)."""

from __future__ import annotations

import math
import statistics

import click

from dptool.distributed import torchrun_command
from dptool.info import describe
from dptool.runlog import epochs_text, resumed_text

from ._common import CONTEXT_SETTINGS, counted, emit, force_option, group_noun, json_option, score_table

__all__ = ["command"]


def _beton(s: dict) -> str:
    lines = [f"{s['path']}: {counted(s['num_samples'], 'samples')}, {s['file_size'] / 1e6:.1f} MB, page size "
             f"{s['page_size']}"]
    lines.append("fields: " + ", ".join(f"{k} ({v})" for k, v in s["fields"].items()))
    if s.get("writer"):
        w = s["writer"]
        lines.append(
            f"writer: max-res {w.get('max_resolution')}, {w.get('write_mode')}, jpeg quality "
            f"{w.get('jpeg_quality')}, compress-prob {w.get('compress_probability')}"
        )
    if s.get("source"):
        split = s["source"].get("split")
        ref = (s["source"].get("classes_from") or {}).get("path")  # convert --classes-from
        lines.append(f"source: {s['source'].get('format')} {s['source'].get('path')}"
                     + (f" ({split})" if split else "") + (f", labelled by the classes of {ref}" if ref else ""))
    if s.get("pruning"):
        lines.append(_pruned(s["pruning"]))
    if s["skipped"]:
        lines.append(f"skipped at conversion: {counted(s['skipped'], 'files')} (listed in the sidecar)")
    if "classes" in s:
        lines += _classes(s["classes"], s["num_classes"])
    lines.append(f"fingerprint: {s['fingerprint']}")
    if s.get("digests"):
        state = s["digests"]["state"]
        lines.append(f"digests of every sample: {s['digests']['path']} ({state}"
                     + ("; `dptool verify` checks them)" if state == "present, unchanged" else ")"))
    if s.get("sidecar_matches") is False:
        shown = ("the file is shown without it; other commands refuse it until it is deleted"
                 if s.get("sidecar_ignored") else "class names, writer and provenance above come from it")
        lines.append(f"warning: the sidecar {s['sidecar']} was not written for this file ({s['sidecar_problem']}); "
                     f"{shown}")
    return "\n".join(lines)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _pruned(p: dict) -> str:
    """The sidecar's pruning record in a line: the ratio as prune prints it (0.166667 for a --keep), the groups kept
    and, where the cut fell among equal scores, how many of them the tie-break kept; a record edited by hand is shown
    as far as it reads (a tie_at_cut without its numbers stopped info with "internal error: KeyError")."""
    ratio, tie = p.get("ratio"), p.get("tie_at_cut")
    by_tie = (f" ({tie['kept']} of the {tie['groups']} scoring {tie['score']:g} picked by the tie-break)"
              if isinstance(tie, dict) and all(_number(tie.get(k)) for k in ("score", "groups", "kept")) else "")
    return (f"pruned: ratio {f'{ratio:g}' if _number(ratio) else ratio}, "
            f"{counted(p.get('kept_groups', '?'), 'groups')} kept{by_tie}, scores {p.get('scores')}")


_LISTED = 50  # classes listed by name; more are summed up


def _classes(classes: list[dict], num_classes: int) -> list[str]:
    """The class table: every class when there are at most 50; else the first 50 with samples (a pruned ImageNet
    file listed 50 label ids of which 20 were pruned away, count 0) and the per-class counts' range."""
    present = [c for c in classes if c["count"]]
    head = f"classes: {num_classes} ({len(present)} with samples"
    if len(classes) <= _LISTED:
        return [head + ")", *_class_rows(classes)]
    counts = [c["count"] for c in present]
    if counts:
        head += f", {min(counts)} to {max(counts)} each, median {statistics.median(counts):g}"
    lines = [head + ")", *_class_rows(present[:_LISTED])]
    more = [f"{len(present) - _LISTED} more with samples"] if len(present) > _LISTED else []
    if len(present) < len(classes):
        more.append(f"{counted(len(classes) - len(present), 'classes')} without samples")
    lines.append(f"  ... {' and '.join(more)} (use --json for all)")
    return lines


def _class_rows(classes: list[dict]) -> list[str]:
    return [f"  {c['label']:>5}  {c['count']:>8}  {c['name']}" for c in classes]


def _file(d: dict | None) -> str:
    return (f"{d['path']} ({counted(d['num_samples'], 'samples')}, {counted(d['num_classes'], 'classes')}, "
            f"{d['fingerprint']})" if d else "-")


def _scores(s: dict) -> str:
    sur = s["surrogate"] or {}
    lines = [f"{s['path']}: {s['method']} scores of {s['groups']} {group_noun(s['level'])}, written {s['created']}",
             f"source: {_file(s['source'])}", f"target: {_file(s['target'])}"]
    if sur:
        shown = dict(sur)
        if shown.get("kind") == "state_dict" and shown.get("num_classes") is None:
            shown["num_classes"] = "none (a backbone without a classifier)"
        lines.append("surrogate: " + ", ".join(f"{k} {v}" for k, v in shown.items() if k not in ("sha256",)))
    if s["params"]:
        lines.append("params: " + ", ".join(f"{k} {v}" for k, v in s["params"].items()))
    lines += score_table(s)
    if s["assignment"]:
        lines.append(f"cluster of every source image: {s['assignment']['path']} ({s['assignment']['state']})")
    if s.get("centroids"):
        lines.append(f"centroids: {s['centroids']['path']} ({s['centroids']['state']})")
    return "\n".join(lines)


def _metrics(record: dict) -> str:
    keys = ("train_loss", "train_top1", "val_top1", "val_top1_all", "val_top5", "test_top1")
    return ", ".join(f"{k} {record[k]:.4g}" for k in keys if isinstance(record.get(k), (int, float)))


def _best_test_epoch(summary: dict) -> str:
    """The epoch of a finetune summary's best test top-1 as " (epoch N)", counted from 1 (`best_test_epoch`: from 0)."""
    best = summary.get("best_test_epoch")
    return f" ({epochs_text([best])})" if isinstance(best, int) else ""


def _test_top1(summary: dict) -> str:
    """A finetune summary's final and best test top-1, in percent as the log's table and best-epoch line show them
    (a fraction printed "final 1" beside "100.00%" read as a count)."""
    final, best = (summary.get(k) for k in ("final_test_top1", "best_test_top1"))
    return f"test top-1: final {_percent(final)}, best {_percent(best)}{_best_test_epoch(summary)}"


def _percent(value) -> str:
    return f"{value:.2%}" if isinstance(value, (int, float)) else "?"


def _checkpoint(s: dict) -> str:
    stem = " (small-input stem)" if s["small_input"] else ""
    lines = [f"{s['path']}: {s['arch']}{stem}, {counted(s['num_classes'], 'classes')}, "
             f"{s['parameters'] / 1e6:.2f}M parameters, "
             f"{s['epochs_done']} epoch{'s' if s['epochs_done'] != 1 else ''} of {s['run']}"]
    if s["resumable"] and s["run"] == "finetune":  # only a stopped run's checkpoint keeps the state
        lines[0] += "; stopped early: `finetune --resume` (with its options and -o this file) continues it"
    elif s["resumable"]:
        planned, world = s["recipe"].get("epochs"), s["recipe"].get("world_size")
        how, total = "", ""
        if isinstance(world, int) and world > 1:  # --resume refuses another world size
            command = torchrun_command(world, s["recipe"])  # None: a checkpoint that does not record the split
            how, total = (f"{command} ... ", "") if command else ("torchrun ... ", f" with {world} processes in all")
        peak, capped = s["recipe"].get("effective_lr_peak_epoch"), s["recipe"].get("lr_peak_epoch")
        keep = (f" --lr-peak-epoch {peak:g}" if isinstance(peak, (int, float)) and isinstance(capped, (int, float))
                and peak < capped else "")  # more epochs would move a capped peak: train --resume refuses that
        lines[0] += (f"; stopped early: `{how}train --resume`{total} continues it" if planned
                     and s["epochs_done"] < planned
                     else f"; optimizer state kept (`{how}train --resume --epochs N{keep}`{total} extends it)")
    for key, what, who in (("nonfinite_weights", "weights", "score, finetune and --resume refuse"),
                           ("nonfinite_moments", "optimizer moments", "--resume refuses")):
        bad = s.get(key)
        if bad:
            hold = "tensors hold" if len(bad) != 1 else "tensor holds"
            lines.append(f"non-finite {what}: {len(bad)} {hold} NaN or inf (first: {bad[0]}); {who} this "
                         "checkpoint")
    if s["data"] or s["data_fingerprint"]:
        lines.append(f"trained on: {s['data'] or '?'} ({s['data_fingerprint']})")
    if s["pretrained"]:
        lines.append(f"finetuned from: {s['pretrained']}")
    if s["kept_classes"] is not None:
        lines.append(f"pruned data: {s['kept_classes']} of {counted(s['num_classes'], 'classes')} kept")
    recipe = s["recipe"].get("finetune", s["recipe"])
    shown = ("epochs", "mode", "optimizer", "schedule", "lr_peak_epoch", "batch_size", "effective_batch_size", "lr",
             "effective_lr", "min_res", "max_res", "res", "label_smoothing", "weight_decay", "seed")
    lines.append("recipe: " + ", ".join(_recipe_item(k, recipe, recipe.get("effective_lr_peak_epoch")) for k in shown
                                        if recipe.get(k) is not None))
    if s["last_epoch"]:
        lines.append(f"last epoch: {_metrics(s['last_epoch'])}")
    if s["best_val_top1"] is not None:
        lines.append(f"best val_top1: {s['best_val_top1']:.4g}")
    if s["finetune_summary"]:
        lines.append(_test_top1(s["finetune_summary"]))
    return "\n".join(lines)


def _recipe_item(key: str, recipe: dict, peak_epoch) -> str:
    """`key value` of a recipe line; --lr-peak-epoch with the epoch the run peaked at when half of --epochs capped
    it (a 10-epoch warm-up shown for a run that peaked at epoch 1 would misstate its schedule)."""
    if key == "lr_peak_epoch" and isinstance(peak_epoch, (int, float)) and peak_epoch < recipe[key]:
        return f"{key} {recipe[key]} (capped at {peak_epoch:g}, half of the epochs)"
    return f"{key} {recipe[key]}"


_CELLS = {  # column: (heading, format), each right-aligned in 7 characters after two spaces
    "train_loss": ("loss", "{:.4f}"), "train_top1": ("train@1", "{:.2%}"), "val_top1": ("val@1", "{:.2%}"),
    "val_top5": ("val@5", "{:.2%}"), "val_top1_all": ("all@1", "{:.2%}"), "test_top1": ("test@1", "{:.2%}"),
    "lr": ("lr", "{:.3g}"), "res": ("res", "{}"), "images_per_s": ("img/s", "{:.0f}"),
    "epoch_time_s": ("epoch s", None),  # one format for the column: `_seconds_format`
}


def _seconds_format(records: list[dict], column: str) -> str:
    """One format for a column of seconds: as many decimals as keep its smallest positive value to 3 significant
    digits (0 to 5), fewer when its largest would not fit the 7 characters ("{:.3g}" printed 0.1 beside 0.0772, and
    an ImageNet epoch of 1234 s as 1.23e+03)."""
    values = [v for r in records if isinstance(v := r.get(column), (int, float)) and math.isfinite(v)]
    positive = [v for v in values if v > 0]
    decimals = min(5, max(0, 2 - math.floor(math.log10(min(positive))))) if positive else 2
    widest = len(f"{max(values, key=abs):.0f}") if values else 1
    return f"{{:.{max(0, min(decimals, 7 - 1 - widest))}f}}"


def _cell(record: dict, column: str, fmt: str) -> str:
    value = record.get(column)
    return f"  {fmt.format(value) if isinstance(value, (int, float)) else '-':>7}"


def _run_log(s: dict) -> str:
    what = f"{s['run']} ({s['mode']})" if s["mode"] else s["run"]
    planned = s["epochs_planned"]
    state = ("complete" if s["complete"] else "running or stopped"
             + f"; `{s['run']} --resume` continues a stopped one")
    lines = [f"{s['path']}: log of {what}, {s['arch'] or '?'}, {s['epochs_done']}"
             + (f" of {planned}" if planned else "") + f" epoch{'s' if (planned or s['epochs_done']) != 1 else ''} "
             f"({state})"]
    if s["pretrained"]:
        lines.append(f"finetuned from: {s['pretrained']}")
    data = f"{s['data'] or '?'}" + (f" ({counted(s['num_samples'], 'images')})" if s["num_samples"] else "")
    lines.append(f"data: {data}" + (f", {counted(s['num_classes'], 'classes')}" if s["num_classes"] else "")
                 + (f" ({s['kept_classes']} kept by pruning)" if s["kept_classes"] is not None else "")
                 + "".join(f"; {k} {s[k]}" for k in ("val", "test") if s[k]))
    recipe = s["recipe"]
    shown = ("mode", "optimizer", "schedule", "lr_peak_epoch", "batch_size", "lr", "min_res", "max_res", "res",
             "label_smoothing", "weight_decay", "val_fraction", "seed")
    parts = [_recipe_item(k, recipe, s.get("effective_lr_peak_epoch")) for k in shown if recipe.get(k) is not None]
    parts += [f"{k.replace('_', ' ')} {s[k]}" for k in ("effective_batch_size", "effective_lr", "world_size", "device",
                                                         "precision") if s.get(k) is not None]
    if parts:
        lines.append("recipe: " + ", ".join(parts))
    if s["first_epoch"]:
        lines.append(f"this log begins with {epochs_text([s['first_epoch']])} (a resume logged under another --log)")
    if s["resumed_at"]:
        lines.append(resumed_text(s["resumed_at"]))
    if s["repeated_epochs"]:
        lines.append(f"logged more than once (the last record kept): {epochs_text(s['repeated_epochs'])}")
    if s["epochs"]:
        lines.append(f"{'epoch':>5}" + "".join(f"  {_CELLS[c][0]:>7}" for c in s["columns"]))
        formats = {c: _CELLS[c][1] or _seconds_format(s["epochs"], c) for c in s["columns"]}
        lines += [f"{r['epoch'] + 1:>5}" + "".join(_cell(r, c, formats[c]) for c in s["columns"]) for r in s["epochs"]]
    else:
        lines.append("no epoch finished yet")
    if s["best"]:
        b = s["best"]
        lines.append(f"best epoch: {b['epoch'] + 1} ({b['metric']} {b['value']:.2%})")
    if s["summary"]:
        lines.append(_test_top1(s["summary"]))
    if s["partial_line"]:
        lines.append("the last line is incomplete (being written) and was left out")
    return "\n".join(lines)


def _human(s: dict) -> str:
    text = {"beton": _beton, "scores": _scores, "checkpoint": _checkpoint, "run_log": _run_log}[s["kind"]](s)
    return text + (f"\nplot: {s['plot']}" if s.get("plot") else "")


@click.command("info", context_settings=CONTEXT_SETTINGS)
@click.argument("path", type=click.Path(path_type=str))
@click.option("--plot", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="PNG of a run's curves (loss, top-1, schedule), from its log or checkpoint (a .png path).")
@force_option
@json_option
def command(path, plot, force, as_json):
    """Show what a .beton, a scores file, a dptool checkpoint or a train/finetune log holds.

    \b
    dptool info imagenet_train.beton --json     # samples, classes, fields, writer, provenance
    dptool info scores.json                     # method, source/target/surrogate, top groups
    dptool info surrogate.pt                    # architecture, data, recipe, last and best metrics
    dptool info surrogate.jsonl --plot run.png  # the run's epochs as a table, its curves as a PNG
    """
    emit(describe(path, plot=plot, force=force), as_json, _human)
