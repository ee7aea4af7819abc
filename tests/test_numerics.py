"""A diverged model never becomes a silent result: NaN/inf losses stop `train`, non-finite weights are refused at
load, non-finite surrogate outputs refuse a score, and FM refuses features too degenerate to cluster."""

from __future__ import annotations

import gc

import pytest
import torch
from click.testing import CliRunner

from dptool.checkpoint import read_checkpoint, save_checkpoint
from dptool.cli.main import cli

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba #167

TRAIN = ["--arch", "resnet18", "--small-input", "--min-res", "16", "--max-res", "16", "--label-smoothing", "0",
         "--workers", "1"]


@pytest.fixture(autouse=True)
def _collect_loaders():
    """Collect dropped FFCV loaders inside the test, where numba #167's finalizer noise is filtered."""
    yield
    gc.collect()


def _run(args):
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output


# --- train -----------------------------------------------------------------------------------------------------------

def test_a_checkpoint_with_nan_weights_is_refused_by_resume_and_score(tmp_path, train_val_betons, score_data):
    """Weights with a NaN used to load silently (score wrote a ranking made by argmax of NaN)."""
    train, _ = train_val_betons
    ckpt = read_checkpoint(score_data.checkpoint)
    state = dict(ckpt["state_dict"])
    state["layer1.0.conv1.weight"] = state["layer1.0.conv1.weight"].clone()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    state["fc.bias"] = torch.full_like(state["fc.bias"], float("inf"))
    bad = save_checkpoint(tmp_path / "nan.pt", arch="resnet18_small", num_classes=8, state_dict=state, recipe={},
                          data_fingerprint=None, epoch=1)
    code, output = _run(["score", "--method", "lm", "--source", str(score_data.source), "--target",
                         str(score_data.target), "--model", str(bad), "--res", "16", "-o", str(tmp_path / "s.json")])
    assert code == 2, output
    assert f"Checkpoint {bad} holds non-finite weights (NaN or inf) in 2 of its " in output
    assert "(first: layer1.0.conv1.weight)" in output and not (tmp_path / "s.json").exists()

    out = tmp_path / "r.pt"  # a train checkpoint whose momentum buffers hold an infinity
    code, output = _run(["train", str(train), "-o", str(out), "--epochs", "1", "--batch-size", "80", *TRAIN])
    assert code == 0, output
    ckpt = read_checkpoint(out)
    moments = ckpt["optimizer_state"]["state"]
    moments[0]["momentum_buffer"][0] = float("inf")
    save_checkpoint(out, **{k: ckpt[k] for k in ("arch", "num_classes", "state_dict", "recipe", "data_fingerprint",
                                                    "epoch", "optimizer_state", "small_input", "extra")})
    code, output = _run(["train", str(train), "-o", str(out), "--epochs", "2", "--batch-size", "80", "--resume",
                         *TRAIN])
    assert code == 2, output
    assert f"Cannot resume: checkpoint {out} holds non-finite weights (NaN or inf) in 1 of " in output
    assert "(first: optimizer.0.momentum_buffer)" in output


def test_a_learning_rate_beyond_float32_is_refused_in_one_sentence(tmp_path, train_val_betons):
    """torch's SGD used to fail with 'internal error: RuntimeError: value cannot be converted to type float'."""
    train, _ = train_val_betons
    code, output = _run(["train", str(train), "-o", str(tmp_path / "x.pt"), "--epochs", "1", "--batch-size", "16",
                         "--lr", "1e300", *TRAIN])
    assert code == 2, output
    assert "--lr 1e+300 gives a peak learning rate of 6.25e+298 at effective batch 16, beyond float32's range" in output


