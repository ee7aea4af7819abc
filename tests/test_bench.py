"""`dptool bench`: the pretraining and loader benchmarks run end to end on tiny files and report consistent numbers."""

from __future__ import annotations

import json
import logging

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dptool.beton import open_beton
from dptool.cli.main import cli
from dptool.subset import write_subset


@pytest.fixture(scope="module")
def full_and_pruned(tiny_beton, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    beton = open_beton(tiny_beton)
    keep = np.flatnonzero(beton.labels < 2)  # half of the classes
    write_subset(beton, folder / "half.beton", keep)
    return tiny_beton, folder / "half.beton"


def test_bench_pretrain_reports_speedups_against_the_first_file(full_and_pruned, tmp_path):
    full, half = full_and_pruned
    result = CliRunner().invoke(
        cli,
        [
            "bench",
            "pretrain",
            str(full),
            str(half),
            "--arch",
            "resnet18",
            "--small-input",
            "--res",
            "16",
            "--batch-size",
            "16",
            "--steps",
            "2",
            "--rounds",
            "2",
            "--workers",
            "1",
            "--json",
            "--json-out",
            str(tmp_path / "b.json"),
            "--plot",
            str(tmp_path / "b.png"),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # the warning that half.beton is not a pruned copy goes to stderr
    assert json.loads((tmp_path / "b.json").read_text()) == data
    full_row, half_row = data["rows"]
    from dptool.steps import resolve_precision

    assert data["precision"] == resolve_precision(data["device"], "auto")  # the one trained in, `auto` resolved
    assert (full_row["samples"], half_row["samples"]) == (160, 80)
    assert half_row["ideal_speedup"] == pytest.approx(2.0)
    for row in data["rows"]:
        assert row["images"] == 2 * 2 * 16  # rounds x steps x batch
        assert row["images_per_second"] > 0 and 0 <= row["data_wait_share"] <= 1
        assert row["projected_epoch_seconds"] == pytest.approx(row["samples"] / row["images_per_second"])
    assert full_row["speedup"] == pytest.approx(1.0)
    assert half_row["speedup"] == pytest.approx(
        full_row["projected_epoch_seconds"] / half_row["projected_epoch_seconds"]
    )
    from PIL import Image

    with Image.open(tmp_path / "b.png") as png:  # a real PNG, the chart's size at 110 dpi
        assert png.format == "PNG" and png.size == (int((1.8 * 2 + 2) * 110), int(3.5 * 110))


def test_bench_pretrain_whole_epochs_are_measured(full_and_pruned, caplog):
    """--epochs: every file trains whole epochs from fresh iterators (after a warm-up left early) and the speed-up
    is measured from epoch times; no loader thread is left behind."""
    import threading

    from dptool.bench import bench_pretrain

    full, half = full_and_pruned
    # batch 13: the pruned file's 6 batches are 3 of warm-up plus a full queue of 3, so FFCV's thread then waits
    # to queue its end-of-epoch marker (the case that once kept a GPU run waiting)
    with caplog.at_level(logging.WARNING, logger="dptool.bench"):
        data = bench_pretrain([full, half], arch="resnet18", small_input=True, res=16, batch_size=13, workers=1,
                              epochs=2, progress=False).to_dict()
    # half.beton is a subset written directly, without prune's provenance in its sidecar
    assert "half.beton is not a pruned copy of" in caplog.text
    full_row, half_row = data["rows"]
    for row, samples in ((full_row, 160), (half_row, 80)):
        assert row["images"] == 2 * (samples // 13) * 13  # 2 epochs of whole batches
        assert len(row["epoch_seconds"]) == 2 and row["measured_epoch_seconds"] > 0
    assert full_row["speedup_basis"] == "measured"
    assert half_row["speedup"] == pytest.approx(full_row["measured_epoch_seconds"] / half_row["measured_epoch_seconds"])
    for row in (full_row, half_row):  # the mean epoch, as images/s is an average too
        assert row["measured_epoch_seconds"] == pytest.approx(sum(row["epoch_seconds"]) / 2)
    assert not [t for t in threading.enumerate() if type(t).__name__ == "EpochIterator" and t.is_alive()]


def test_is_pruned_from_reads_the_sidecars(full_and_pruned, tmp_path):
    from dptool.bench import is_pruned_from
    from dptool.beton import read_sidecar, write_sidecar

    full, half = full_and_pruned
    assert not is_pruned_from(open_beton(half), open_beton(full))  # written without prune's provenance
    copy = tmp_path / "p.beton"
    copy.write_bytes(half.read_bytes())
    write_sidecar(copy, {"pruning": {"source_fingerprint": read_sidecar(full)["fingerprint"]}})
    assert is_pruned_from(open_beton(copy), open_beton(full))
    assert not is_pruned_from(open_beton(copy), open_beton(copy))


def test_bench_loader_compares_with_image_folder(tiny_beton, tiny_arrays, tmp_path):
    from dptool.synthetic import write_image_folder

    images, labels = tiny_arrays
    write_image_folder(tmp_path / "folder", images, labels, [f"class_{c}" for c in range(4)])
    (tmp_path / "folder" / "class_0" / "broken.png").write_bytes(b"not a png")  # convert would have skipped it
    (tmp_path / "folder" / "class_9").mkdir()  # an empty class folder, which convert keeps as a label
    result = CliRunner().invoke(
        cli,
        [
            "bench",
            "loader",
            str(tiny_beton),
            "--res",
            "16",
            "--batch-size",
            "16",
            "--workers",
            "1",
            "--compare-folder",
            str(tmp_path / "folder"),
            "--json",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert "holds 161 images but" in result.stderr  # 160 samples, nothing skipped: other images than the file's
    assert data["ffcv_images_per_second"] > 0 and data["folder_images_per_second"] > 0
    assert data["loader_ratio"] == pytest.approx(data["ffcv_images_per_second"] / data["folder_images_per_second"])
    assert data["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_loader_refuses_cuda_without_a_gpu(tiny_beton):
    result = CliRunner().invoke(cli, ["bench", "loader", str(tiny_beton), "--device", "cuda"])
    assert result.exit_code == 2 and "torch sees no CUDA device" in result.output
    assert "Traceback" not in result.output


def test_bench_loader_refuses_torchrun_before_any_work(tiny_beton, tmp_path, monkeypatch):
    """Under torchrun every rank measured the whole file (contending for the cores and device 0), printed its own
    table and wrote the same --json-out: refused as finetune is."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(cli, ["bench", "loader", str(tiny_beton), "--res", "16", "--batch-size", "8",
                                      "--json-out", str(tmp_path / "b.json")])
    assert result.exit_code == 2 and "run it without torchrun" in result.output
    assert list(tmp_path.iterdir()) == []


def test_bench_pretrain_refuses_a_batch_too_large_for_a_later_file_before_any_work(full_and_pruned, monkeypatch):
    """A batch larger than a later (pruned) file was refused only once the files before it had their page cache
    warmed, loader built and model stepped: the whole of a full ImageNet file read first, on every rank."""
    import dptool.bench
    import dptool.loaders

    full, half = full_and_pruned  # 160 and 80 samples

    def no_work(*args, **kwargs):
        raise AssertionError("a file was read before the batch size was checked")

    monkeypatch.setattr(dptool.bench, "warm_page_cache", no_work)
    monkeypatch.setattr(dptool.loaders, "train_loader", no_work)
    result = CliRunner().invoke(cli, ["bench", "pretrain", str(full), str(half), "--arch", "resnet_tiny", "--res",
                                      "16", "--batch-size", "100", "--steps", "1", "--rounds", "1"])
    assert result.exit_code == 2, result.output
    assert f"--batch-size 100 is larger than the samples each of the 1 process(es) gets from {half}" in result.output


def test_bench_refuses_missing_files(tmp_path, tiny_beton):
    result = CliRunner().invoke(cli, ["bench", "pretrain", str(tmp_path / "nope.beton")])
    assert result.exit_code == 2 and "does not exist" in result.output
    # refused before any measurement
    for args, message in ((["--json-out", str(tmp_path / "missing" / "b.json")], "does not exist"),
                          (["--compare-folder", str(tmp_path / "nope")], "is not a folder"),
                          (["--arch", "resnet19"], "resnet19")):
        result = CliRunner().invoke(cli, ["bench", "loader", str(tiny_beton), *args])
        assert result.exit_code == 2 and message in result.output, result.output
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "a.png").write_bytes(b"")
    result = CliRunner().invoke(cli, ["bench", "loader", str(tiny_beton), "--compare-folder", str(tmp_path / "loose")])
    assert result.exit_code == 2 and "has no class subfolders" in result.output, result.output


def test_bench_outputs_never_replace_an_input_or_an_existing_file(tmp_path, tiny_beton):
    data = tmp_path / "d.beton"
    data.write_bytes(tiny_beton.read_bytes())
    before = data.read_bytes()
    for command in (["pretrain", str(data), "--plot", str(data)], ["pretrain", str(data), "--json-out", str(data)],
                    ["loader", str(data), "--json-out", str(data), "--force"]):
        result = CliRunner().invoke(cli, ["bench", *command])
        assert result.exit_code == 2 and "as input" in result.output, result.output
    result = CliRunner().invoke(cli, ["bench", "pretrain", str(data), "--json-out", f"{data}.json", "--force"])
    assert result.exit_code == 2 and "as the sidecar of input" in result.output
    (tmp_path / "b.json").write_text("keep me")
    result = CliRunner().invoke(cli, ["bench", "loader", str(data), "--json-out", str(tmp_path / "b.json")])
    assert result.exit_code == 2 and "already exists; pass --force" in result.output
    assert data.read_bytes() == before and (tmp_path / "b.json").read_text() == "keep me"


def test_bench_loader_refuses_a_file_of_one_batch(tiny_beton):
    """160 samples at batch 100: one batch, spent on the warm-up; reporting 0 img/s would read as a result."""
    result = CliRunner().invoke(cli, ["bench", "loader", str(tiny_beton), "--res", "16", "--batch-size", "100",
                                      "--workers", "1"])
    assert result.exit_code == 2 and "all of it spent on the warm-up" in result.output, result.output


def test_bench_loader_shows_a_progress_bar_per_measurement(tiny_beton, capsys):
    """Each measurement reads a whole epoch (of ImageNet: minutes, with --arch on a CPU hours): a bar shows where."""
    from dptool.bench import bench_loader

    result = bench_loader(tiny_beton, res=16, batch_size=16, workers=1, arch="resnet_tiny", small_input=True,
                          max_batches=2, progress=True, precision="fp16")
    if not torch.cuda.is_available():
        assert result.to_dict()["precision"] == "fp32"  # fp16 autocast is CUDA's: the model step ran in fp32
    err = capsys.readouterr().err
    assert "FFCV: 100%" in err and "2/2" in err and "FFCV + resnet_tiny: 100%" in err
    bench_loader(tiny_beton, res=16, batch_size=16, workers=1, max_batches=2)  # the default: no bar
    assert capsys.readouterr().err == ""


def test_bench_arch_lists_the_architectures_as_train_does():
    """--arch is one option across commands: the same choices in `--help` and the same usage error."""
    from dptool.cli.main import cli as group

    def arch(*path):
        cmd = group
        for name in path:
            with click.Context(cmd) as ctx:
                cmd = cmd.get_command(ctx, name)
        return next(p for p in cmd.params if p.name == "arch").type

    for path in (("bench", "pretrain"), ("bench", "loader")):
        assert list(getattr(arch(*path), "choices", [])) == list(arch("train").choices)


def test_bench_loader_help_says_a_measurement_reads_a_whole_epoch():
    result = CliRunner().invoke(cli, ["bench", "loader", "-h"])
    assert "[default: a whole epoch]" in " ".join(result.output.split())


def test_bench_pretrain_refuses_steps_with_epochs(tiny_beton):
    """--epochs N measures whole epochs: a --steps or --rounds given with it was silently ignored."""
    for extra in (["--steps", "5"], ["--rounds", "2"]):
        result = CliRunner().invoke(cli, ["bench", "pretrain", str(tiny_beton), "--epochs", "1", *extra])
        assert result.exit_code == 2 and f"so {extra[0]} would be ignored" in result.output, result.output


@pytest.fixture
def stepped():
    """(optimizer class name, its defaults) of every optimizer step taken while the test runs, seen through torch's
    global step hook: the optimizer the benchmark really stepped, not what it reports."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    seen = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: seen.append((type(opt).__name__,
                                                                                     dict(opt.defaults))))
    yield seen
    handle.remove()


@pytest.mark.parametrize("recipe, optimizer, name, momentum, weight_decay, lr_per_256, smoothing", [
    (None, None, "SGD", 0.9, 5e-5, 0.125, 0.1),  # train's default recipe, as before but at its peak lr
    ("vit", None, "AdamW", 0.9, 0.3, 1.92e-3, 0.11),  # DP4TL's ViT-B/16 recipe: the step of train --recipe vit
    ("vit", "sgd", "SGD", 0.9, 0.3, 1.92e-3, 0.11),  # --optimizer over the recipe's, as in train
    ("resnet", "adamw", "AdamW", 0.9, 5e-5, 0.125, 0.1),
])
def test_bench_pretrain_steps_the_optimizer_of_the_recipe_asked(full_and_pruned, tmp_path, stepped, recipe, optimizer,
                                                                name, momentum, weight_decay, lr_per_256, smoothing):
    """bench pretrain once stepped SGD at lr 0.01 whatever the recipe: a ViT benchmark measured the wrong step."""
    full, half = full_and_pruned
    args = ["bench", "pretrain", str(full), str(half), "--arch", "resnet_tiny", "--res", "16", "--batch-size", "16",
            "--steps", "1", "--rounds", "2", "--workers", "1", "--json-out", str(tmp_path / "b.json")]
    args += ["--recipe", recipe] if recipe else []
    args += ["--optimizer", optimizer] if optimizer else []
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lr = lr_per_256 * 16 / 256  # the recipe's peak lr at this effective batch, as train scales --lr
    assert len(stepped) == 2 * (3 + 2 * 1)  # per file: 3 warm-up steps, then rounds x steps
    for cls, defaults in stepped:
        assert cls == name
        assert defaults["lr"] == pytest.approx(lr) and defaults["weight_decay"] == pytest.approx(weight_decay)
        assert (defaults["betas"][0] if name == "AdamW" else defaults["momentum"]) == pytest.approx(momentum)
    data = json.loads((tmp_path / "b.json").read_text())
    assert (data["recipe"], data["optimizer"]) == (recipe or "resnet", name.lower())
    assert data["lr"] == pytest.approx(lr) and data["weight_decay"] == pytest.approx(weight_decay)
    assert data["label_smoothing"] == pytest.approx(smoothing)
    assert f"{name.lower()} (lr {lr:.3g}, weight decay {weight_decay:g})" in result.stdout.splitlines()[0]


def test_bench_pretrain_recipe_vit_sets_the_batch_as_train_does(full_and_pruned):
    """--recipe vit without --batch-size: DP4TL's batch of 100 per process, which the 80-sample file cannot give."""
    full, half = full_and_pruned
    result = CliRunner().invoke(cli, ["bench", "pretrain", str(full), str(half), "--recipe", "vit"])
    assert result.exit_code == 2 and "--batch-size 100 is larger than the samples" in result.output, result.output


def test_bench_pretrain_warns_that_a_vit_without_recipe_measures_sgd(full_and_pruned, caplog):
    """As train: a ViT given the ResNet recipe by default is warned about (here before the batch is refused)."""
    from dptool.bench import bench_pretrain
    from dptool.errors import InputError

    _, half = full_and_pruned
    with caplog.at_level(logging.WARNING, logger="dptool.recipe"), pytest.raises(InputError, match="--batch-size 100"):
        bench_pretrain([half], arch="vit_b_16", batch_size=100)
    assert "vit_b_16 trains with the ResNet recipe (SGD" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dptool.recipe"), pytest.raises(InputError, match="--batch-size 100"):
        bench_pretrain([half], recipe="vit")  # vit_b_16 with AdamW: nothing to warn about
    assert not caplog.text


def test_bench_loader_model_step_takes_the_recipe_optimizer(tiny_beton, stepped):
    result = CliRunner().invoke(cli, ["bench", "loader", str(tiny_beton), "--res", "16", "--batch-size", "16",
                                      "--workers", "1", "--max-batches", "2", "--arch", "resnet_tiny", "--recipe",
                                      "vit", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["recipe"], data["optimizer"]) == ("vit", "adamw")
    assert len(stepped) == 1 + 2 and {cls for cls, _ in stepped} == {"AdamW"}  # warm-up batch + 2 measured
    assert stepped[0][1]["weight_decay"] == pytest.approx(0.3)
    result = CliRunner().invoke(cli, ["bench", "loader", str(tiny_beton), "--optimizer", "adamw"])
    assert result.exit_code == 2 and "give --arch too" in result.output and "Traceback" not in result.output


def test_bench_plot_must_be_a_png_path(tmp_path, tiny_beton):
    """`bench pretrain --plot X` wrote its PNG to any name (`--plot model.pt --force` replaced a checkpoint): like
    score's and info's --plot, it takes a .png path only, refused before the measurement."""
    kept = tmp_path / "model.pt"
    kept.write_bytes(b"a checkpoint")
    result = CliRunner().invoke(cli, ["bench", "pretrain", str(tiny_beton), "--plot", str(kept), "--force"])
    assert result.exit_code == 2 and f"--plot {kept} does not end in .png" in result.output, result.output
    assert kept.read_bytes() == b"a checkpoint"
