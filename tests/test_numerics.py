"""A diverged model never becomes a silent result: NaN/inf losses stop `train`, non-finite weights are refused at
load, non-finite surrogate outputs refuse a score, and FM refuses features too degenerate to cluster."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dptool.checkpoint import read_checkpoint, save_checkpoint
from dptool.cli.main import cli
from dptool.errors import InputError
from dptool.models import create_model
from dptool.scoring.kmeans import kmeans

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

def test_a_nan_loss_stops_training_before_any_checkpoint(tmp_path, train_val_betons, one_thread):
    """--lr 1e6 turns the weights into NaN after the first step: the run used to train every epoch on NaN and save
    the NaN weights (exit 0, train_loss NaN in the log); now it stops at the first NaN loss, naming where."""
    train, val = train_val_betons
    out = tmp_path / "lr.pt"
    code, output = _run(["train", str(train), "--val", str(val), "-o", str(out), "--epochs", "2", "--batch-size",
                         "16", "--val-res", "16", "--lr", "1e6", *TRAIN])
    assert code == 1, output
    assert "Training diverged: the loss was nan at epoch 1 of 2, step " in output
    assert "peak 6.25e+04" in output and "no checkpoint or log was written" in output and "lower --lr" in output
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_divergence_after_a_checkpoint_leaves_it_and_its_log_as_they_were(tmp_path, train_val_betons, one_thread):
    """A resumed run whose loss overflows (finite weights, one layer scaled to the edge of float32) stops in its
    first steps; the checkpoint it resumed from keeps its bytes instead of being replaced by NaN weights."""
    train, _ = train_val_betons
    out = tmp_path / "run.pt"
    # its warm-up at 0.5 epochs, where --epochs 1 caps the default 2: a resume to 2 epochs keeps it
    args = ["train", str(train), "-o", str(out), "--batch-size", "32", "--lr", "0.1", "--lr-peak-epoch", "0.5", *TRAIN]
    code, output = _run([*args, "--epochs", "1"])
    assert code == 0, output
    ckpt = read_checkpoint(out)
    state = dict(ckpt["state_dict"])
    state["fc.weight"] = state["fc.weight"] * 1e37  # finite, but the logits overflow
    keys = ("arch", "num_classes", "recipe", "data_fingerprint", "epoch", "optimizer_state", "small_input",
            "blurpool", "image_size", "extra")
    save_checkpoint(out, state_dict=state, **{k: ckpt[k] for k in keys})
    before = {p: p.read_bytes() for p in (out, out.with_suffix(".jsonl"))}
    code, output = _run([*args, "--epochs", "2", "--resume"])
    assert code == 1, output
    assert "Training diverged: the loss was nan at epoch 2 of 2, step " in output
    assert f"the checkpoint {out} of epoch 1 and its log" in output
    assert out.read_bytes() == before[out]
    # the log too: its resume line was written as the run started, and `dptool info` showed a resume that trained
    # nothing ('resumed at epoch 1', again at each retry); it now waits for the first epoch's record
    assert out.with_suffix(".jsonl").read_bytes() == before[out.with_suffix(".jsonl")]


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
    code, output = _run(["info", str(bad)])
    assert code == 0 and ("non-finite weights: 2 tensors hold NaN or inf (first: layer1.0.conv1.weight); score, "
                          "finetune and --resume refuse this checkpoint") in output, output

    out = tmp_path / "r.pt"  # a train checkpoint whose momentum buffers hold an infinity
    code, output = _run(["train", str(train), "-o", str(out), "--epochs", "1", "--batch-size", "80", *TRAIN])
    assert code == 0, output
    ckpt = read_checkpoint(out)
    moments = ckpt["optimizer_state"]["state"]
    moments[0]["momentum_buffer"][0] = float("inf")
    save_checkpoint(out, **{k: ckpt[k] for k in ("arch", "num_classes", "state_dict", "recipe", "data_fingerprint",
                                                    "epoch", "optimizer_state", "small_input", "extra")})
    code, output = _run(["train", str(train), "-o", str(out), "--epochs", "2", "--batch-size", "80", "--resume",
                         "--lr-peak-epoch", "0.5", *TRAIN])
    assert code == 2, output
    assert f"Cannot resume: checkpoint {out} holds non-finite weights (NaN or inf) in 1 of " in output
    assert "(first: optimizer.0.momentum_buffer)" in output
    # info says so, and not that --resume can extend it (it said 'optimizer state kept (`train --resume ...)')
    code, output = _run(["info", str(out)])
    assert code == 0 and ("non-finite optimizer moments: 1 tensor holds NaN or inf (first: "
                          "optimizer.0.momentum_buffer); --resume refuses this checkpoint") in output, output
    assert "--resume --epochs N" not in output and "non-finite weights" not in output
    code, output = _run(["info", str(out), "--json"])
    assert json.loads(output)["resumable"] is False


def test_an_update_that_makes_the_weights_non_finite_is_caught_before_the_checkpoint():
    """The epoch's last update is seen by no loss of the epoch: the parameters are checked before saving."""
    from dptool.train import TrainConfig, TrainingDiverged, _check_parameters

    model = create_model("resnet18_small", 4)
    _check_parameters(model, 0, TrainConfig(epochs=3))  # finite: nothing
    with torch.no_grad():
        model.layer2[0].conv1.weight[0, 0, 0, 0] = float("-inf")
    with pytest.raises(TrainingDiverged, match=r"update of epoch 1 of 3 made 1 of the 62 parameter tensors "
                                               r"non-finite \(first: layer2.0.conv1.weight\)"):
        _check_parameters(model, 0, TrainConfig(epochs=3))


def test_a_learning_rate_beyond_float32_is_refused_in_one_sentence(tmp_path, train_val_betons):
    """torch's SGD used to fail with 'internal error: RuntimeError: value cannot be converted to type float'."""
    train, _ = train_val_betons
    code, output = _run(["train", str(train), "-o", str(tmp_path / "x.pt"), "--epochs", "1", "--batch-size", "16",
                         "--lr", "1e300", *TRAIN])
    assert code == 2, output
    assert "--lr 1e+300 gives a peak learning rate of 6.25e+298 at effective batch 16, beyond float32's range" in output
    # within float32's range, but AdamW's first step divides it by 1 - beta1 = 0.1: with no warm-up to keep that
    # step's rate small, it ended in 'internal error: RuntimeError: value cannot be converted to type float'
    code, output = _run(["train", str(train), "-o", str(tmp_path / "x.pt"), "--epochs", "1", "--batch-size", "16",
                         "--lr", "1e39", "--optimizer", "adamw", "--lr-peak-epoch", "0", *TRAIN])
    assert code == 2, output
    assert ("--lr 1e+39 gives a peak learning rate of 6.25e+37 at effective batch 16, beyond what adamw's step can "
            "compute in float32; give a smaller --lr.") in output, output
    assert not list(tmp_path.iterdir())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_under_torchrun_every_rank_stops_at_the_same_step(tmp_path, train_val_betons):
    """The loss is per rank; the decision is made on the sum over ranks, so both stop together, none hangs."""
    train, _ = train_val_betons
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "dptool", "train", str(train), "-o", str(tmp_path / "d.pt"),
           "--epochs", "2", "--batch-size", "8", "--lr", "1e6", *TRAIN]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode != 0
    said = [line for line in proc.stderr.splitlines() if "Training diverged" in line]
    assert len(said) == 1, proc.stderr[-3000:]  # the same sentence on both ranks (the same step): printed once
    assert "internal error" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- score -----------------------------------------------------------------------------------------------------------

class _Bad(torch.nn.Module):
    """Features = the mean colour (3 values) tiled to 8, or a constant, or NaN, as `kind` says; a linear head."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        f = x.mean(dim=(2, 3)).repeat(1, 3)[:, :8]
        if self.kind == "constant":
            f = torch.ones_like(f)
        elif self.kind == "two":  # two distinct features: the red mean above or below its median
            f = (f[:, :1] > f[:, :1].median()).float().expand(-1, 8)
        elif self.kind == "nan":
            f = f * float("nan")
        elif self.kind == "inf_on_target" and len(x) == 45:  # the target's one batch; the source's are finite
            f = f.clone()
            f[3, 0] = float("inf")
        return self.fc(f)


@pytest.fixture
def bad_factory(monkeypatch):
    mod = types.ModuleType("bad_factory")
    for kind in ("constant", "two", "nan", "inf_on_target"):
        setattr(mod, kind, lambda kind=kind: _Bad(kind))
    monkeypatch.setitem(sys.modules, "bad_factory", mod)
    return mod


def _score(score_data, tmp_path, factory, *extra):
    out = tmp_path / "s.json"
    code, output = _run(["score", "--source", str(score_data.source), "--target", str(score_data.target),
                         "--model-factory", f"bad_factory:{factory}", "--res", "16", "-o", str(out), *extra])
    return code, output, out


@pytest.mark.parametrize("method, what, images", [("lm", "logits", "45 of the 45 images of"),
                                                  ("el2n", "logits", "of the 192 images of"),
                                                  ("fm", "features", "192 of the 192 images of")])
def test_non_finite_surrogate_outputs_refuse_the_score(tmp_path, score_data, bad_factory, method, what, images):
    """NaN outputs used to give an LM scores file (argmax of NaN) and an EL2N kernel error ('weights must be
    finite, got nan at index 0.') that named no surrogate."""
    code, output, out = _score(score_data, tmp_path, "nan", "--method", method)
    assert code == 2, output
    assert f"The surrogate --model-factory bad_factory:nan gave non-finite {what} (NaN or inf) for " in output
    assert images in output and "none are written" in output
    assert not out.exists()


def test_non_finite_target_features_refuse_fm_naming_the_surrogate(tmp_path, score_data, bad_factory):
    """The source features are finite, the target's are not: the nearest-centroid kernel used to refuse with 'x must
    be finite, got inf at index 0 in row 3.', which named neither the surrogate nor the file."""
    code, output, out = _score(score_data, tmp_path, "inf_on_target", "--method", "fm")
    assert code == 2, output
    assert ("The surrogate --model-factory bad_factory:inf_on_target gave non-finite features (NaN or inf) for at "
            f"least 1 of the 45 images of {score_data.target} it ran on") in output
    assert not out.exists()


@pytest.mark.parametrize("groups", ["clusters", "labels"])
def test_constant_features_are_refused_by_fm(tmp_path, score_data, bad_factory, groups):
    """Constant features used to give 8 clusters, 7 of them 'empty', and every target vote for cluster 0."""
    code, output, out = _score(score_data, tmp_path, "constant", "--method", "fm", "--groups", groups)
    assert code == 2, output
    assert "take only 1 distinct value(s)" in output and "check --feature-layer and the surrogate" in output
    assert not out.exists()


def test_fewer_distinct_features_than_clusters_is_refused_naming_how_many(tmp_path, score_data, bad_factory):
    code, output, out = _score(score_data, tmp_path, "two", "--method", "fm", "--clusters", "3")
    assert code == 2, output
    assert ("features of the 192 sampled source images take only 2 distinct value(s), fewer than the 3 clusters"
            in output) and "lower --clusters to at most 2" in output
    code, output, out = _score(score_data, tmp_path, "two", "--method", "fm", "--clusters", "2")
    assert code == 0, output
    assert json.loads(out.read_text())["method"] == "fm"


def test_distinct_rows_is_exact_below_enough_and_kmeans_refuses_too_few():
    from dptool.scoring.kmeans import distinct_rows

    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 6)).astype(np.float32)
    assert distinct_rows(x, 50) == 50
    few = np.repeat(x[:3], 7, axis=0)
    few[0] = -0.0 * few[0]  # -0.0 is 0.0: the same point
    few[7] = 0.0 * few[7]
    assert distinct_rows(few, 21) == 4
    assert distinct_rows(np.zeros((9, 4), np.float32), 2) == 1
    with pytest.raises(InputError, match="needs at least 5 distinct features, got 4 among 21"):
        kmeans(few, 5)
    assert kmeans(few, 4).shape == (4, 6)


# --- score --precision -----------------------------------------------------------------------------------------------

def test_score_precision_is_recorded_and_the_cpu_computes_in_float32_whatever_is_asked(tmp_path, score_data):
    """`--precision` is the escape hatch from fp16 overflow on CUDA. On the CPU every value resolves to fp32 (as
    `train` and `bench` resolve it), an explicit fp16/bf16 is named in a warning, and the scores are those of a run
    without the option, bit for bit; the scores file records the precision the forward pass ran at."""
    base = ["score", "--source", str(score_data.source), "--target", str(score_data.target), "--model",
            str(score_data.checkpoint), "--device", "cpu", "--batch-size", "16", "--workers", "1"]
    docs = {}
    for precision in (None, "fp32", "fp16", "bf16"):
        out = tmp_path / f"{precision}.json"
        result = CliRunner().invoke(cli, [*base, "-o", str(out), *(["--precision", precision] if precision else [])])
        assert result.exit_code == 0, result.output
        warned = [line for line in result.stderr.splitlines() if "--precision" in line]
        assert warned == ([f"WARNING dptool.scoring.run: --precision {precision} applies to CUDA; on cpu the "
                           "surrogate runs in fp32"] if precision in ("fp16", "bf16") else []), warned
        docs[precision] = json.loads(out.read_text())
        assert docs[precision]["params"]["precision"] == "fp32"
    for precision in ("fp32", "fp16", "bf16"):
        assert docs[precision]["groups"] == docs[None]["groups"] and docs[precision]["params"] == docs[None]["params"]
    code, output = _run(["score", "--method", "random", "--source", str(score_data.source), "--precision", "fp32",
                         "-o", str(tmp_path / "random.json")])
    assert code == 0 and "--method random does not use --precision; ignored" in output
    assert "precision" not in json.loads((tmp_path / "random.json").read_text())["params"]  # it ran no surrogate


@pytest.mark.parametrize("precision, advice", [("auto", "(its forward pass ran under float16 autocast on cuda, "
                                                        "which overflows above 65504: score with --precision bf16 or "
                                                        "fp32)"),
                                               ("bf16", "(its forward pass ran under bfloat16 autocast on cuda; "
                                                        "--precision fp32 tells whether the precision or the weights "
                                                        "are at fault)"),
                                               ("fp32", "it ran on: scores")])
def test_the_non_finite_refusal_names_the_precision_that_gets_out_of_it(precision, advice):
    """The refusal of NaN/inf outputs on CUDA names --precision, the way out of an fp16 overflow (it said only that
    fp16 overflows, and no option changed that but --device cpu). The message alone: CUDA runs are in
    test_score_gpu.py."""
    from dptool.features import InferenceOptions, _check_finite

    options = InferenceOptions(device="cuda", precision=precision)
    with pytest.raises(InputError) as err:
        _check_finite(3, 45, torch.nn.Linear(1, 1), "t.beton", "logits", options)
    assert advice in str(err.value) and str(err.value).startswith("The surrogate Linear gave non-finite logits")
    with pytest.raises(InputError, match="--precision must be one of auto, fp32, fp16, bf16, got 'half'"):
        InferenceOptions(precision="half")
