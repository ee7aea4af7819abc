"""`dptool train`: learning on separable data, resume, logs, schedules, pruned evaluation and bad input."""

from __future__ import annotations

import gc
import json
import math
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dptool.beton import fingerprint, open_beton, read_sidecar, write_sidecar
from dptool.checkpoint import read_checkpoint, save_checkpoint
from dptool.cli.main import cli
from dptool.errors import InputError
from dptool.models import create_model
from dptool.recipe import TrainConfig, config_from_options, lr_at, resolution_at
from dptool.steps import evaluate, resolve_precision
from dptool.train import _kept_classes

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba #167


@pytest.fixture(autouse=True)
def _collect_loaders():
    """Collect dropped FFCV loaders inside the test, where numba #167's finalizer noise is filtered."""
    yield
    gc.collect()

FAST = ["--arch", "resnet18", "--batch-size", "16", "--min-res", "16", "--max-res", "16", "--val-res", "16",
        "--lr", "0.32", "--lr-peak-epoch", "1", "--label-smoothing", "0", "--workers", "1"]


def _run(args):
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return result.exit_code, result.output


def test_schedules_match_ffcv_imagenet():
    cfg = TrainConfig(epochs=16)
    assert [resolution_at(cfg, e) for e in range(16)] == [160] * 12 + [192] * 4  # dp4tl.md section 6
    peak = 0.5 * 1024 / 256
    assert lr_at(cfg, 0.0, peak) == 0.0 and lr_at(cfg, 2.0, peak) == pytest.approx(peak)
    assert lr_at(cfg, 9.0, peak) == pytest.approx(peak / 2) and lr_at(cfg, 16.0, peak) == 0.0
    assert resolution_at(TrainConfig(epochs=4, min_res=48, max_res=48), 0) == 48  # never leaves [min, max]
    # the default --lr is per 256 images: at ffcv-imagenet's (and DP4TL's) ResNet-18 batch of 1024 it gives their
    # peak of 0.5, not four times it
    assert cfg.lr * 1024 / 256 == 0.5
    # an --end-ramp given alone is where --max-res is reached, even before the default start (11/16 of --epochs)
    early = TrainConfig(epochs=16, end_ramp=5)
    assert early.ramp() == (5, 5) and [resolution_at(early, e) for e in (4, 5)] == [160, 192]
    assert TrainConfig(epochs=16, start_ramp=14).ramp() == (14, 14)  # a --start-ramp after the default end
    short = TrainConfig(epochs=2)  # the peak moves to half of --epochs when that is earlier than --lr-peak-epoch 2
    assert [lr_at(short, p, peak) for p in (0.5, 1.0, 1.5, 2.0)] == pytest.approx([peak / 2, peak, peak / 2, 0.0])


def test_train_learns_then_resumes(tmp_path, train_val_betons, one_thread):
    train, val = train_val_betons
    out = tmp_path / "m.pt"
    code, text = _run(["train", str(train), "--val", str(val), "-o", str(out), "--epochs", "3", "--json", *FAST])
    assert code == 0, text
    res = json.loads(text)
    assert res["epochs"] == 3 and res["num_classes"] == 4 and res["effective_batch_size"] == 16
    assert res["effective_lr"] == pytest.approx(0.02) and not res["pruned"]
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "config" and lines[0]["config"]["lr"] == 0.32
    assert [r["epoch"] for r in lines[1:]] == [0, 1, 2]
    # the lr of each epoch's last step: peak (0.02) at --lr-peak-epoch 1, down to 0 at the end of the last epoch
    assert [r["lr"] for r in lines[1:]] == pytest.approx([0.02, 0.01, 0.0])
    assert {"train_loss", "train_top1", "val_top1", "val_top5", "images_per_s", "epoch_time_s"} <= set(lines[1])
    assert res["last_epoch_images_per_second"] == pytest.approx(lines[3]["images_per_s"])
    assert res["images_per_second"] == pytest.approx(sum(r["train_images"] for r in lines[1:])
                                                     / sum(r["epoch_time_s"] for r in lines[1:]))
    first = read_checkpoint(out)
    assert first["epoch"] == 3 and first["optimizer_state"]["state"] and first["recipe"]["effective_lr"] == 0.02

    code, text = _run(["train", str(train), "--val", str(val), "-o", str(out), "--epochs", "3", "--resume", *FAST])
    assert code == 2 and "already holds 3 epochs" in text
    code, text = _run(["train", str(train), "--val", str(val), "-o", str(out), "--epochs", "4", "--resume", *FAST,
                       "--seed", "5", "--lr", "0.1"])
    assert code == 2 and "was trained with --lr 0.32 --seed 0 but this run gives --lr 0.1 --seed 5;" in text

    code, text = _run(["train", str(train), "--val", str(val), "-o", str(out), "--epochs", "4", "--resume",
                       "--json", *FAST])
    assert code == 0, text
    res = json.loads(text)
    assert res["start_epoch"] == 3 and res["final"]["epoch"] == 3
    ckpt = read_checkpoint(out)
    assert ckpt["epoch"] == 4 and ckpt["extra"]["history"][:3] == first["extra"]["history"]
    # learning: judged on the best of the 4 epochs (3 epochs fell short once in 5 runs, before crops were seeded)
    assert res["best_val_top1"] >= 0.6  # 4 classes: chance is 0.25
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["event"] for r in lines] == ["config", "epoch", "epoch", "epoch", "resume", "epoch"]
    assert lines[-1]["lr"] == 0.0  # raising --epochs moves the end of the decay to the new last epoch
    assert not list(tmp_path.glob(".*tmp*"))

    code, text = _run(["info", str(out), "--json"])
    assert code == 0, text
    info = json.loads(text)
    assert (info["kind"], info["run"], info["arch"], info["num_classes"], info["epochs_done"]) == (
        "checkpoint", "train", "resnet18", 4, 4)
    assert info["resumable"] and info["data"] == str(train) and info["data_fingerprint"] == ckpt["data_fingerprint"]
    assert info["best_val_top1"] == res["best_val_top1"] and info["last_epoch"]["epoch"] == 3
    params = sum(v.numel() for k, v in ckpt["state_dict"].items() if not k.endswith(
        ("running_mean", "running_var", "num_batches_tracked")))
    assert info["parameters"] == params == sum(p.numel() for p in create_model("resnet18", 4).parameters())
    code, text = _run(["info", str(out)])
    assert "resnet18, 4 classes" in text and "4 epochs of train" in text and "best val_top1" in text


def test_resume_refuses_moving_a_capped_warm_up(tmp_path, train_val_betons, one_thread):
    """--lr-peak-epoch is capped at half of --epochs: raising --epochs on resume would move a capped peak (here from
    epoch 1 to 2), so that the resumed run warms up a second time; refused, naming the peak it followed and how to
    keep it, and the run continues with that --lr-peak-epoch."""
    train, _ = train_val_betons
    out = tmp_path / "m.pt"
    args = ["train", str(train), "-o", str(out), *FAST[:FAST.index("--lr-peak-epoch")], "--workers", "1",
            "--lr-peak-epoch", "2"]
    code, text = _run([*args, "--epochs", "2"])
    assert code == 0, text
    for shown in (out, tmp_path / "m.jsonl"):  # info shows the warm-up the run followed
        code, text = _run(["info", str(shown)])
        assert code == 0 and ", lr_peak_epoch 2.0 (capped at 1, half of the epochs), " in text, text
    assert "optimizer state kept (`train --resume --epochs N --lr-peak-epoch 1` extends it)" in _run(
        ["info", str(out)])[1]
    code, text = _run([*args, "--epochs", "4", "--resume"])
    assert code == 2, text
    assert ("was trained with its learning rate peaking at epoch 1 (--lr-peak-epoch 2 capped at half of --epochs 2), "
            "but this run's would peak at epoch 2 (--lr-peak-epoch 2); give --lr-peak-epoch 1 (--warmup-epochs) to "
            "keep its warm-up.") in text, text
    code, text = _run([*args[:-1], "1", "--epochs", "4", "--resume"])
    assert code == 0, text
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["event"] for r in lines] == ["config", "epoch", "epoch", "resume", "epoch", "epoch"]
    assert lines[3]["effective_lr_peak_epoch"] == lines[0]["effective_lr_peak_epoch"] == 1.0
    # after the peak at epoch 1 the learning rate only falls: 0.02 x 1/3 after epoch 3, 0 after epoch 4
    assert [r["lr"] for r in lines[4:]] == pytest.approx([0.02 * 1 / 3, 0.0])
    # fewer --epochs than a stopped run planned may cap any --lr-peak-epoch below its peak: the remedy says so
    from dptool.train_resume import _check_peak_epoch

    recipe = {"lr_peak_epoch": 1.5, "epochs": 3, "effective_lr_peak_epoch": 1.5}
    _check_peak_epoch(out, recipe, TrainConfig(epochs=3, lr_peak_epoch=1.5))
    with pytest.raises(InputError, match=r"peaking at epoch 1\.5, but this run's would peak at epoch 1 "
                                         r"\(--lr-peak-epoch 1\.5 capped at half of --epochs 2\); give --epochs 3 or "
                                         r"more with --lr-peak-epoch 1\.5 \(--warmup-epochs\) to keep its warm-up\."):
        _check_peak_epoch(out, recipe, TrainConfig(epochs=2, lr_peak_epoch=1.5))


class _StopAtEpoch:
    """The real training loader, interrupted (as by Ctrl-C) when epoch `stop_at` would start."""

    def __init__(self, loader, stop_at: int):
        self._loader, self.stop_at = loader, stop_at

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __len__(self):
        return len(self._loader)

    def __iter__(self):
        if self._loader.loader.next_epoch == self.stop_at:
            raise KeyboardInterrupt
        return iter(self._loader)


def test_resume_refuses_a_damaged_log_in_one_sentence_and_mends_a_partial_last_line(tmp_path, train_val_betons,
                                                                                     one_thread):
    """`--resume` parsed every log line with a bare json.loads: a damaged line ended in 'internal error:
    JSONDecodeError' (exit 1) after the model was built, a line that is JSON but no record in an AttributeError or a
    TypeError. A damaged line is now refused in one sentence naming the log and the line, and the checkpoint and the
    log keep their bytes; an incomplete last line (a copy made mid-write) is left out with a warning, and the
    checkpoint's record of the epoch it held put back, as it was."""
    train, val = train_val_betons
    out, log = tmp_path / "m.pt", tmp_path / "m.jsonl"
    code, text = _run(["train", str(train), "--val", str(val), "-o", str(out), "--epochs", "2", *FAST])
    assert code == 0, text
    good, weights = log.read_text(), out.read_bytes()
    lines = good.split("\n")  # config, epoch 0, epoch 1, ""
    damaged = {"not JSON": lines[1][:40], "not a log record": "[1]",
               "an epoch record without an integer": lines[1].replace('"epoch": 0', '"epoch": "0"')}
    resume = ["train", str(train), "--val", str(val), "-o", str(out), "--epochs", "3", "--resume", *FAST]
    for said, line in damaged.items():
        log.write_text("\n".join([lines[0], line, *lines[2:]]))
        before = log.read_bytes()
        result = CliRunner().invoke(cli, resume)
        assert result.exit_code == 2, result.output
        assert result.output.startswith(f"Error: Cannot resume: line 2 of {log} is {said}")
        assert result.output.endswith("; mend it, or give --log a new file.\n") and "\n" not in result.output[:-1]
        assert log.read_bytes() == before and out.read_bytes() == weights
    log.write_text(good[:-60])  # epoch 1's line cut short, without its newline
    result = CliRunner().invoke(cli, resume)
    assert result.exit_code == 0, result.output
    assert (f"WARNING dptool.runlog: the last line of {log} is incomplete (a copy made while it was written?); it is "
            "left out, and the checkpoint's records of the 1 epoch(s) missing from the log put in its place"
            in result.stderr)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[:3] == [json.loads(line) for line in lines[:3]]
    assert [r["event"] for r in records[3:]] == ["resume", "epoch"] and records[-1]["epoch"] == 2


def test_resume_drops_the_resume_lines_of_earlier_resumes_that_trained_no_epoch(tmp_path):
    """`train` wrote a resume line as it started, so each resume stopped or diverged in its first epoch left one that
    no epoch follows, and `dptool info` said 'resumed at epoch 1, 1'. A resume reading such a log drops them (its own
    line supersedes them) and keeps those followed by epochs, and the records after `before_epoch`."""
    from dptool.runlog import JsonLog, read_run_log

    def rec(event, **kw):
        return {"event": event, **({"config": {"epochs": 4}, "start_epoch": kw["start"]} if "start" in kw else kw)}

    lines = [rec("config", start=0), rec("epoch", epoch=0), rec("resume", start=1), rec("resume", start=1),
             rec("epoch", epoch=1), rec("epoch", epoch=2), rec("resume", start=3), rec("resume", start=3)]
    log = tmp_path / "m.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert read_run_log(log)["resumed_at"] == [1, 1, 3, 3]
    assert JsonLog.resume(log, 3).records == [lines[0], lines[1], lines[3], lines[4], lines[5]]
    assert JsonLog.resume(log, 2).records == [lines[0], lines[1], lines[3], lines[4]]  # epoch 2 is redone
    assert JsonLog.resume(log, 1).records == [lines[0], lines[1]]
    assert log.read_text() == "".join(json.dumps(r) + "\n" for r in lines)  # held: nothing written yet


def test_resume_reproduces_uninterrupted_run(tmp_path, monkeypatch, train_val_betons, one_thread):
    """Interrupted after epoch 1 and resumed, training ends bit-identical to an uninterrupted run: FFCV's order
    and dptool's crops and flips repeat for one seed, and the checkpoint holds the rest."""
    import dptool.loaders
    from dptool.train import train

    train_data, _ = train_val_betons
    cfg = TrainConfig(arch="resnet18", epochs=3, batch_size=16, min_res=16, max_res=16, lr=0.5, lr_peak_epoch=1,
                      workers=2, seed=5)
    train(train_data, tmp_path / "straight.pt", config=cfg)
    real_loader = dptool.loaders.train_loader
    monkeypatch.setattr(dptool.loaders, "train_loader", lambda *a, **k: _StopAtEpoch(real_loader(*a, **k), 1))
    with pytest.raises(KeyboardInterrupt):
        train(train_data, tmp_path / "resumed.pt", config=cfg)
    assert read_checkpoint(tmp_path / "resumed.pt")["epoch"] == 1
    monkeypatch.setattr(dptool.loaders, "train_loader", real_loader)
    result = train(train_data, tmp_path / "resumed.pt", config=cfg, resume=True)
    assert result.start_epoch == 1
    a, b = read_checkpoint(tmp_path / "straight.pt"), read_checkpoint(tmp_path / "resumed.pt")
    assert a["epoch"] == b["epoch"] == 3
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())
    assert [h["train_loss"] for h in a["extra"]["history"]] == [h["train_loss"] for h in b["extra"]["history"]]


@pytest.mark.parametrize(("major", "auto"), [(7, "fp16"), (8, "bf16"), (9, "bf16")])
def test_auto_precision_is_bf16_only_where_the_gpu_computes_it(monkeypatch, major, auto):
    # torch.cuda.is_bf16_supported() says yes on a V100 or T4 too, where bf16 is emulated; the capability decides
    seen = []
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: seen.append(device) or (major, 0))
    assert resolve_precision("cuda:1", "auto") == auto and seen == [torch.device("cuda:1")]
    assert resolve_precision(torch.device("cuda"), "fp16") == "fp16"
    assert resolve_precision("cpu", "auto") == resolve_precision("cpu", "bf16") == "fp32"


def test_pruned_evaluation_counts_kept_and_all():
    """val_* covers the kept classes' images, val_*_all every image (one pass)."""

    class Fixed(torch.nn.Module):
        def forward(self, x):  # predicts class 1 for every image
            return torch.tensor([0.0, 1.0, 0.5, 0.2]).repeat(len(x), 1)

    labels = torch.tensor([0, 1, 1, 2, 3, 1])
    batches = [(torch.zeros(3, 1), labels[:3]), (torch.zeros(3, 1), labels[3:])]
    kept = torch.tensor([False, True, True, False])
    m = evaluate(Fixed(), batches, torch.device("cpu"), "fp32", kept=kept)
    assert m["val_images"] == 4 and m["val_top1"] == 0.75 and m["val_images_all"] == 6
    assert m["val_top1_all"] == pytest.approx(0.5) and m["val_top5_all"] == 1.0


def test_kept_classes_from_sidecar(tmp_path, tiny_beton):
    copy = tmp_path / "p.beton"
    shutil.copy(tiny_beton, copy)
    side = read_sidecar(tiny_beton)
    write_sidecar(copy, {k: v for k, v in side.items() if k not in ("format", "version")})
    assert _kept_classes(open_beton(copy)) is None  # no `pruning` entry: unpruned
    write_sidecar(copy, {**side, "pruning": {"kept_classes": [3, 0]}})
    assert _kept_classes(open_beton(copy)).tolist() == [3, 0]
    write_sidecar(copy, {**side, "pruning": {"method": "fm"}})  # sample-level: the classes present
    assert _kept_classes(open_beton(copy)).tolist() == [0, 1, 2, 3]


def _no_label_beton(path):
    from dptool._ffcv import import_ffcv

    fields = import_ffcv("ffcv.fields")
    writer = import_ffcv("ffcv.writer").DatasetWriter(str(path), {"image": fields.RGBImageField(write_mode="raw")},
                                                      num_workers=1, page_size=1 << 21)
    images = [(np.full((8, 8, 3), i, np.uint8),) for i in range(4)]
    writer.from_indexed_dataset(images, chunksize=4)
    return path


def test_bad_input_exits_2(tmp_path, train_val_betons):
    train, val = train_val_betons
    out = tmp_path / "m.pt"
    (tmp_path / "junk.beton").write_bytes(b"nope" * 100)
    cases = [
        (["train", str(tmp_path / "missing.beton"), "-o", str(out)], "does not exist"),
        (["train", str(tmp_path / "junk.beton"), "-o", str(out)], "not a .beton"),
        (["train", str(_no_label_beton(tmp_path / "nolabel.beton")), "-o", str(out)], "no 'label' field"),
        (["train", str(train), "-o", str(out), "--epochs", "0"], "--epochs"),
        (["train", str(train), "-o", str(out), "--batch-size", "161"], "larger than the 160 samples"),
        (["train", str(train), "-o", str(out), "--resume"], "does not exist"),
    ]
    fp = fingerprint(train)
    (tmp_path / "here").symlink_to(tmp_path)
    renamed = tmp_path / "renamed_val.beton"  # the same 4 labels, named as another dataset's classes
    shutil.copy(val, renamed)
    side = {k: v for k, v in read_sidecar(val).items() if k not in ("format", "version")}
    write_sidecar(renamed, {**side, "class_names": ["cat", "dog", "fox", "owl"]})
    model = create_model("resnet18", 4)
    save_checkpoint(tmp_path / "rn18.pt", arch="resnet18", num_classes=4, state_dict=model.state_dict(), recipe={},
                    data_fingerprint=fp, epoch=1)
    save_checkpoint(tmp_path / "other.pt", arch="resnet18", num_classes=4, state_dict=model.state_dict(),
                    recipe={}, data_fingerprint="blake2b:other", epoch=1)
    save_checkpoint(tmp_path / "ft.pt", arch="resnet18", num_classes=4, state_dict=model.state_dict(),
                    recipe={"finetune": {"mode": "ff"}}, data_fingerprint=fp, epoch=1)
    # as `torchrun --nproc_per_node 2 ... train --batch-size 16` writes it: resumed by one process, the effective
    # batch (32 -> 16) and with it the peak learning rate halved without a word
    two = {**TrainConfig(batch_size=16).__dict__, "world_size": 2, "effective_batch_size": 32, "effective_lr": 0.0625}
    save_checkpoint(tmp_path / "ddp.pt", arch="resnet18", num_classes=4, state_dict=model.state_dict(), recipe=two,
                    data_fingerprint=fp, epoch=1, optimizer_state={"state": {}, "param_groups": []})
    cases += [
        (["train", str(train), "-o", str(tmp_path / "rn18.pt"), "--resume", "--arch", "resnet34"],
         "holds a resnet18 with small input off and blurpool off, but this run asks for a resnet34"),
        (["train", str(train), "-o", str(tmp_path / "rn18.pt"), "--resume", "--small-input"],
         "asks for a resnet18 with small input on"),
        (["train", str(train), "-o", str(tmp_path / "other.pt"), "--resume"],
         "was trained on another file with fingerprint blake2b:other (4 classes), but"),
        # like a finetune checkpoint: right data and arch, no optimizer state to continue from
        (["train", str(train), "-o", str(tmp_path / "rn18.pt"), "--resume"], "holds no optimizer state"),
        # a finetune's checkpoint (it said "holds no optimizer state", or named the data, not finetune --resume)
        (["train", str(train), "-o", str(tmp_path / "ft.pt"), "--resume"],
         "was written by dptool finetune; `dptool finetune ... -o"),
        (["train", str(train), "-o", str(tmp_path / "c.jsonl")], "The log would be written over the checkpoint"),
        # the same path through a link to its folder
        (["train", str(train), "-o", str(out), "--log", str(tmp_path / "here" / "m.pt")],
         "The log would be written over the checkpoint"),
        (["train", str(train), "-o", str(tmp_path / "ddp.pt"), "--resume", "--batch-size", "16"],
         "was trained by 2 processes (effective batch 32), but this run has 1 (effective batch 16)"),
        (["train", str(train), "--val", str(renamed), "-o", str(out)],
         "has other classes than"),
        (["train", str(train), "-o", str(tmp_path / "rn18.pt")], "already exists"),
        (["train", str(train), "--val", str(val), "-o", str(out), "--arch", "resnet19"], "resnet19"),
        (["train", str(train), "--val", str(val), "-o", str(out), "--arch", "vit_b_16"], "one fixed resolution"),
        (["train", str(train), "-o", str(out), "--log", str(train)], "same file as input"),
        (["train", str(train), "-o", str(out), "--log", str(tmp_path / "missing" / "log.jsonl")], "does not exist"),
    ]
    for args, message in cases:
        code, text = _run(args)
        assert code == 2, (args, text)
        assert message in text, (args, text)
        assert "Traceback" not in text
    assert not out.exists() and not (tmp_path / "c.jsonl").exists()
    code, text = _run(["train", str(train), "--val", str(renamed), "-o", str(out)])
    assert "Validation file" in text and "(label 0 is 'cat' there, 'class_0' here)" in text


def test_an_interrupted_first_epoch_leaves_no_log(tmp_path, monkeypatch, train_val_betons, one_thread):
    """Interrupted before its first checkpoint, a run leaves nothing: no log would block the rerun."""
    import dptool.loaders
    from dptool.train import train

    cfg = TrainConfig(arch="resnet18", epochs=2, batch_size=16, min_res=16, max_res=16, workers=2)
    real_loader = dptool.loaders.train_loader
    monkeypatch.setattr(dptool.loaders, "train_loader", lambda *a, **k: _StopAtEpoch(real_loader(*a, **k), 0))
    with pytest.raises(KeyboardInterrupt):
        train(train_val_betons[0], tmp_path / "m.pt", config=cfg)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(dptool.loaders, "train_loader", lambda *a, **k: _StopAtEpoch(real_loader(*a, **k), 1))
    with pytest.raises(KeyboardInterrupt):
        train(train_val_betons[0], tmp_path / "m.pt", config=cfg)
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["event"] for r in lines] == ["config", "epoch"]  # from the first checkpoint on, it is written
    ckpt = read_checkpoint(tmp_path / "m.pt")
    assert ckpt["epoch"] == 1
    # the log and the checkpoint say what the run followed: --lr-peak-epoch 2 capped at half of 2 epochs, and the
    # ramp the default fractions of --epochs give (11/16 and 13/16 of 2, rounded)
    for record in (lines[0], ckpt["recipe"]):
        assert record["effective_lr_peak_epoch"] == 1.0 and record["effective_ramp"] == [1, 2]
    assert ckpt["recipe"]["lr_peak_epoch"] == 2.0 and ckpt["recipe"]["start_ramp"] is None  # as given


def test_info_counts_parameters_not_buffers_and_names_missing_keys(tmp_path):
    for blurpool in (False, True):
        model = create_model("resnet18", 5, blurpool=blurpool)
        path = save_checkpoint(tmp_path / f"b{blurpool}.pt", arch="resnet18", num_classes=5, blurpool=blurpool,
                               state_dict=model.state_dict(), recipe={"epochs": 1}, data_fingerprint=None, epoch=1)
        code, text = _run(["info", str(path), "--json"])
        assert code == 0, text
        assert json.loads(text)["parameters"] == sum(p.numel() for p in model.parameters())
    torch.save({"format": "dptool-checkpoint", "version": 1, "state_dict": {}}, tmp_path / "bare.pt")
    code, text = _run(["info", str(tmp_path / "bare.pt")])
    assert code == 2 and "is missing 'arch', 'small_input', 'num_classes', 'epoch'" in text


def test_info_tells_a_torchrun_checkpoint_to_resume_under_torchrun(tmp_path):
    """`--resume` refuses another number of processes, so info's hint names the torchrun the run had."""
    model = create_model("resnet18", 4)
    for world, epochs, hint in ((2, 3, "`torchrun --nproc_per_node 2 ... train --resume` continues it"),
                                (1, 1, "; optimizer state kept (`train --resume --epochs N` extends it)")):
        path = save_checkpoint(tmp_path / f"w{world}.pt", arch="resnet18", num_classes=4, state_dict=model.state_dict(),
                               recipe={"epochs": epochs, "world_size": world, "nnodes": 1, "nproc_per_node": world},
                               data_fingerprint=None, epoch=1,
                               optimizer_state={"state": {}, "param_groups": []})
        code, text = _run(["info", str(path)])
        assert code == 0 and hint in text, text


def test_resume_refusal_names_how_a_run_on_several_machines_was_launched(tmp_path, train_val_betons):
    """A run of 2 machines x 2 processes was told to resume with `torchrun --nproc_per_node 4`, which is another
    command (and one machine may have 2 GPUs); the refusal and info now name the world size and how it was made
    up, and a checkpoint that does not record it (written before) is not given a command it never ran."""
    train, _ = train_val_betons
    model = create_model("resnet18", 4)
    base = {**TrainConfig(batch_size=16).__dict__, "world_size": 4, "effective_batch_size": 64, "effective_lr": 0.25,
            "epochs": 3}
    for name, layout, how in (
            ("nodes.pt", {"nnodes": 2, "nproc_per_node": 2},
             "resume it with 4 processes in all, as it ran (torchrun --nnodes 2 --nproc_per_node 2)"),
            ("one.pt", {"nnodes": 1, "nproc_per_node": 4}, "resume it with 4 processes in all, as it ran "
             "(torchrun --nproc_per_node 4)"),
            ("old.pt", {}, "resume it with 4 processes in all, as it ran (torchrun with --nnodes x --nproc_per_node "
             "= 4)")):
        path = save_checkpoint(tmp_path / name, arch="resnet18", num_classes=4, state_dict=model.state_dict(),
                               recipe={**base, **layout}, data_fingerprint=fingerprint(train), epoch=1,
                               optimizer_state={"state": {}, "param_groups": []})
        code, text = _run(["train", str(train), "-o", str(path), "--resume", "--batch-size", "16", "--epochs", "3"])
        assert code == 2 and "was trained by 4 processes (effective batch 64), but this run has 1" in text, text
        assert how in " ".join(text.split()), text
        code, text = _run(["info", str(path)])
        hint = (f"`{how.split('(')[1].rstrip(')')} ... train --resume` continues it" if layout else
                "`torchrun ... train --resume` with 4 processes in all continues it")
        assert code == 0 and hint in " ".join(text.split()), text


def test_help_texts():
    for name in ("train", "finetune"):
        code, text = _run([name, "-h"])
        assert code == 0 and "Usage:" in text and "--json" in text


def test_open_beton_passes_an_opened_file_through(tmp_path, train_val_betons):
    from dptool.beton import open_beton
    from dptool.errors import InputError

    opened = open_beton(train_val_betons[0])
    assert open_beton(opened) is opened  # loaders and scoring reuse their caller's Beton instead of re-parsing
    unlabelled = open_beton(_no_label_beton(tmp_path / "nolabel.beton"), require_label=False)
    assert open_beton(unlabelled, require_label=False) is unlabelled
    with pytest.raises(InputError, match="no 'label' field"):
        open_beton(unlabelled)


@pytest.mark.parametrize("change, message", [
    ({"lr": float("nan")}, "--lr must be a finite number > 0, got nan."),
    ({"lr": float("inf")}, "--lr must be a finite number > 0, got inf."),
    ({"lr_peak_epoch": float("nan")}, "--lr-peak-epoch must be a finite number >= 0"),
    ({"momentum": -1.0}, "--momentum must be a finite number >= 0 and <= 1, got -1.0."),
    ({"weight_decay": float("nan")}, "--weight-decay must be a finite number >= 0"),
    ({"res_step": 0}, "res_step must be >= 1"),
    ({"start_ramp": 5, "end_ramp": 2}, "--end-ramp 2 is before --start-ramp 5; the resizing ramp must end at or"),
])
def test_config_refuses_nan_and_out_of_range_values(change, message):
    with pytest.raises(InputError, match=re.escape(message)):
        TrainConfig(**change).validate()


def test_cli_refuses_a_nan_learning_rate(train_val_betons, tmp_path):
    train, _ = train_val_betons
    code, text = _run(["train", str(train), "-o", str(tmp_path / "m.pt"), "--lr", "nan", *FAST[:2]])
    assert code == 2 and "--lr must be a finite number > 0, got nan." in text
    assert not (tmp_path / "m.pt").exists()


# --recipe vit on resnet_tiny (a ViT-B/16 checkpoint with AdamW's moments is 1 GB): the recipe's mechanics, at 16 px
TINY_VIT = ["--recipe", "vit", "--arch", "resnet_tiny", "--epochs", "3", "--warmup-epochs", "1", "--batch-size", "16",
            "--min-res", "16", "--max-res", "16", "--val-res", "16", "--workers", "1"]


def _reference_lr(step: int, iters: int, epochs: int, warmup: float, peak: float, schedule: str) -> float:
    """The documented schedule, written apart from `lr_at`: the lr of global step `step` (from 1), set at the end
    of the step's share of its epoch; linear from 0 to `peak` over `warmup` epochs (at most half of them), then down
    to 0 at `epochs`: linearly (ramp) or along half a cosine (cosine)."""
    t = step / iters
    w = min(warmup, epochs / 2)
    if t <= w:
        return peak * t / w
    if schedule == "ramp":
        return peak * (epochs - t) / (epochs - w)
    return peak * (1 + math.cos(math.pi * (t - w) / (epochs - w))) / 2


def test_vit_recipe_is_dp4tls_and_overrides_win():
    vit = config_from_options(recipe="vit")
    assert (vit.arch, vit.optimizer, vit.schedule, vit.epochs, vit.batch_size, vit.lr_peak_epoch, vit.weight_decay,
            vit.label_smoothing, vit.min_res, vit.max_res, vit.val_res) == (
        "vit_b_16", "adamw", "cosine", 100, 100, 10.0, 0.3, 0.11, 224, 224, 224)
    # --lr is per 256 images: DP4TL's 3e-3 at its batch of 100 per GPU x 4 GPUs
    assert vit.lr * 4 * vit.batch_size / 256 == pytest.approx(3e-3, rel=1e-12)
    assert (vit.momentum, vit.seed, vit.small_input) == (0.9, 0, False)  # what it leaves: AdamW's beta1 0.9
    assert config_from_options(recipe="vit", lr=1e-3, epochs=5).lr == 1e-3  # an option given wins over the recipe
    assert config_from_options(recipe="resnet") == config_from_options() == TrainConfig()
    with pytest.raises(InputError, match=r"Unknown recipe 'deit'; accepted: resnet, vit\."):
        config_from_options(recipe="deit")
    # DP4TL's schedule, without its bug: 10 warm-up epochs to 3e-3, then the cosine over the other 90 (theirs
    # also decayed during the warm-up, reached 0 at epoch 90 and rose again to 3% by epoch 100)
    assert lr_at(vit, 5.0, 3e-3) == pytest.approx(1.5e-3) and lr_at(vit, 10.0, 3e-3) == pytest.approx(3e-3)
    assert lr_at(vit, 55.0, 3e-3) == pytest.approx(1.5e-3) and lr_at(vit, 100.0, 3e-3) == 0.0
    for p in np.linspace(0, 100, 401):
        assert lr_at(vit, p, 3e-3) == pytest.approx(_reference_lr(p, 1, 100, 10, 3e-3, "cosine"), abs=1e-15)
    short = replace(vit, epochs=4)  # the warm-up, like the ramp's peak, at most half of --epochs
    assert lr_at(short, 2.0, 1.0) == 1.0 and lr_at(short, 3.0, 1.0) == pytest.approx(0.5)
    for change, message in (({"optimizer": "adam"}, "--optimizer must be sgd or adamw, got 'adam'."),
                            ({"schedule": "step"}, "--schedule must be ramp or cosine, got 'step'."),
                            ({"momentum": 1.0}, "--momentum is AdamW's beta1 with --optimizer adamw and must be")):
        with pytest.raises(InputError, match=re.escape(message)):
            replace(vit, **change).validate()


def test_a_vit_without_a_recipe_is_told_of_the_vit_recipe(caplog):
    with caplog.at_level("WARNING", logger="dptool.recipe"):
        config_from_options(arch="resnet18")
        config_from_options(arch="vit_b_16", recipe="resnet")
        config_from_options(arch="vit_b_16", optimizer="adamw")
        assert not caplog.records
        config_from_options(arch="vit_b_16")
    assert [r.getMessage() for r in caplog.records] == [
        "vit_b_16 trains with the ResNet recipe (SGD, linear ramp, weight decay 5e-05), which ViTs train poorly with; "
        "--recipe vit gives DP4TL's ViT-B/16 recipe (AdamW, warm-up then cosine, weight decay 0.3), --recipe resnet "
        "keeps this one without this warning"]


@pytest.mark.parametrize("recipe", ["vit", "resnet"])
def test_each_step_follows_the_recipes_optimizer_and_schedule(tmp_path, monkeypatch, train_val_betons, one_thread,
                                                              recipe):
    """Every step's learning rate equals the documented schedule; the optimizer and loss are the recipe's."""
    import dptool.train

    train, val = train_val_betons
    seen = []
    real_step = dptool.train.train_step

    def recording_step(model, optimizer, scaler, criterion, *args):
        seen.append((optimizer, dict(optimizer.param_groups[0]), criterion.label_smoothing))
        return real_step(model, optimizer, scaler, criterion, *args)

    monkeypatch.setattr(dptool.train, "train_step", recording_step)
    args = [*TINY_VIT[2:], "--recipe", recipe, "--lr", "0.32"]
    code, text = _run(["train", str(train), "--val", str(val), "-o", str(tmp_path / "m.pt"), "--json", *args])
    assert code == 0, text
    iters = 160 // 16
    assert len(seen) == 3 * iters
    peak = 0.32 * 16 / 256
    schedule = {"vit": "cosine", "resnet": "ramp"}[recipe]
    expected = [_reference_lr(k, iters, 3, 1.0, peak, schedule) for k in range(1, 3 * iters + 1)]
    assert [group["lr"] for _, group, _ in seen] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    optimizer, group, smoothing = seen[0]
    if recipe == "vit":
        assert type(optimizer) is torch.optim.AdamW and smoothing == 0.11
        assert (group["betas"], group["eps"], group["weight_decay"], group["amsgrad"]) == ((0.9, 0.999), 1e-8, 0.3,
                                                                                           False)
    else:
        assert type(optimizer) is torch.optim.SGD and smoothing == 0.1
        assert (group["momentum"], group["dampening"], group["nesterov"], group["weight_decay"]) == (0.9, 0, False,
                                                                                                     5e-5)
    # one parameter group: the weight decay reaches every parameter, biases and norms too (as DP4TL's)
    assert len(optimizer.param_groups) == 1
    assert sum(p.numel() for p in group["params"]) == sum(
        p.numel() for p in create_model("resnet_tiny", 4).parameters())


def test_resume_refuses_another_optimizer_or_schedule_and_info_shows_them(tmp_path, train_val_betons, one_thread):
    train, val = train_val_betons
    out = tmp_path / "m.pt"
    run = ["train", str(train), "--val", str(val), "-o", str(out)]
    code, text = _run([*run, *TINY_VIT, "--epochs", "2"])  # the last of an option given twice counts
    assert code == 0, text
    ckpt = read_checkpoint(out)
    assert (ckpt["recipe"]["optimizer"], ckpt["recipe"]["schedule"]) == ("adamw", "cosine")
    assert set(ckpt["optimizer_state"]["param_groups"][0]) >= {"betas", "eps"}
    before = out.read_bytes()
    code, text = _run([*run, "--resume", *TINY_VIT[2:], "--epochs", "3"])  # no --recipe vit
    assert code == 2, text
    assert ("was trained with --optimizer adamw --schedule cosine --lr 0.00192 --weight-decay 0.3 --label-smoothing "
            "0.11 but this run gives --optimizer sgd --schedule ramp --lr 0.125 --weight-decay 5e-05 "
            "--label-smoothing 0.1; give the options it was trained with (--recipe vit sets them)") in text
    code, text = _run([*run, "--resume", *TINY_VIT, "--schedule", "ramp"])
    assert code == 2 and "was trained with --schedule cosine but this run gives --schedule ramp; give" in text, text
    assert out.read_bytes() == before
    code, text = _run([*run, "--resume", *TINY_VIT, "--epochs", "3", "--json"])  # the warm-up ends at 1 in both
    assert code == 0, text
    assert json.loads(text)["start_epoch"] == 2

    code, text = _run(["info", str(out)])
    assert code == 0 and "optimizer adamw, schedule cosine, lr_peak_epoch 1.0, " in text, text
    code, text = _run(["info", str(tmp_path / "m.jsonl")])
    assert code == 0 and "optimizer adamw, schedule cosine, lr_peak_epoch 1.0, " in text, text
    code, text = _run(["info", str(out), "--json"])
    assert json.loads(text)["recipe"]["optimizer"] == "adamw"

    # a checkpoint written before the optimizer and schedule were recorded trained with SGD and the ramp
    code, text = _run(["train", str(train), "-o", str(tmp_path / "old.pt"), *TINY_VIT[2:], "--epochs", "1"])
    assert code == 0, text
    old = torch.load(tmp_path / "old.pt", weights_only=False)
    old["recipe"] = {k: v for k, v in old["recipe"].items() if k not in ("optimizer", "schedule")}
    torch.save(old, tmp_path / "old.pt")
    code, text = _run(["train", str(train), "-o", str(tmp_path / "old.pt"), "--resume", *TINY_VIT[2:], "--epochs",
                       "2", "--optimizer", "adamw"])
    assert code == 2 and "was trained with --optimizer sgd but this run gives --optimizer adamw" in text, text


def test_a_res_crossing_the_recipes_says_the_recipe_set_it(tmp_path, train_val_betons):
    """--max-res 160 under --recipe vit (224 px) names the recipe's --min-res, not a bare "got 224/160"."""
    out = tmp_path / "x.pt"
    code, output = _run(["train", str(train_val_betons[0]), "--recipe", "vit", "--max-res", "160", "-o", str(out)])
    assert code == 2 and output.strip().endswith(
        "--max-res 160 is below --min-res 224, which --recipe vit sets; give --min-res 160 or less with it.")
    code, output = _run(["train", str(train_val_betons[0]), "--min-res", "200", "-o", str(out)])
    assert code == 2 and "--min-res 200 is above --max-res 192, its default; give --max-res 200 or more" in output
    assert not out.exists()
    # both given: the user's own pair, as given
    with pytest.raises(InputError, match=re.escape("8 <= min <= max, got 200/160.")):
        config_from_options(recipe="vit", min_res=200, max_res=160).validate()


def test_validating_on_the_training_file_is_warned_about(tmp_path, train_val_betons, caplog, one_thread):
    """`train X --val X` (or a copy of X) ran silently, its val_top1 the fit to the training images; finetune
    warns of a test file that holds the training samples, and so does train of such a validation file now."""
    import shutil

    from dptool.train import train

    data, val = train_val_betons
    copy = tmp_path / "copy.beton"
    shutil.copy(data, copy)
    shutil.copy(f"{data}.json", f"{copy}.json")
    config = config_from_options(epochs=1, batch_size=16, min_res=16, max_res=16, val_res=16, workers=1,
                                 arch="resnet_tiny")
    for i, (given, warned) in enumerate(((data, True), (copy, True), (val, False))):
        caplog.clear()
        with caplog.at_level("WARNING", logger="dptool.train"):
            train(data, tmp_path / f"m{i}.pt", config=config, val=given)
        assert ("holds the training file's samples: its top-1 measures fit" in caplog.text) == warned, caplog.text
