"""Documented behaviour seen from the CLI and the library: seeds, bad arguments, `info` on odd files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_beton

from dptool.beton import fingerprint, open_beton, read_image
from dptool.cli.main import cli
from dptool.convert import WriterParams, convert
from dptool.errors import MAX_SEED, InputError, check_seed
from dptool.finetune import FinetuneConfig
from dptool.prune import prune
from dptool.scores import Scores, write_scores
from dptool.scoring import ScoreOptions, score
from dptool.synthetic import separable_images, write_npz
from dptool.train import TrainConfig


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("bad", [-1, MAX_SEED + 1, 1.5, "1", True])
def test_check_seed_refuses(bad):
    with pytest.raises(InputError, match="--seed must be an integer from 0 to"):
        check_seed("--seed", bad)


def test_seed_refused_before_any_work_in_library(tiny_beton, tmp_path):
    npz = write_npz(tmp_path / "d.npz", *separable_images(2, 4, 16, seed=0))
    with pytest.raises(InputError, match="--seed"):
        convert(npz, tmp_path / "d.beton", params=WriterParams(shuffle_seed=-1))
    assert not (tmp_path / "d.beton").exists()
    with pytest.raises(InputError, match="--seed"):
        score("random", source=tiny_beton, options=ScoreOptions(seed=-1))
    with pytest.raises(InputError, match="--seed"):
        FinetuneConfig(seed=-1).resolved()
    with pytest.raises(InputError, match="--seed"):
        TrainConfig(seed=2**40).validate()


@pytest.mark.parametrize("command", [["convert", "{npz}", "{out}"],
                                     ["score", "--method", "random", "--source", "{beton}", "-o", "{out}"],
                                     ["demo", "--workdir", "{out}"]])
def test_negative_seed_is_a_usage_error(command, tiny_beton, tmp_path):
    npz = write_npz(tmp_path / "d.npz", *separable_images(2, 4, 16, seed=0))
    args = [a.format(npz=npz, beton=tiny_beton, out=tmp_path / "out.beton") for a in command]
    result = run(*args, "--seed", "-1")
    assert result.exit_code == 2 and "--seed" in result.output and "internal error" not in result.output


def _class_scores(beton):
    b = open_beton(beton)
    n = b.num_classes
    return Scores(method="random", level="class", ids=np.arange(n), names=[str(i) for i in range(n)],
                  scores=np.arange(n, dtype=float), tiebreak=np.zeros(n), tie_break="test",
                  source={"path": str(beton), "fingerprint": fingerprint(b), "num_samples": b.num_samples,
                          "num_classes": n})


@pytest.mark.parametrize("ratios", ["0.5", 0.5])
def test_prune_ratios_must_be_a_list(ratios, tiny_beton, tmp_path):
    path = write_scores(tmp_path / "s.json", _class_scores(tiny_beton))
    with pytest.raises(InputError, match="--ratios must be a list"):
        prune(tiny_beton, path, tmp_path / "o_{ratio}.beton", ratios=ratios)


def test_read_image_takes_a_path(tiny_beton):
    assert np.array_equal(read_image(tiny_beton, 3), read_image(open_beton(tiny_beton), 3))


def test_info_shows_the_files_fingerprint_and_flags_a_foreign_sidecar(tmp_path):
    # same class counts, other pixels: the counts check of open_beton passes, the fingerprint tells them apart
    a = make_beton(tmp_path, "a", n_classes=3, seed=1)
    b = make_beton(tmp_path, "b", n_classes=3, seed=2)
    shutil.copy(b.with_suffix(".beton.json"), a.with_suffix(".beton.json"))  # b's sidecar beside a
    info = json.loads(run("info", a, "--json").output)
    assert info["fingerprint"] == fingerprint(open_beton(a)) and info["sidecar_matches"] is False
    assert "was not written for this file" in run("info", a).output
    good = json.loads(run("info", b, "--json").output)
    assert good["sidecar_matches"] is True and good["fingerprint"] == fingerprint(open_beton(b))


def test_score_refuses_non_finite_mean_before_any_work(tiny_beton, tmp_path):
    result = run("score", "--method", "random", "--source", tiny_beton, "--mean", "nan", "0", "0",
                 "-o", tmp_path / "s.json")
    assert result.exit_code == 2 and "--mean values must all be finite" in result.output
    assert not (tmp_path / "s.json").exists()


def test_info_describes_a_minimal_training_log(tmp_path):
    log = tmp_path / "run.jsonl"
    log.write_text('{"event": "config", "config": {}}\n{"event": "epoch", "epoch": 0}\n')
    result = run("info", log)  # described since `info` reads logs (tests/test_runlog.py has real ones)
    assert result.exit_code == 0 and "log of train, ?, 1 epoch (running or stopped" in result.output
