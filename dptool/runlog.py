"""A `train` or `finetune` run read back from its JSON-lines log (or a checkpoint's history) and drawn as curves.

The log `train` writes is a ``{"event": "config", ...}`` line, then one ``{"event": "epoch", ...}`` line per epoch;
a `--resume` keeps the lines of the epochs before the one it starts from and appends a ``{"event": "resume", ...}``
line and its epochs (under another `--log`, the log starts with that line). `finetune` writes a config line, one
line per epoch and a ``{"event": "summary", ...}`` line. `read_run_log` returns a plain-JSON summary of either (kind
``run_log``); `run_from_history` builds the same from the history a checkpoint holds; `plot_run` draws one.
`JsonLog` writes the log as a run goes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from . import distributed as dist
from .atomic import atomic_output, check_plot_path
from .errors import InputError

__all__ = ["COLUMNS", "JsonLog", "is_run_log", "read_records", "read_run_log", "run_from_history", "plot_run",
           "epochs_text", "resumed_text"]

log = logging.getLogger(__name__)

# per-epoch metrics, in the order a table shows them; a run shows those its records hold
COLUMNS = ("train_loss", "train_top1", "val_top1", "val_top5", "val_top1_all", "test_top1", "lr", "res",
           "images_per_s", "epoch_time_s")
_HEADS = ("config", "resume")  # the events that open a log (a resume under another --log opens with its own)


def _is_head(record) -> bool:
    """Whether `record` is the config (or resume) line a dptool log opens with."""
    return (isinstance(record, dict) and record.get("event") in _HEADS and isinstance(record.get("config"), dict))


def is_run_log(path: str | os.PathLike) -> bool:
    """Whether the file at `path` starts like a dptool train or finetune log (a config or resume line)."""
    try:
        with open(path, "rb") as f:  # the first line's bytes alone: a later line may not be UTF-8
            return _is_head(json.loads(f.readline()))
    except (OSError, UnicodeDecodeError, ValueError):
        return False


def _records(p: Path) -> tuple[list[dict], bool]:
    """The records of the log at `p`, and whether an incomplete last line (a run writing it) was left out."""
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{p} is not UTF-8 text, so not a dptool train or finetune log.") from exc
    lines = text.split("\n")
    tail = lines.pop()  # after the last newline: empty when the file ends with a complete line
    records: list[dict] = []
    partial = False
    for number, line in enumerate([*lines, tail], 1):
        if not line.strip():
            continue
        try:
            rec = _record(p, number, line)
        except InputError:
            if number <= len(lines):
                raise
            partial = True  # a last line without its newline that does not parse: still being written
            continue
        if rec["event"] == "config" and records:  # dptool starts a log anew for a new run (--force)
            raise InputError(f"{p} holds more than one run (a second config line, line {number}); a log holds one "
                             "run: split the file there.")
        records.append(rec)
    if not records or not _is_head(records[0]):
        raise InputError(f"{p} is not a dptool train or finetune log: its first line is not a "
                         '{"event": "config", ...} record.')
    return records, partial


def read_records(path: str | os.PathLike) -> tuple[list[dict], bool]:
    """The records of the train or finetune log at `path`, in file order, and whether an incomplete last line was
    left out; any other line that is not a log record is an InputError naming it."""
    return _records(Path(path))


def _record(p: Path, number: int, line: str) -> dict:
    """Line `number` of the log `p`, parsed: a JSON object with an ``event`` (an epoch's with its ``epoch``, a
    resume's with its ``start_epoch``)."""
    try:
        rec = json.loads(line)
    except ValueError as exc:
        raise InputError(f"Line {number} of {p} is not JSON ({exc}); a dptool log holds one JSON object a "
                         "line.") from exc
    if not isinstance(rec, dict) or not isinstance(rec.get("event"), str):
        raise InputError(f'Line {number} of {p} is not a log record (a JSON object with an "event").')
    if rec["event"] == "epoch" and not _is_int(rec.get("epoch")):
        raise InputError(f'Line {number} of {p} is an epoch record without an integer "epoch".')
    if rec["event"] == "resume" and not _is_int(rec.get("start_epoch")):
        raise InputError(f'Line {number} of {p} is a resume record without an integer "start_epoch".')
    return rec


def _is_int(value) -> bool:
    """Whether `value` is a JSON integer (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


class JsonLog:
    """A JSON-lines log rewritten atomically after each record (an interrupted run leaves the last complete one).

    With `hold`, records stay in memory until `release()`: a run interrupted before its first checkpoint then
    leaves no log behind that would block the rerun (and that no --resume could continue).
    """

    def __init__(self, path: str | os.PathLike | None, records: list[dict] | None = None, *, hold: bool = False):
        self.path = Path(path) if path else None
        self.records: list[dict] = list(records or [])
        self.hold = hold

    @classmethod
    def resume(cls, path: str | os.PathLike | None, before_epoch: int, history: Sequence[dict] = ()) -> JsonLog:
        """Reopen an earlier log, keeping records of epochs before `before_epoch`, held until the first epoch's
        record: a resume stopped or diverged before it leaves the log as it was. A line that is not a log record
        is an InputError naming it; an incomplete last line (a copy of the log made while it was rewritten) is left
        out with a warning, as `dptool info` leaves it out, and the epochs it held are taken from `history`, the
        checkpoint's records of the epochs it trained."""
        if not path or not Path(path).exists():
            return cls(path, [], hold=True)
        try:
            found, partial = read_records(path)
        except InputError as exc:
            text = str(exc).rstrip(".")
            raise InputError(f"Cannot resume: {text[:1].lower() + text[1:] if text.startswith('Line ') else text}; "
                             "mend it, or give --log a new file.") from exc
        records = [r for r in found if r["event"] != "epoch" or r["epoch"] < before_epoch]
        if partial:
            logged = max((r["epoch"] for r in records if r["event"] == "epoch"), default=-1)
            restored = [h for h in history if isinstance(h.get("epoch"), int) and logged < h["epoch"] < before_epoch]
            records += [{"event": "epoch", **h} for h in restored]
            if dist.is_main():
                log.warning("the last line of %s is incomplete (a copy made while it was written?); it is left out%s",
                            path, f", and the checkpoint's records of the {len(restored)} epoch(s) missing from the "
                            "log put in its place" if restored else "")
        return cls(path, _without_idle_resumes(records), hold=True)

    def write(self, record: dict) -> None:
        """Append `record` (on rank 0; other ranks keep nothing)."""
        if not dist.is_main():
            return
        self.records.append(record)
        self._flush()

    def release(self) -> None:
        """Stop holding: write the records so far, and every later one as it comes."""
        if self.hold:
            self.hold = False
            self._flush()

    def _flush(self) -> None:
        if self.path is not None and not self.hold and dist.is_main():
            with atomic_output(self.path) as tmp:
                tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in self.records))


def _without_idle_resumes(records: list[dict]) -> list[dict]:
    """`records` less the resume lines that no epoch record follows (before the next resume line, or the end): resumes
    that trained no epoch, which `train` wrote as they started before it held the line until the first epoch. The
    resume about to be written supersedes them; `dptool info` would show each as a resume."""
    kept: list[dict] = []
    for rec in records:
        if rec["event"] == "resume" and kept and kept[-1]["event"] == "resume":
            kept.pop()
        kept.append(rec)
    return kept[:-1] if kept and kept[-1]["event"] == "resume" else kept


def _epochs(records: list[dict]) -> tuple[list[dict], list[int]]:
    """The epoch records in epoch order, the last of a repeated epoch kept, and the repeated epochs."""
    by_epoch: dict[int, dict] = {}
    repeated = set()
    for rec in records:
        if rec.get("event") == "epoch":
            if rec["epoch"] in by_epoch:
                repeated.add(rec["epoch"])
            by_epoch[rec["epoch"]] = rec
    return [by_epoch[e] for e in sorted(by_epoch)], sorted(repeated)


def _best(rows: list[dict]) -> dict | None:
    """The best epoch by validation top-1 (by test top-1 for a finetune run without validation), the first of
    ties, as `finetune` picks it; None without either metric."""
    for metric in ("val_top1", "test_top1"):
        scored = [r for r in rows if isinstance(r.get(metric), (int, float))]
        if scored:
            best = max(scored, key=lambda r: r[metric])  # max keeps the first of equal values
            return {"metric": metric, "epoch": best["epoch"], "value": best[metric]}
    return None


def _table(rows: list[dict]) -> dict:
    """What every run summary holds about its epochs: the records, the columns they fill, the best epoch."""
    return {"columns": [c for c in COLUMNS if any(c in r for r in rows)], "epochs": rows, "best": _best(rows),
            "epochs_logged": len(rows), "last_epoch": rows[-1]["epoch"] if rows else None}


def read_run_log(path: str | os.PathLike) -> dict:
    """Summary of the train or finetune log at `path`: what ran (arch, data, recipe), every epoch's record in epoch
    order, the best epoch, resumes, and whether the run is complete. A last line without its newline that does not
    parse (a run writing it) is left out (``partial_line``); an epoch logged twice keeps its last record."""
    p = Path(path)
    records, partial = _records(p)
    heads = [r for r in records if _is_head(r)]
    first, last = heads[0], heads[-1]
    rows, repeated = _epochs(records)
    summary = next((r for r in reversed(records) if r.get("event") == "summary"), None)
    run = "finetune" if "test" in first and "checkpoint" in first else "train"
    cfg = last["config"]
    planned = cfg.get("epochs") if isinstance(cfg.get("epochs"), int) else None
    done = rows[-1]["epoch"] + 1 if rows else first.get("start_epoch", 0)
    out = {
        "kind": "run_log", "path": str(p), "run": run, "mode": cfg.get("mode") if run == "finetune" else None,
        "arch": first.get("arch", cfg.get("arch")), "data": first.get("train" if run == "finetune" else "data"),
        "val": last.get("val"), "test": first.get("test"), "pretrained": first.get("checkpoint"),
        "num_classes": last.get("num_classes"), "num_samples": last.get("num_samples"),
        "kept_classes": last.get("kept_classes"), "device": last.get("device"), "precision": last.get("precision"),
        "world_size": last.get("world_size"), "effective_batch_size": last.get("effective_batch_size"),
        "effective_lr": last.get("effective_lr"), "effective_lr_peak_epoch": last.get("effective_lr_peak_epoch"),
        "recipe": cfg, "epochs_planned": planned, "epochs_done": done,
        "first_epoch": first.get("start_epoch", 0) if first["event"] == "resume" else 0,
        "resumed_at": [h.get("start_epoch") for h in heads[1:] if h["event"] == "resume"],  # the first: first_epoch
        "complete": summary is not None if run == "finetune" else planned is not None and done >= planned,
        "partial_line": partial, "repeated_epochs": repeated, "summary": summary, **_table(rows),
    }
    return out


def run_from_history(history: list[dict], *, path: str | os.PathLike, run: str, arch: str, data: str | None,
                     epochs_planned: int | None, mode: str | None = None) -> dict:
    """The part of a run summary that `plot_run` draws, built from a checkpoint's per-epoch `history`."""
    rows, repeated = _epochs([{"event": "epoch", **h} for h in history if isinstance(h.get("epoch"), int)])
    return {"kind": "checkpoint", "path": str(path), "run": run, "mode": mode, "arch": arch, "data": data,
            "epochs_planned": epochs_planned, "epochs_done": rows[-1]["epoch"] + 1 if rows else 0,
            "resumed_at": [], "repeated_epochs": repeated, **_table(rows)}


_STYLE = {  # metric: (label, colour, line style)
    "train_top1": ("train", "tab:gray", "-"), "val_top1": ("val", "tab:blue", "-"),
    "val_top5": ("val top-5", "tab:blue", ":"), "val_top1_all": ("val, all classes", "tab:purple", "--"),
    "test_top1": ("test", "tab:red", "-"),
}


def epochs_text(epochs: Sequence[int]) -> str:
    """The 0-based epoch indices `epochs` (as logs and `--json` hold them) as a person reads them, counted from 1:
    [2] is "epoch 3", [1, 2, 4] is "epochs 2, 3 and 5"."""
    shown = [str(e + 1) for e in epochs]
    return f"epoch {shown[0]}" if len(shown) == 1 else "epochs " + ", ".join(shown[:-1]) + f" and {shown[-1]}"


def resumed_text(starts: Sequence[int]) -> str:
    """Where a run was resumed, from the 0-based first epoch of each resume: [2] is "resumed at the start of epoch
    3" (epochs 1 and 2 came from before the resume; epoch 3 was the first it ran)."""
    return f"resumed at the start of {epochs_text(starts)}"


def _series(ax, rows: list[dict], key: str, scale: float = 1.0, **style) -> bool:
    """Plot `key` of `rows` against the epoch, counted from 1 (epochs without it left out); whether anything was
    drawn."""
    pts = [(r["epoch"] + 1, r[key] * scale) for r in rows if isinstance(r.get(key), (int, float))]
    if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(pts) <= 40 else None, markersize=3, **style)
    return bool(pts)


def plot_run(run: dict, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write a PNG of a run's curves (a `read_run_log` or `run_from_history` summary): training loss, top-1 (train,
    val, val over all classes of a pruned file, test) with the best epoch marked, and for `train` the learning rate
    and resolution; resumes as dotted lines. Written atomically (Agg); an existing `path` needs `force`."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = run["epochs"]
    if not rows:
        raise InputError(f"{run['path']} holds no finished epoch yet; there is nothing to plot.")
    out = check_plot_path(path, force=force, inputs=(run["path"],))
    schedule = any("lr" in r or "res" in r for r in rows)
    fig, axes = plt.subplots(1, 3 if schedule else 2, figsize=(13 if schedule else 9, 3.8), dpi=110,
                             gridspec_kw={"width_ratios": [1, 1, 0.8] if schedule else [1, 1]})
    try:
        loss, top1 = axes[0], axes[1]
        _series(loss, rows, "train_loss", color="tab:orange")
        loss.set_title("training loss")
        for key, (label, colour, style) in _STYLE.items():
            _series(top1, rows, key, 100.0, color=colour, linestyle=style, label=label)
        best = run.get("best")
        if best:
            top1.scatter([best["epoch"] + 1], [best["value"] * 100], marker="*", s=160, color="gold", edgecolor="black",
                         zorder=4, label=f"best {best['metric'].split('_')[0]} {best['value']:.1%} "
                                         f"({epochs_text([best['epoch']])})")
        low, high = top1.get_ylim()
        top1.set_ylim(max(low, -2.0), min(high, 103.0))  # no room drawn far beyond 0% and 100%
        top1.set_title("accuracy (%)")
        if top1.get_legend_handles_labels()[0]:
            top1.legend(fontsize=7, loc="lower right")
        if schedule:
            sched = axes[2]
            _series(sched, rows, "lr", color="tab:green", label="learning rate")
            sched.set_ylabel("learning rate (last step)", color="tab:green")
            if any("res" in r for r in rows):
                res = sched.twinx()
                _series(res, rows, "res", color="tab:brown", drawstyle="steps-mid")
                sizes = [r["res"] for r in rows if isinstance(r.get("res"), (int, float))]
                res.set_ylim(min(sizes) - 16, max(sizes) + 16)  # a constant size as a line inside the panel
                res.yaxis.set_major_locator(MaxNLocator(integer=True))
                res.set_ylabel("resolution (px)", color="tab:brown")
            sched.set_title("schedule")
        planned = run.get("epochs_planned")
        for ax in axes:
            if isinstance(planned, int) and planned > run["epochs_done"]:  # a run going on: the epochs still to come
                ax.set_xlim(right=planned + 0.5)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            for start in run.get("resumed_at") or []:
                ax.axvline(start + 0.5, color="black", linestyle=":", linewidth=1)
        what = f"{run['run']} ({run['mode']})" if run.get("mode") else run["run"]
        title = (f"{what} {run.get('arch') or '?'} on {Path(run['data']).name if run.get('data') else '?'}: "
                 f"{run['epochs_done']}" + (f" of {planned}" if planned else "") + " epochs")
        if run.get("resumed_at"):
            title += f"; {resumed_text(run['resumed_at'])} (dotted)"
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        with atomic_output(out) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return out
