"""`dptool finetune`: linear probe keeps the backbone bit-identical; full finetune trains it; splits; bad input."""

from __future__ import annotations

import gc
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_split_betons

from dptool.beton import read_sidecar, write_sidecar
from dptool.checkpoint import read_checkpoint, save_checkpoint
from dptool.cli.main import cli
from dptool.errors import InputError
from dptool.finetune import FinetuneConfig, finetune, split_indices
from dptool.models import create_model

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba #167


@pytest.fixture(autouse=True)
def _collect_loaders():
    """Collect dropped FFCV loaders inside the test, where numba #167's finalizer noise is filtered."""
    yield
    gc.collect()


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A 3-class target task unlike the source (another palette): (train, test) .beton paths."""
    return make_split_betons(tmp_path_factory.mktemp("target"), n_classes=3, seed=5)


@pytest.fixture(scope="module")
def source_ckpt(tmp_path_factory):
    """A 4-class ResNet-18 checkpoint (random weights, BN statistics made non-trivial)."""
    torch.manual_seed(0)
    model = create_model("resnet18", 4)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 16, 16) * 2 + 1)  # move the BN running statistics away from 0/1
    path = tmp_path_factory.mktemp("src") / "src.pt"
    save_checkpoint(path, arch="resnet18", num_classes=4, state_dict=model.state_dict(), recipe={"lr": 0.5},
                    data_fingerprint="blake2b:src", epoch=16)
    return path


def test_linear_probe_backbone_bit_identical(tmp_path, target, source_ckpt, one_thread):
    train, test = target
    out = tmp_path / "lp.pt"
    result = CliRunner().invoke(cli, ["finetune", str(source_ckpt), str(train), str(test), "--mode", "lp",
                                      "--epochs", "8", "--batch-size", "16", "--res", "16", "--val-fraction", "0.25",
                                      "--workers", "1", "-o", str(out), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    r = json.loads(result.output)
    assert r["mode"] == "lp" and r["target_classes"] == 3 and r["epochs"] == 8
    assert (r["train_images"], r["val_images"], r["test_images"]) == (90, 30, 30)
    assert r["best_test_top1"] == max(h["test_top1"] for h in r["history"]) >= r["final_test_top1"]
    assert r["test_top1_at_best_val"] == r["history"][r["best_val_epoch"]]["test_top1"]
    assert r["config"]["lr"] == 0.01 and r["config"]["optimizer"] == "adam"  # the paper's LP defaults
    assert r["best_test_top1"] > 0.5  # 3 classes: chance is 1/3

    src, tuned = read_checkpoint(source_ckpt)["state_dict"], read_checkpoint(out)["state_dict"]
    backbone = [k for k in src if not k.startswith("fc.")]
    assert backbone and all(torch.equal(src[k], tuned[k]) for k in backbone)  # weights and BN statistics
    assert tuned["fc.weight"].shape == (3, 512)
    lines = [json.loads(line) for line in (tmp_path / "lp.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "config" and lines[-1]["event"] == "summary"

    info = CliRunner().invoke(cli, ["info", str(out), "--json"], catch_exceptions=False)
    assert info.exit_code == 0, info.output
    d = json.loads(info.output)
    assert (d["kind"], d["run"], d["num_classes"], d["epochs_done"], d["resumable"]) == ("checkpoint", "finetune",
                                                                                         3, 8, False)
    assert d["data"] == str(train) and d["pretrained"] == str(source_ckpt)
    assert d["finetune_summary"]["best_test_top1"] == r["best_test_top1"]
    text = CliRunner().invoke(cli, ["info", str(out)], catch_exceptions=False).output
    assert f"finetuned from: {source_ckpt}" in text and "8 epochs of finetune" in text


def test_full_finetune_trains_everything(tmp_path, target, source_ckpt, one_thread):
    train, test = target
    cfg = FinetuneConfig(mode="ff", epochs=2, batch_size=16, res=16, lr=1e-3, workers=1)
    r = finetune(source_ckpt, train, test, config=cfg, output=tmp_path / "ff.pt")
    assert [h["epoch"] for h in r.history] == [0, 1] and r.val_images == 0 and r.best_val_top1 is None
    assert r.final_test_top1 == r.history[-1]["test_top1"]
    for h in r.history:  # the epoch's time and rate are the training pass's; the test pass is timed apart
        seen = h["images_per_s"] * h["epoch_time_s"]  # every training image, as DP4TL (120 = 7 x 16 + 8)
        assert h["test_time_s"] > 0 and seen == pytest.approx(r.train_images)
    src, tuned = read_checkpoint(source_ckpt)["state_dict"], read_checkpoint(tmp_path / "ff.pt")["state_dict"]
    assert not torch.equal(src["conv1.weight"], tuned["conv1.weight"])
    assert FinetuneConfig(mode="ff", optimizer="sgd").resolved().lr == 0.1


def test_full_finetune_drops_only_a_last_batch_of_one(target, source_ckpt, one_thread):
    """120 = 7 x 17 + 1: the single last image is left out (BatchNorm cannot train on one sample at 1x1 here)."""
    cfg = FinetuneConfig(mode="ff", epochs=1, batch_size=17, res=16, lr=1e-3, workers=1)
    h = finetune(source_ckpt, *target, config=cfg).history[0]
    assert h["images_per_s"] * h["epoch_time_s"] == pytest.approx(119)
    cfg = FinetuneConfig(mode="ff", epochs=1, batch_size=128, res=16, lr=1e-3, workers=1)  # the paper's batch
    h = finetune(source_ckpt, *target, config=cfg).history[0]
    assert h["images_per_s"] * h["epoch_time_s"] == pytest.approx(120)


@pytest.mark.parametrize("optimizer, lr", [("adam", "1e38"), ("sgd", "1e300")])
def test_an_lr_beyond_float32_is_refused_before_any_work(tmp_path, target, source_ckpt, optimizer, lr):
    """`--lr 1e38` (Adam divides it by its bias correction) or 1e300 ended in 'internal error: RuntimeError: value
    cannot be converted to type float without overflow' after the features were extracted."""
    train, test = target
    r = CliRunner().invoke(cli, ["finetune", str(source_ckpt), str(train), str(test), "--optimizer", optimizer,
                                 "--lr", lr, "--res", "16", "-o", str(tmp_path / "ft.pt")])
    assert r.exit_code == 2, r.output
    assert f"Error: --lr {float(lr):g} is beyond what {optimizer}'s step can compute in float32" in r.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", ["lp", "ff"])
def test_a_diverging_run_stops_at_its_first_nan_epoch(tmp_path, target, source_ckpt, mode, one_thread):
    """SGD at lr 1e30 turns the loss to NaN in the first epoch: the run stops there with one sentence (it went on
    for every epoch, reporting NaN losses and a chance-level 'best' top-1) and writes nothing."""
    train, test = target
    args = ["finetune", str(source_ckpt), str(train), str(test), "--mode", mode, "--optimizer", "sgd", "--lr", "1e30",
            "--epochs", "3", "--batch-size", "16", "--res", "16", "--workers", "1", "-o", str(tmp_path / "ft.pt")]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1, r.output  # a failure of the run, as train's divergence
    assert r.output.strip() == f"Error: The training loss became nan in epoch 1 of 3 ({mode}, sgd at --lr 1e+30); " \
                               "lower --lr."
    assert list(tmp_path.iterdir()) == []


def test_the_summary_counts_epochs_from_one(target, source_ckpt, one_thread):
    """The terminal summary names the best epochs 1..N (it printed the 0-based index: 'epoch 0' of a 1-epoch run);
    --json keeps the history's 0-based index."""
    train, test = target
    args = ["finetune", str(source_ckpt), str(train), str(test), "--epochs", "1", "--batch-size", "16", "--res", "16",
            "--workers", "1", "--val-fraction", "0.2"]
    text = CliRunner().invoke(cli, args, catch_exceptions=False).output
    assert "(epoch 1 of 1; selected on the test set" in text and "(epoch 1 of 1, val top-1" in text, text
    r = json.loads(CliRunner().invoke(cli, [*args, "--json"], catch_exceptions=False).output)
    assert r["best_test_epoch"] == r["best_val_epoch"] == r["history"][0]["epoch"] == 0


def test_progress_bars_cover_feature_extraction_and_batches(target, source_ckpt, capsys, one_thread):
    """With progress on, the linear probe's feature passes (most of its time: they had no bar) and each FF epoch's
    batches show bars on stderr, as the epochs do; stdout stays clean."""
    train, test = target
    finetune(source_ckpt, train, test, config=FinetuneConfig(epochs=1, batch_size=16, res=16, workers=1),
             progress=True)
    err = capsys.readouterr()
    assert "features: train" in err.err and "features: test" in err.err and "linear probe" in err.err
    assert err.out == ""
    finetune(source_ckpt, train, test, progress=True,
             config=FinetuneConfig(mode="ff", epochs=1, batch_size=16, res=16, lr=1e-3, workers=1))
    err = capsys.readouterr()
    assert "epoch 1/1:" in err.err and "0/8 [" in err.err and err.out == ""  # a bar over 120 / 16 batches


def test_testing_on_the_training_file_is_warned_about(target, source_ckpt, caplog, one_thread):
    train, _ = target
    r = finetune(source_ckpt, train, train, config=FinetuneConfig(epochs=1, batch_size=16, res=16, workers=1))
    assert r.test_images == r.train_images and "holds the training file's samples" in caplog.text


@pytest.mark.parametrize("change, flag", [({"lr": float("nan")}, "--lr"), ({"momentum": -1.0}, "--momentum"),
                                          ({"weight_decay": -1.0}, "--weight-decay"),
                                          ({"label_smoothing": 5.0}, "--label-smoothing"), ({"res": 0}, "--res"),
                                          ({"test_batch_size": 0}, "test_batch_size"),
                                          ({"precision": "fp8"}, "--precision")])
def test_config_refuses_bad_values(change, flag):
    with pytest.raises(InputError, match=f"^{flag} must be"):
        FinetuneConfig(**change).resolved()
    assert FinetuneConfig(lr=np.float32(0.5), momentum=np.float64(0.9)).resolved().lr == 0.5  # NumPy numbers


def test_a_batch_of_one_that_batchnorm_cannot_train_on_is_refused_in_one_sentence(tmp_path, target, source_ckpt,
                                                                                   one_thread):
    """--batch-size 1 at 16 px leaves a ResNet-18's last BatchNorm one value per channel: FF (and train, which steps
    the same way) ended in 'internal error: ValueError: Expected more than 1 value per channel when training'."""
    train, test = target
    for args in (["finetune", str(source_ckpt), str(train), str(test), "--mode", "ff", "--epochs", "1"],
                 ["train", str(train), "-o", str(tmp_path / "m.pt"), "--arch", "resnet18", "--epochs", "1",
                  "--min-res", "16", "--max-res", "16"]):
        result = CliRunner().invoke(cli, [*args, "--batch-size", "1", "--res" if args[0] == "finetune" else
                                          "--val-res", "16", "--workers", "1"])
        assert result.exit_code == 2, result.output
        assert ("A batch of 1 image at 16 px leaves the model's BatchNorm one value per channel, which it cannot "
                "train on; give --batch-size 2 or more (or a higher resolution).") in result.output, result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="train and finetune pick CUDA, where --precision applies")
def test_a_precision_the_cpu_does_not_compute_is_named_as_unread(tmp_path, target, source_ckpt, one_thread):
    """--precision fp16/bf16 is CUDA's autocast: on the CPU train and finetune ran in fp32 without a word (score
    warned)."""
    train, test = target
    for args, what in ((["finetune", str(source_ckpt), str(train), str(test), "--epochs", "1", "--res", "16"],
                        "finetuning"),
                       (["train", str(train), "-o", str(tmp_path / "m.pt"), "--arch", "resnet_tiny", "--epochs", "1",
                         "--min-res", "16", "--max-res", "16"], "training")):
        result = CliRunner().invoke(cli, [*args, "--batch-size", "16", "--workers", "1", "--precision", "bf16"])
        assert result.exit_code == 0, result.output
        assert f"--precision bf16 applies to CUDA; on cpu {what} runs in fp32" in result.output, result.output
        result = CliRunner().invoke(cli, [*args, "--batch-size", "16", "--workers", "1", "--precision", "fp32",
                                          "--force"])
        assert result.exit_code == 0 and "applies to CUDA" not in result.output, result.output


def test_momentum_given_to_adam_is_named_as_unread(target, source_ckpt, caplog, one_thread):
    """--momentum is SGD's: with the default Adam it was accepted and changed nothing, without a word."""
    train, test = target
    with caplog.at_level("WARNING", logger="dptool"):
        finetune(source_ckpt, train, test, config=FinetuneConfig(epochs=1, batch_size=16, res=16, workers=1,
                                                                 momentum=0.5))
    assert "--momentum 0.5 is SGD's; --optimizer adam does not read it" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="dptool"):
        finetune(source_ckpt, train, test, config=FinetuneConfig(epochs=1, batch_size=16, res=16, workers=1,
                                                                 momentum=0.5, optimizer="sgd"))
    assert "--momentum" not in caplog.text


def test_split_indices_stratified_and_seeded():
    labels = np.repeat(np.arange(3), [10, 5, 2])
    tr, va = split_indices(labels, 0.2, seed=1)
    assert np.bincount(labels[va]).tolist() == [2, 1, 1]
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(17))
    assert np.array_equal(va, split_indices(labels, 0.2, seed=1)[1])
    assert len(split_indices(labels, 0.0, seed=1)[1]) == 0
    one = np.array([0, 0, 0, 0, 0, 1])  # a one-sample class stays in training, whatever the fraction
    tr, va = split_indices(one, 0.6, seed=1)
    assert labels_of(one, tr) == [0, 0, 1] and labels_of(one, va) == [0, 0, 0]
    tr, va = split_indices(one, 0.99, seed=1)
    assert labels_of(one, tr) == [0, 1] and labels_of(one, va) == [0, 0, 0, 0]


def labels_of(labels, rows) -> list[int]:
    return sorted(labels[rows].tolist())


def test_bad_input(tmp_path, target, source_ckpt, tiny_beton):
    train, test = target
    (tmp_path / "junk.pt").write_bytes(b"junk")
    run = CliRunner().invoke
    r = run(cli, ["finetune", str(tmp_path / "junk.pt"), str(train), str(test)])
    assert r.exit_code == 2 and "not a dptool checkpoint" in r.output
    r = run(cli, ["finetune", str(source_ckpt), str(train), str(test), "--val-fraction", "1"])
    assert r.exit_code == 2
    with pytest.raises(InputError, match="beyond the 3 classes"):
        finetune(source_ckpt, train, tiny_beton, config=FinetuneConfig(epochs=1))
    with pytest.raises(InputError, match="--mode must be lp or ff"):
        FinetuneConfig(mode="xx").resolved()
    renamed = tmp_path / "renamed.beton"  # the same 3 labels, named as another dataset's classes
    shutil.copy(test, renamed)
    side = {k: v for k, v in read_sidecar(test).items() if k not in ("format", "version")}
    write_sidecar(renamed, {**side, "class_names": ["cat", "dog", "fox"]})
    with pytest.raises(InputError, match=r"Test file .*renamed\.beton has other classes than .*label 0 is 'cat'"):
        finetune(source_ckpt, train, renamed, config=FinetuneConfig(epochs=1))


def test_an_interrupted_finetune_leaves_no_log(tmp_path, target, source_ckpt, monkeypatch):
    """The log is written with the result: a run stopped midway leaves nothing that would block its rerun."""
    import dptool.finetune_loops

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dptool.finetune_loops, "_top1", stop)  # the linear probe's first evaluation
    with pytest.raises(KeyboardInterrupt):
        finetune(source_ckpt, *target, output=tmp_path / "ft.pt", config=FinetuneConfig(epochs=2))
    assert list(tmp_path.iterdir()) == []


def test_refuses_before_any_work(tmp_path, target, source_ckpt, monkeypatch):
    train, test = target
    with monkeypatch.context() as env:  # under torchrun every rank would run the whole job
        env.setenv("WORLD_SIZE", "2")
        with pytest.raises(InputError, match="run it without torchrun"):
            finetune(source_ckpt, train, test, output=tmp_path / "ft.pt", config=FinetuneConfig(epochs=1))
    with pytest.raises(InputError, match="same file as input"):  # the log would replace the training data
        finetune(source_ckpt, train, test, output=tmp_path / "ft.pt", log_path=train, config=FinetuneConfig(epochs=1))
    with pytest.raises(InputError, match="does not exist"):
        finetune(source_ckpt, train, test, log_path=tmp_path / "missing" / "log.jsonl", config=FinetuneConfig(epochs=1))
    assert not (tmp_path / "ft.pt").exists()


def test_a_log_over_the_checkpoint_is_named_as_such(tmp_path, target, source_ckpt):
    """`-o ft.jsonl` (whose default log is itself) or `--log` = `-o`: the checkpoint is an output of this run, and
    the refusal called it an input ('is the same path as input ft.jsonl'); train names it as the checkpoint."""
    train, test = target
    (tmp_path / "here").symlink_to(tmp_path)  # the same folder by another name: the log was written over it
    for out, log in ((tmp_path / "ft.jsonl", None), (tmp_path / "ft.pt", tmp_path / "ft.pt"),
                     (tmp_path / "ft.pt", tmp_path / "here" / "ft.pt")):
        args = ["finetune", str(source_ckpt), str(train), str(test), "--epochs", "1", "-o", str(out)]
        r = CliRunner().invoke(cli, args + (["--log", str(log)] if log else []))
        assert r.exit_code == 2, r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and "written over the checkpoint" in lines[0] and "input" not in lines[0], r.output
    assert [p.name for p in tmp_path.iterdir()] == ["here"]


def test_a_self_supervised_checkpoint_is_transferred_as_its_backbone(tmp_path, target, source_ckpt, one_thread):
    """LP of a MoCo v2 file holding the checkpoint's backbone (`--arch resnet18`) is the LP of the checkpoint: the
    same features and seeded head give the same loss and test top-1 every epoch. FF trains its backbone. Without
    --arch, such a file is refused with the hint."""
    from test_surrogate import _self_supervised_files

    train, test = target
    net = create_model("resnet18", 4)
    net.load_state_dict(read_checkpoint(source_ckpt)["state_dict"])
    moco = _self_supervised_files(net, tmp_path)["moco_v2"]
    cfg = FinetuneConfig(mode="lp", epochs=3, batch_size=16, res=16, workers=1)
    theirs = finetune(source_ckpt, train, test, config=cfg)
    ours = finetune(moco, train, test, config=cfg, arch="resnet18", output=tmp_path / "lp.pt")
    assert [(h["train_loss"], h["test_top1"]) for h in ours.history] == [
        (h["train_loss"], h["test_top1"]) for h in theirs.history]
    saved = read_checkpoint(tmp_path / "lp.pt")
    assert saved["arch"] == "resnet18" and saved["num_classes"] == 3
    assert all(torch.equal(v, saved["state_dict"][k]) for k, v in net.state_dict().items() if not k.startswith("fc."))

    ff = finetune(moco, train, test, config=FinetuneConfig(mode="ff", epochs=1, batch_size=16, res=16, lr=1e-3,
                                                           workers=1), arch="resnet18", output=tmp_path / "ff.pt")
    assert ff.epochs == 1
    assert not torch.equal(read_checkpoint(tmp_path / "ff.pt")["state_dict"]["conv1.weight"], net.conv1.weight)

    result = CliRunner().invoke(cli, ["finetune", str(moco), str(train), str(test), "--epochs", "1"])
    assert result.exit_code == 2 and "is not a dptool checkpoint" in result.output
    assert "name its architecture with --arch." in result.output and len(result.output.strip().splitlines()) == 1


def test_a_dptool_checkpoint_given_another_arch_is_told_to_drop_it(tmp_path, target, source_ckpt):
    """finetune has no --model: a dptool checkpoint that does not fit --arch is told to drop --arch."""
    train, test = target
    result = CliRunner().invoke(cli, ["finetune", str(source_ckpt), str(train), str(test), "--arch", "resnet18_small",
                                      "--epochs", "1", "--res", "16"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().endswith(f"{source_ckpt} is a dptool checkpoint, which knows its own architecture: "
                                          "drop --arch.")
    assert "--model" not in result.output and len(result.output.strip().splitlines()) == 1


def test_a_weights_file_with_nan_weights_is_refused_as_such(tmp_path, target, source_ckpt):
    """A state dict holding a NaN, given with --arch, was read, its features extracted, and the run stopped at 'The
    training loss became nan ...; lower --lr', blaming the learning rate; it is now refused as score refuses it."""
    train, test = target
    state = read_checkpoint(source_ckpt)["state_dict"]
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    weights = tmp_path / "nan.pth"
    torch.save(state, weights)
    result = CliRunner().invoke(cli, ["finetune", str(weights), str(train), str(test), "--arch", "resnet18",
                                      "--epochs", "1", "--batch-size", "16", "--res", "16", "--workers", "1",
                                      "-o", str(tmp_path / "ft.pt")])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"Error: Weights file {weights} holds non-finite weights (NaN or inf) in 1 of "), \
        result.output
    assert "(first: layer1.0.conv1.weight)" in result.output and "--lr" not in result.output.split("retrain")[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.pth"]

def test_a_vit_is_transferred_at_another_resolution_and_from_dinos_layout(tmp_path, one_thread):
    """A vit_b_16 checkpoint for 32 px images, linear-probed at --res 64: its position embeddings are resampled (it
    was refused), and the finetuned checkpoint is for 64 px and loads. The same backbone in DINO's layout (timm's
    names, under `teacher` / `backbone.`, with `--arch vit_b_16`) gives the same losses and test top-1 epoch for
    epoch. FF trains it at its own 32 px."""
    from test_models import _timm_vit_state

    from dptool.models import vit_state_from_timm

    train, test = make_split_betons(tmp_path, n_classes=3, train_per_class=4, val_per_class=2, seed=5)  # ViT-B: few
    dino = _timm_vit_state(seed=3)
    net = create_model("vit_b_16", 5, image_size=32)
    net.load_state_dict({**net.state_dict(), **vit_state_from_timm(dino)})
    ckpt = save_checkpoint(tmp_path / "vit.pt", arch="vit_b_16", num_classes=5, state_dict=net.state_dict(),
                           recipe={}, data_fingerprint=None, epoch=1, image_size=32)
    dino_file = tmp_path / "dino.pth"
    torch.save({"teacher": {**{"backbone." + k: v for k, v in dino.items()},
                            "head.last_layer.weight_g": torch.ones(1, 1)}}, dino_file)
    cfg = FinetuneConfig(mode="lp", epochs=3, batch_size=4, res=64, workers=1)
    theirs = finetune(ckpt, train, test, config=cfg, output=tmp_path / "lp.pt")
    ours = finetune(dino_file, train, test, config=cfg, arch="vit_b_16")
    assert [(h["train_loss"], h["test_top1"]) for h in ours.history] == [
        (h["train_loss"], h["test_top1"]) for h in theirs.history]
    saved = read_checkpoint(tmp_path / "lp.pt")  # load_checkpoint builds the model at this size from it
    pos = saved["state_dict"]["encoder.pos_embedding"]
    assert saved["image_size"] == 64 and pos.shape == (1, 17, 768)
    assert torch.equal(pos[:, 0], net.encoder.pos_embedding[:, 0].detach())

    ff = finetune(ckpt, train, test, config=FinetuneConfig(mode="ff", epochs=1, batch_size=4, res=32, workers=1))
    assert np.isfinite(ff.history[0]["train_loss"]) and ff.train_images == 12


def _stop_at(monkeypatch, epoch: int):
    """Make the run stop (as Ctrl-C would) in epoch `epoch` (0-based), after its training and before its checkpoint."""
    import dptool.finetune_loops

    check = dptool.finetune_loops._check_loss

    def stopping(train_loss, at, cfg):
        check(train_loss, at, cfg)
        if at == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(dptool.finetune_loops, "_check_loss", stopping)


def _metrics(history):
    return [{k: v for k, v in h.items() if not k.endswith("_s")} for h in history]  # times differ between runs


@pytest.mark.parametrize("mode", ["lp", "ff"])
def test_a_stopped_run_resumed_ends_as_an_uninterrupted_one(tmp_path, target, source_ckpt, mode, monkeypatch,
                                                            one_thread):
    """Stopped in epoch 3 of 4 (Ctrl-C, through the CLI), the run leaves the checkpoint and log of epoch 2;
    `--resume` continues it and ends with the weights, history and summary of a run that was not stopped, bit for
    bit on the CPU (LP re-extracts its features; the optimizer, cosine schedule and sample order continue)."""
    train, test = target
    lr = "0.01" if mode == "lp" else "0.001"
    args = ["finetune", str(source_ckpt), str(train), str(test), "--mode", mode, "--epochs", "4", "--batch-size",
            "16", "--res", "16", "--lr", lr, "--val-fraction", "0.2", "--workers", "1", "--checkpoint-every", "0",
            "--json"]
    whole = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "whole.pt")], catch_exceptions=False)
    assert whole.exit_code == 0, whole.output
    out = tmp_path / "ft.pt"
    with monkeypatch.context() as m:
        _stop_at(m, 2)
        stopped = CliRunner().invoke(cli, [*args, "-o", str(out)])
    assert stopped.exit_code == 130, stopped.output
    ckpt = read_checkpoint(out)
    assert ckpt["epoch"] == 2 and ckpt["extra"]["resume"] and "summary" not in ckpt["extra"]
    logged = [json.loads(line) for line in (tmp_path / "ft.jsonl").read_text().splitlines()]
    assert [r.get("epoch") for r in logged] == [None, 0, 1]
    shown = CliRunner().invoke(cli, ["info", str(out)], catch_exceptions=False).output  # what info says of it
    assert "2 epochs of finetune; stopped early: `finetune --resume`" in shown, shown
    assert f"finetuned from: {source_ckpt}\n" in shown, shown
    info = json.loads(CliRunner().invoke(cli, ["info", str(out), "--json"], catch_exceptions=False).output)
    assert (info["resumable"], info["pretrained"]) == (True, str(source_ckpt))
    shown = CliRunner().invoke(cli, ["info", str(tmp_path / "ft.jsonl")], catch_exceptions=False).output
    assert "(running or stopped; `finetune --resume` continues a stopped one)" in shown, shown

    again = CliRunner().invoke(cli, [*args, "-o", str(out)])  # a rerun is told about --resume
    assert again.exit_code == 2 and "pass --force to overwrite it, or --resume to continue" in again.output
    # --test-batch-size is FF's evaluation batch, free to change; LP's feature extraction batch too, which on the
    # CPU changes the features' last bits (the resumed head ended 1e-9 off an uninterrupted run's): refused there
    other = ["--test-batch-size", "7"]
    if mode == "lp":
        refused = CliRunner().invoke(cli, [*args, "-o", str(out), "--resume", *other])
        assert refused.exit_code == 2, refused.output
        assert ("was finetuned with --test-batch-size 256 but this run gives --test-batch-size 7; give the options "
                "it began with, since the linear probe extracts its features in batches of --test-batch-size "
                "(--workers and --precision may change)") in refused.output, refused.output
        other = []
    resumed = CliRunner().invoke(cli, [*args, "-o", str(out), "--resume", *other], catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    a, b = json.loads(whole.output), json.loads(resumed.output)
    assert (a["start_epoch"], b["start_epoch"]) == (0, 2)
    assert _metrics(b["history"]) == _metrics(a["history"]) and len(b["history"]) == 4
    for key in ("final_test_top1", "best_test_top1", "best_test_epoch", "best_val_top1", "test_top1_at_best_val"):
        assert b[key] == a[key], key
    w, r = read_checkpoint(tmp_path / "whole.pt"), read_checkpoint(out)
    assert w["state_dict"].keys() == r["state_dict"].keys()
    assert all(torch.equal(w["state_dict"][k], r["state_dict"][k]) for k in w["state_dict"])
    assert r["epoch"] == 4 and "resume" not in r["extra"] and r["extra"]["summary"]["start_epoch"] == 2

    logged = [json.loads(line) for line in (tmp_path / "ft.jsonl").read_text().splitlines()]
    assert [r["event"] for r in logged] == ["config", "epoch", "epoch", "resume", "epoch", "epoch", "summary"]
    info = json.loads(CliRunner().invoke(cli, ["info", str(tmp_path / "ft.jsonl"), "--json"],
                                         catch_exceptions=False).output)
    assert (info["run"], info["epochs_done"], info["resumed_at"], info["complete"]) == ("finetune", 4, [2], True)


def test_resume_refuses_what_would_not_continue_the_run(tmp_path, target, source_ckpt, tiny_beton, monkeypatch,
                                                        one_thread):
    """One sentence for each: no -o, no checkpoint, a changed recipe, another test file or pretrained checkpoint,
    a finished run, a checkpoint of dptool train."""
    train, test = target
    out = tmp_path / "ft.pt"
    cfg = FinetuneConfig(epochs=3, batch_size=16, res=16, workers=1)

    def run(**kw):
        kw = {"config": cfg, "output": out, "resume": True, "checkpoint_every": 0, **kw}
        return finetune(kw.pop("source", source_ckpt), train, kw.pop("test", test), **kw)

    with pytest.raises(InputError, match="--resume continues the run whose checkpoint -o names; give -o"):
        run(output=None)
    with pytest.raises(InputError, match="--checkpoint-every"):
        run(checkpoint_every=float("nan"), resume=False)
    with pytest.raises(InputError, match=r"Cannot resume: checkpoint .*ft\.pt does not exist"):
        run()
    with monkeypatch.context() as m:
        _stop_at(m, 1)
        with pytest.raises(KeyboardInterrupt):
            run(resume=False)
    assert read_checkpoint(out)["epoch"] == 1
    with pytest.raises(InputError, match=r"was finetuned with --lr 0\.01 --seed 0 but this run gives --lr 0\.1 "
                                         r"--seed 1; give the options it began with"):
        run(config=replace(cfg, lr=0.1, seed=1))
    with pytest.raises(InputError, match="--epochs 3 but this run gives --epochs 5"):  # the cosine's length
        run(config=replace(cfg, epochs=5))
    other_test = tmp_path / "other_test.beton"
    shutil.copy(train, other_test)
    shutil.copy(f"{train}.json", f"{other_test}.json")
    with pytest.raises(InputError, match=r"was tested on .*val\.beton with fingerprint .* resume with the test file"):
        run(test=other_test)
    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    save_checkpoint(other, arch="resnet18", num_classes=4, state_dict=create_model("resnet18", 4).state_dict(),
                    recipe={}, data_fingerprint=None, epoch=1)
    with pytest.raises(InputError, match=r"was finetuned from .*src\.pt, whose weights differ from .*other\.pt's"):
        run(source=other)
    r = run(config=replace(cfg, workers=2))  # may change (LP's --test-batch-size may not: see the test above)
    assert r.start_epoch == 1 and len(r.history) == 3
    with pytest.raises(InputError, match=r"holds a finished finetune of 3 epochs; there is nothing left to run \(a new "
                                         r"run: drop --resume and give --force or another -o\)"):
        run(force=True)  # --force with --resume still resumes: the remedy is to drop --resume
    with pytest.raises(InputError, match="was not written by dptool finetune"):
        run(output=other)


def test_resume_refuses_non_finite_optimizer_moments(tmp_path, target, source_ckpt, monkeypatch, one_thread):
    """An infinite optimizer moment in a stopped finetune's checkpoint would make the resumed weights NaN:
    refused as train refuses it, naming the tensor."""
    train, test = target
    out = tmp_path / "ft.pt"
    cfg = FinetuneConfig(epochs=3, batch_size=16, res=16, workers=1)
    with monkeypatch.context() as m:
        _stop_at(m, 1)
        with pytest.raises(KeyboardInterrupt):
            finetune(source_ckpt, train, test, config=cfg, output=out, checkpoint_every=0)
    saved = read_checkpoint(out)
    moments = saved["extra"]["resume"]["optimizer"]["state"]
    moments[0]["exp_avg_sq"].view(-1)[0] = float("inf")  # LP steps the head by AdamW
    save_checkpoint(out, **{k: saved[k] for k in ("arch", "num_classes", "state_dict", "recipe", "data_fingerprint",
                                                    "epoch", "small_input", "extra")})
    with pytest.raises(InputError, match=r"Cannot resume: checkpoint .*ft\.pt holds non-finite weights "
                                         r"\(NaN or inf\) in 1 of .* \(first: optimizer\.0\.exp_avg_sq\)"):
        finetune(source_ckpt, train, test, config=cfg, output=out, checkpoint_every=0, resume=True)


def test_checkpoints_wait_for_checkpoint_every(tmp_path, target, source_ckpt, monkeypatch, one_thread):
    """No checkpoint before `checkpoint_every` seconds of epochs: a run stopped in its third epoch then leaves
    nothing (no log either, which would block the rerun); the summary names the epoch a run resumed at."""
    train, test = target
    cfg = FinetuneConfig(epochs=3, batch_size=16, res=16, workers=1)
    with monkeypatch.context() as m:
        _stop_at(m, 2)
        with pytest.raises(KeyboardInterrupt):
            finetune(source_ckpt, train, test, config=cfg, output=tmp_path / "ft.pt", checkpoint_every=1e9)
        assert list(tmp_path.iterdir()) == []
        with pytest.raises(KeyboardInterrupt):
            finetune(source_ckpt, train, test, config=cfg, output=tmp_path / "ft.pt", checkpoint_every=0)
    args = ["finetune", str(source_ckpt), str(train), str(test), "--epochs", "3", "--batch-size", "16", "--res", "16",
            "--workers", "1", "-o", str(tmp_path / "ft.pt"), "--resume"]
    text = CliRunner().invoke(cli, args, catch_exceptions=False).output
    assert "LP of " in text and "3 epochs, 120 train / 0 val / 30 test images, resumed at the start of epoch 3\n" \
        in text, text


def test_a_resume_puts_back_the_epochs_of_an_incomplete_last_log_line(tmp_path, target, source_ckpt, monkeypatch,
                                                                      one_thread):
    """A log whose last line was cut (a copy taken mid-write) loses that line on --resume, and the checkpoint's
    record of its epoch takes its place, as train --resume does: the finished log holds every epoch once."""
    train, test = target
    cfg = FinetuneConfig(epochs=3, batch_size=16, res=16, workers=1)
    out = tmp_path / "ft.pt"
    with monkeypatch.context() as m:
        _stop_at(m, 2)
        with pytest.raises(KeyboardInterrupt):
            finetune(source_ckpt, train, test, config=cfg, output=out, checkpoint_every=0)
    log_path = tmp_path / "ft.jsonl"
    text = log_path.read_text()
    log_path.write_text(text[:-20])  # the record of epoch 1 without its end
    r = finetune(source_ckpt, train, test, config=cfg, output=out, resume=True, checkpoint_every=0)
    logged = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(x["event"], x.get("epoch")) for x in logged] == [
        ("config", None), ("epoch", 0), ("epoch", 1), ("resume", None), ("epoch", 2), ("summary", None)]
    assert logged[2] == {"event": "epoch", **r.history[1]}
