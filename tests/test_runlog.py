"""`dptool info RUN.jsonl [--plot]`: real train and finetune logs read back as a table, their curves as a PNG."""

from __future__ import annotations

import gc
import json
import re
import shutil
import struct

import pytest
import torch
from click.testing import CliRunner

from dptool.beton import read_sidecar, write_sidecar
from dptool.checkpoint import save_checkpoint
from dptool.cli.main import cli
from dptool.models import create_model

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba #167

FAST = ["--arch", "resnet18", "--batch-size", "16", "--min-res", "16", "--max-res", "16", "--val-res", "16",
        "--lr", "0.32", "--lr-peak-epoch", "1", "--label-smoothing", "0", "--workers", "1"]


def _run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, train_val_betons):
    """Real runs on the 4-class files: train for 2 epochs then resumed to 3 (m.pt, m.jsonl), a linear probe of
    it for 3 epochs with a validation split (lp.pt, lp.jsonl), and 1 epoch on a pruned copy (p.pt, p.jsonl)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy 2-core machine: one thread is many times faster
    folder = tmp_path_factory.mktemp("runs")
    train, val = train_val_betons
    try:
        for epochs, resume in ((2, []), (3, ["--resume"])):
            code, text = _run("train", train, "--val", val, "-o", folder / "m.pt", "--epochs", epochs, *resume, *FAST)
            assert code == 0, text
        code, text = _run("finetune", folder / "m.pt", train, val, "--mode", "lp", "--epochs", 3, "--batch-size", 16,
                          "--res", 16, "--val-fraction", 0.25, "--workers", 1, "-o", folder / "lp.pt")
        assert code == 0, text
        pruned = folder / "p.beton"  # the training file with a pruning record keeping classes 0-2 of 4
        shutil.copy(train, pruned)
        write_sidecar(pruned, {**{k: v for k, v in read_sidecar(train).items() if k not in ("format", "version")},
                               "pruning": {"kept_classes": [0, 1, 2]}})
        code, text = _run("train", pruned, "--val", val, "-o", folder / "p.pt", "--epochs", 1, *FAST)
        assert code == 0, text
    finally:
        torch.set_num_threads(before)
        gc.collect()
    return folder


def _info(*args):
    code, text = _run("info", *args, "--json")
    assert code == 0, text
    return json.loads(text)


def _table(text: str) -> list[list[str]]:
    """The rows of the human per-epoch table: the cells of each line after the 'epoch' heading line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["epoch"])
    rows = []
    for line in lines[start + 1:]:
        if not re.match(r"\s*\d+\s", line):
            break
        rows.append(line.split())
    return [re.split(r"\s{2,}", lines[start].strip())] + rows


def test_a_train_log_with_a_resume(runs):
    log = _lines(runs / "m.jsonl")
    assert [r["event"] for r in log] == ["config", "epoch", "epoch", "resume", "epoch"]  # what train writes
    epochs = [r for r in log if r["event"] == "epoch"]
    d = _info(runs / "m.jsonl")
    assert (d["kind"], d["run"], d["arch"], d["num_classes"], d["epochs_done"], d["epochs_planned"]) == (
        "run_log", "train", "resnet18", 4, 3, 3)
    assert d["complete"] and d["resumed_at"] == [2] and d["first_epoch"] == 0 and not d["partial_line"]
    assert d["epochs"] == epochs and d["recipe"] == log[3]["config"]  # the records as logged; the recipe resumed
    assert d["columns"] == ["train_loss", "train_top1", "val_top1", "val_top5", "lr", "res", "images_per_s",
                            "epoch_time_s"]
    best = max(epochs, key=lambda r: r["val_top1"])
    assert d["best"] == {"metric": "val_top1", "epoch": best["epoch"], "value": best["val_top1"]}

    code, text = _run("info", runs / "m.jsonl")
    assert code == 0, text
    assert "log of train, resnet18, 3 of 3 epochs (complete)" in text and "resumed at the start of epoch 3\n" in text
    head, *rows = _table(text)
    assert head == ["epoch", "loss", "train@1", "val@1", "val@5", "lr", "res", "img/s", "epoch s"]
    assert len(rows) == 3
    places = _decimals(rows[0][-1])  # one for the column: test_epoch_seconds_in_one_format_per_column
    for row, rec in zip(rows, epochs):
        assert row == [str(rec["epoch"] + 1), f"{rec['train_loss']:.4f}", f"{rec['train_top1']:.2%}",
                       f"{rec['val_top1']:.2%}", f"{rec['val_top5']:.2%}", f"{rec['lr']:.3g}", str(rec["res"]),
                       f"{rec['images_per_s']:.0f}", f"{rec['epoch_time_s']:.{places}f}"]
    assert f"best epoch: {best['epoch'] + 1} (val_top1 {best['val_top1']:.2%})" in text


def test_a_finetune_log(runs):
    log = _lines(runs / "lp.jsonl")
    epochs = [r for r in log if r["event"] == "epoch"]
    d = _info(runs / "lp.jsonl")
    assert (d["run"], d["mode"], d["epochs_done"], d["complete"]) == ("finetune", "lp", 3, True)
    assert d["pretrained"] == str(runs / "m.pt") and d["summary"] == log[-1]
    assert d["epochs"] == epochs and d["columns"] == ["train_loss", "val_top1", "test_top1", "epoch_time_s"]
    vals = [r["val_top1"] for r in epochs]
    assert d["best"] == {"metric": "val_top1", "epoch": vals.index(max(vals)), "value": max(vals)}
    code, text = _run("info", runs / "lp.jsonl")
    head, *rows = _table(text)
    assert head == ["epoch", "loss", "val@1", "test@1", "epoch s"]
    places = _decimals(rows[0][-1])
    assert rows == [[str(r["epoch"] + 1), f"{r['train_loss']:.4f}", f"{r['val_top1']:.2%}", f"{r['test_top1']:.2%}",
                     f"{r['epoch_time_s']:.{places}f}"] for r in epochs]
    assert "finetuned from: " in text and "log of finetune (lp)" in text
    f = d["summary"]  # in percent, as the table beside it (a fraction read "final 1" beside "100.00%")
    summary = (f"test top-1: final {f['final_test_top1']:.2%}, best {f['best_test_top1']:.2%} "
               f"(epoch {f['best_test_epoch'] + 1})\n")
    assert summary in text, text
    assert f"best epoch: {d['best']['epoch'] + 1} (val_top1" in text, text
    shown = _run("info", runs / "lp.pt")[1]  # the checkpoint's summary, as the log's
    assert summary in shown, shown


def _seconds_cells(text: str) -> list[str]:
    head, *rows = _table(text)
    return [row[head.index("epoch s")] for row in rows]


def _decimals(cell: str) -> int:
    return len(cell.partition(".")[2])


def test_epoch_seconds_in_one_format_per_column(runs, tmp_path):
    """finetune's table printed its epoch seconds as "0.1" beside "0.0772" (3 significant digits, trailing zeros
    dropped), and an ImageNet train epoch of 1234 s would read "1.23e+03": the column now has one number of decimals,
    enough for its smallest value to keep 3 significant digits, at most what fits its 7 characters."""
    for source, seconds, shown in (
        ("lp.jsonl", [0.1, 0.0772, 0.0801], ["0.1000", "0.0772", "0.0801"]),
        ("m.jsonl", [1234.4, 987.25, 1010.0], ["1234", "987", "1010"]),
        ("m.jsonl", [16.3, 9.5, 16.94], ["16.30", "9.50", "16.94"]),
        ("lp.jsonl", [0.5, 1234.5678, 0.25], ["0.50", "1234.57", "0.25"]),  # 0.500 would push 1234.568 to 8
        ("lp.jsonl", [0.00195, 0.0021, 0.0], ["0.00195", "0.00210", "0.00000"]),
    ):
        times = iter(seconds)
        log = tmp_path / source
        records = [{**r, "epoch_time_s": next(times)} if r["event"] == "epoch" else r for r in _lines(runs / source)]
        log.write_text("".join(json.dumps(r) + "\n" for r in records))
        code, text = _run("info", log)
        assert code == 0, text
        assert _seconds_cells(text) == shown, text


def test_a_pruned_run_shows_top1_over_all_classes(runs):
    epochs = [r for r in _lines(runs / "p.jsonl") if r["event"] == "epoch"]
    d = _info(runs / "p.jsonl")
    assert d["kept_classes"] == 3 and "val_top1_all" in d["columns"] and d["epochs"] == epochs
    code, text = _run("info", runs / "p.jsonl")
    head, row = _table(text)
    assert "all@1" in head and row[head.index("all@1")] == f"{epochs[0]['val_top1_all']:.2%}"
    assert "(3 kept by pruning)" in text


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("name", ["m.jsonl", "lp.jsonl", "m.pt", "lp.pt"])
def test_plot_from_a_log_or_a_checkpoint(runs, tmp_path, name):
    png = tmp_path / "curves.png"
    d = _info(runs / name, "--plot", png)
    assert d["plot"] == str(png) and d["kind"] == ("run_log" if name.endswith(".jsonl") else "checkpoint")
    width, height = _png_size(png)
    assert 800 <= width <= 2000 and 300 <= height <= 1000 and png.stat().st_size > 10_000
    assert not list(tmp_path.glob(".*tmp*"))

    before = png.read_bytes()
    code, text = _run("info", runs / name, "--plot", png)
    assert code == 2 and "already exists; pass --force" in text and png.read_bytes() == before
    code, text = _run("info", runs / name, "--plot", png, "--force")
    assert code == 0, text


def test_plot_refusals(runs, tmp_path, train_val_betons):
    log = tmp_path / "m.jsonl"
    shutil.copy(runs / "m.jsonl", log)
    before = log.read_bytes()
    code, text = _run("info", log, "--plot", log, "--force")
    assert code == 2 and "is the same file as input" in text and log.read_bytes() == before
    ckpt = tmp_path / "m.pt"  # a slip of the --plot path onto the run's other file: refused even with --force
    shutil.copy(runs / "m.pt", ckpt)
    for args in ((log, "--plot", ckpt), (ckpt, "--plot", log)):
        code, text = _run("info", *args, "--force")
        assert code == 2 and "does not end in .png; the plot is written as a PNG" in text
    assert log.read_bytes() == before and ckpt.read_bytes() == (runs / "m.pt").read_bytes()
    fake = tmp_path / "notes.png"  # named .png, holding something else: still not an earlier plot
    fake.write_text("keep me")
    code, text = _run("info", log, "--plot", fake, "--force")
    assert code == 2 and "exists and is not a PNG; --force replaces an earlier plot only" in text
    assert fake.read_text() == "keep me"
    code, text = _run("info", log, "--plot", tmp_path / "curves.jpg")  # one rule for every --plot: a .png path
    assert code == 2 and "--plot" in text and "does not end in .png" in text and not (tmp_path / "curves.jpg").exists()
    code, text = _run("info", train_val_betons[0], "--plot", tmp_path / "b.png")
    assert code == 2 and "--plot draws the curves of a train or finetune run" in text and "is a .beton" in text
    bare = tmp_path / "bare.pt"  # a dptool checkpoint without per-epoch history (as written from outside a run)
    save_checkpoint(bare, arch="resnet18", num_classes=4, state_dict=create_model("resnet18", 4).state_dict(),
                    recipe={}, data_fingerprint="blake2b:x", epoch=1)
    code, text = _run("info", bare, "--plot", tmp_path / "bare.png")
    assert code == 2 and "records no per-epoch metrics" in text and len(text.strip().splitlines()) == 1
    assert not (tmp_path / "b.png").exists() and not (tmp_path / "bare.png").exists()


def test_a_log_being_written_ends_in_a_partial_line(runs, tmp_path):
    """A copy taken while a line is written: the incomplete last line is left out, the rest read."""
    log = tmp_path / "m.jsonl"
    full = (runs / "m.jsonl").read_text()
    last = full.splitlines()[-1]
    log.write_text(full[: len(full) - len(last) - 1] + last[: len(last) // 2])  # epoch 2 cut halfway
    d = _info(log)
    assert d["partial_line"] and [r["epoch"] for r in d["epochs"]] == [0, 1] and not d["complete"]
    assert d["epochs_done"] == 2
    code, text = _run("info", log)
    assert code == 0 and "the last line is incomplete (being written) and was left out" in text
    assert "2 of 3 epochs (running or stopped" in text
    png = tmp_path / "partial.png"
    assert _info(log, "--plot", png)["plot"] == str(png) and png.stat().st_size > 10_000

    log.write_text(full.replace(last, last[: len(last) // 2]))  # the same cut line, with its newline: corrupt
    code, text = _run("info", log)
    assert code == 2 and f"Line 5 of {log} is not JSON" in text and "Traceback" not in text


def test_a_log_opened_by_a_resume_and_a_repeated_epoch(runs, tmp_path):
    """`train --resume --log other.jsonl` starts a log with its resume line; an epoch logged twice (logs joined
    by hand) keeps its last record."""
    config, e0, e1, resume, e2 = (runs / "m.jsonl").read_text().splitlines(keepends=True)
    only = tmp_path / "resume.jsonl"
    only.write_text(resume)  # one line: a resume before its first epoch (parses as one JSON document)
    d = _info(only)
    assert (d["kind"], d["first_epoch"], d["epochs"], d["epochs_done"]) == ("run_log", 2, [], 2)
    code, text = _run("info", only, "--plot", tmp_path / "none.png")
    assert code == 2 and "holds no finished epoch yet" in text
    only.write_text(resume + e2)
    d = _info(only)
    assert [r["epoch"] for r in d["epochs"]] == [2] and d["complete"] and d["resumed_at"] == []
    text = _run("info", only)[1]
    assert "this log begins with epoch 3 (a resume" in text and "resumed at" not in text

    joined = tmp_path / "joined.jsonl"
    changed = json.dumps({**json.loads(e1), "train_loss": 9.5}) + "\n"
    resumed = json.loads(resume) | {"start_epoch": 1, "val": "other_val.beton"}  # --val may change at a resume
    joined.write_text(config + e0 + e1 + json.dumps(resumed) + "\n" + changed + e2)
    d = _info(joined)
    assert [r["epoch"] for r in d["epochs"]] == [0, 1, 2] and d["repeated_epochs"] == [1]
    assert d["epochs"][1]["train_loss"] == 9.5 and d["resumed_at"] == [1] and d["val"] == "other_val.beton"
    text = _run("info", joined)[1]  # the text counts from 1: index 1 is the second epoch
    assert "resumed at the start of epoch 2\n" in text and "(the last record kept): epoch 2\n" in text, text


@pytest.mark.parametrize("content, phrase", [
    (b"", "is empty; info reads .beton files, dptool scores files, checkpoints and train or finetune logs."),
    (b'{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n', "holds JSON lines but is not a dptool train or "
                                                              "finetune log"),
    (b'{"event": "config", "config": {}}\n{"event": "epoch", "loss": 1}\n', "Line 2 of"),
    (b'{"event": "config", "config": {}}\n{"event": "resume", "config": {}}\n{"event": "epoch", "epoch": 0}\n',
     'is a resume record without an integer "start_epoch".'),
    (b'{"event": "config", "config": {}}\n[1, 2]\n', 'is not a log record (a JSON object with an "event")'),
    (b'{"event": "config", "config": {}}\n\xff\xfe\n', "is not UTF-8 text"),
    (b'{"event": "config", "config": {}}\n\n{"event": "config", "config": {}}\n', "holds more than one run (a "
                                                                                 "second config line, line 3)"),
])
def test_foreign_and_empty_files_are_refused(tmp_path, content, phrase):
    path = tmp_path / "run.jsonl"
    path.write_bytes(content)
    code, text = _run("info", path)
    assert code == 2 and phrase in text, text
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1


def test_plot_draws_resumes_and_a_running_log_on_its_planned_epochs(runs, tmp_path, monkeypatch):
    """The curves' figure itself: a resume is a dotted line before its first epoch on every panel, and a log short
    of its planned epochs (2 of 3 here) is drawn on an axis reaching the last planned epoch."""
    import matplotlib.pyplot as plt

    from dptool.runlog import plot_run, read_run_log

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))  # kept open to be read, closed below
    try:
        plot_run(read_run_log(runs / "m.jsonl"), tmp_path / "m.png")  # 3 of 3 epochs, resumed at the 3rd
        log = tmp_path / "short.jsonl"
        config, e0, e1 = _lines(runs / "m.jsonl")[:3]
        config["config"]["epochs"] = 3
        log.write_text("".join(json.dumps(r) + "\n" for r in (config, e0, e1)))
        plot_run(read_run_log(log), tmp_path / "short.png")  # epochs 1 and 2 of 3, no resume
        resumed, short = figures
        for ax in resumed.axes[:3]:  # the loss, top-1 and schedule panels (not the resolution's twin)
            dotted = [line for line in ax.get_lines() if line.get_linestyle() == ":" and line.get_color() == "black"]
            assert [tuple(line.get_xdata()) for line in dotted] == [(2.5, 2.5)]  # between epochs 2 and 3
        assert tuple(resumed.axes[0].get_lines()[0].get_xdata()) == (1, 2, 3)  # the loss of epochs 1 to 3
        assert all(ax.get_xlim()[1] == 3.5 for ax in short.axes[:3])
        assert not any(line.get_linestyle() == ":" and line.get_color() == "black"
                       for ax in short.axes for line in ax.get_lines())
    finally:
        for fig in figures:
            close(fig)


def test_json_output_is_json_when_a_log_holds_nan_or_infinity(runs, tmp_path):
    """`info --json` on a log with a NaN or infinite value (hand-edited, or joined from elsewhere) printed NaN and
    Infinity, which jq and JSON.parse refuse: such values are null in the JSON output, the rest unchanged."""
    bad = iter([float("nan"), float("inf"), 1.5])
    log = tmp_path / "m.jsonl"
    records = [{**r, "epoch_time_s": next(bad)} if r["event"] == "epoch" else r for r in _lines(runs / "m.jsonl")]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, text = _run("info", log, "--json")
    assert code == 0, text
    doc = json.loads(text, parse_constant=lambda name: pytest.fail(f"not JSON: {name}"))
    assert [e["epoch_time_s"] for e in doc["epochs"]] == [None, None, 1.5]
