"""`dptool demo`: every stage runs through the real path and produces its output; one table row per method."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from dptool.beton import open_beton
from dptool.checkpoint import read_checkpoint
from dptool.cli.main import cli
from dptool.demo import DemoConfig, run_demo
from dptool.scores import read_scores
from dptool.synthetic import mini_imagenet, relevant_source_classes


def test_mini_imagenet_is_deterministic_and_shaped():
    a = mini_imagenet(per_class=2, target_train_per_class=2, target_test_per_class=1, seed=5)
    b = mini_imagenet(per_class=2, target_train_per_class=2, target_test_per_class=1, seed=5)
    for key in a:
        assert (a[key][0] == b[key][0]).all() and (a[key][1] == b[key][1]).all()
    images, labels, names = a["source"]
    assert images.shape == (200, 32, 32, 3) and len(names) == 100 and labels.max() == 99
    assert a["target_train"][0].shape == (20, 32, 32, 3) and len(a["target_train"][2]) == 10
    assert len(relevant_source_classes()) == 40


def test_tiny_demo_runs_every_stage(tmp_path):
    config = replace(DemoConfig.quick(), per_class=6, target_train_per_class=4, target_test_per_class=4,
                     surrogate_epochs=1, pretrain_epochs=1, probe_epochs=2, batch_size=32, workers=1)
    result = run_demo(tmp_path, config, force=False)
    assert [r.method for r in result.rows] == ["none", "lm", "fm", "random"]
    full = open_beton(tmp_path / "source.beton")
    assert full.num_samples == 600 and full.num_classes == 100
    for method in ("lm", "random"):
        pruned = open_beton(tmp_path / f"source_{method}_p60.beton")
        assert len(set(pruned.labels.tolist())) == 40 and pruned.num_classes == 100
        assert read_scores(tmp_path / f"scores_{method}.json").method == method
    fm_pruned = open_beton(tmp_path / "source_fm_p60.beton")
    assert fm_pruned.sidecar["pruning"]["level"] == "cluster" and 0 < fm_pruned.num_samples < full.num_samples
    assert len(np.load(tmp_path / "scores_fm.assign.npy")) == full.num_samples  # a cluster for every source image
    rows = {r.method: r for r in result.rows}
    # images trained on: whole batches of 32 (training drops the last partial one), one epoch
    assert rows["none"].pretrain_images == 600 // 32 * 32 and rows["lm"].pretrain_images == 240 // 32 * 32
    for r in result.rows:
        assert 0.0 <= r.target_top1_final <= r.target_top1_best <= 1.0
        ckpt = read_checkpoint(tmp_path / f"pretrain_{r.method}.pt")
        assert ckpt["epoch"] == config.pretrain_epochs and ckpt["num_classes"] == 100
    assert (tmp_path / "demo.png").stat().st_size > 0
    assert json.loads((tmp_path / "demo.json").read_text())["rows"][0]["method"] == "none"

    again = CliRunner().invoke(cli, ["demo", "--workdir", str(tmp_path)])
    assert again.exit_code == 2 and "--force" in again.output


@pytest.mark.slow
def test_quick_demo_cli(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--quick", "--workdir", str(tmp_path / "d"), "--json"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [r["method"] for r in data["rows"]] == ["none", "lm", "fm", "random"]
    assert set(data["stage_seconds"]) >= {"generate + convert", "train surrogate", "score lm", "prune lm"}


def test_pretraining_and_probe_show_progress(tiny_beton, tmp_path, capsys):
    """The demo's longest stages (four pretrainings and probes) ran without a bar while the others had one."""
    from dptool.demo import pretrain_and_probe

    config = replace(DemoConfig.quick(), pretrain_epochs=1, probe_epochs=1, batch_size=32, workers=1)
    pretrain_and_probe(tiny_beton, tiny_beton, tiny_beton, tmp_path / "p", config, progress=True)
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "linear probe" in err


def test_demo_refuses_torchrun_before_any_work(tmp_path, monkeypatch):
    """Under torchrun every rank converted, scored and pruned into one folder (warning about each other's temporary
    files) and the run failed only at the linear probe, which refuses torchrun: refused at once, nothing written."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(cli, ["demo", "--quick", "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 2 and "run it without torchrun" in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_ratio_that_leaves_fewer_images_than_a_batch_still_pretrains(tmp_path):
    """--ratio 0.95 keeps 5 of 100 classes: fewer images than the demo's batch. After scoring and pruning, the
    demo stopped with '--batch-size 128 is larger than the 120 samples ...; use a smaller batch', an option
    `dptool demo` does not have; the pretraining batch is now at most the pruned file's images."""
    config = replace(DemoConfig.quick(), per_class=6, target_train_per_class=4, target_test_per_class=4,
                     surrogate_epochs=1, pretrain_epochs=1, probe_epochs=1, batch_size=32, workers=1, ratio=0.95,
                     methods=("lm",))
    result = run_demo(tmp_path, config)
    rows = {r.method: r for r in result.rows}
    assert open_beton(tmp_path / "source_lm_p95.beton").num_samples == 30  # 5 classes of 6 images, under 32
    assert rows["lm"].pretrain_images == 30 and rows["none"].pretrain_images == 600 // 32 * 32
    assert read_checkpoint(tmp_path / "pretrain_lm.pt")["recipe"]["batch_size"] == 30
