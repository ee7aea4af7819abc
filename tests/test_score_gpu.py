"""`dptool score` on an NVIDIA GPU: LM and FM on CUDA against the same plain-torch / NumPy references as the CPU.

Skipped as a whole where torch sees no CUDA device. float32 (--precision fp32, no TF32) so that predictions can be
compared with the CPU reference: a row may differ only where the reference's two best logits (or centroid distances)
are closer than the difference between the devices' float32 arithmetic.
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

if not torch.cuda.is_available():
    pytest.skip("torch sees no CUDA device", allow_module_level=True)

from test_score import _brute_nearest  # noqa: E402

from dptool.cli.main import cli  # noqa: E402
from dptool.features import InferenceOptions  # noqa: E402
from dptool.scoring import ScoreOptions, score  # noqa: E402
from dptool.surrogate import load_surrogate  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

CUDA = InferenceOptions(res=16, batch_size=16, workers=1, device="cuda", precision="fp32")
NEAR_TIE = 1e-3  # relative gap between the best two under which CPU and GPU float32 may disagree


@pytest.fixture(scope="module", autouse=True)
def _float32_convolutions():
    """cuDNN computes float32 convolutions in TF32 by default on Ampere and later GPUs (a 10-bit mantissa): logits and
    features would differ from the CPU reference by about NEAR_TIE itself. The comparison is meant in float32."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


def _near_tie(values: np.ndarray, largest: bool) -> np.ndarray:
    """Rows whose best two entries are within NEAR_TIE (relative) of each other."""
    top2 = np.sort(values, axis=1)[:, -2:] if largest else np.sort(values, axis=1)[:, :2]
    gap = np.abs(top2[:, 1] - top2[:, 0])
    return gap <= NEAR_TIE * np.maximum(np.abs(top2).max(axis=1), 1e-12)


@pytest.fixture(scope="module")
def surrogate(score_data):
    return load_surrogate(model=score_data.checkpoint, device="cuda")


def test_lm_on_cuda_equals_plain_torch_loop(score_data, surrogate, target_ref):
    run = score("lm", source=score_data.source, target=score_data.target, surrogate=surrogate,
                options=ScoreOptions(inference=CUDA))
    logits, _, _ = target_ref
    pred = logits.argmax(dim=1).numpy()
    ties = _near_tie(logits.numpy(), largest=True)
    expected = np.bincount(pred, minlength=8)
    if not ties.any():
        assert np.array_equal(run.scores.scores, expected)
    else:
        assert np.abs(run.scores.scores - expected).sum() <= 2 * ties.sum()
    assert set(run.scores.order()[:3].tolist()) == set(score_data.subset)


def test_fm_clusters_on_cuda_vote_like_brute_force(score_data, surrogate, target_ref, source_ref):
    opts = ScoreOptions(inference=CUDA, clusters=8, source_sample=16, seed=1)
    run = score("fm", source=score_data.source, target=score_data.target, surrogate=surrogate, options=opts)
    tgt_feats, src_feats = target_ref[1], source_ref[1]
    cent = np.asarray(run.centroids, np.float64)
    d_tgt = ((tgt_feats[:, None, :] - cent[None]) ** 2).sum(axis=2)
    d_src = ((src_feats[:, None, :] - cent[None]) ** 2).sum(axis=2)
    votes = np.bincount(_brute_nearest(tgt_feats, cent), minlength=8)
    tgt_ties, src_ties = _near_tie(d_tgt, largest=False), _near_tie(d_src, largest=False)
    assert np.abs(run.scores.scores - votes).sum() <= 2 * tgt_ties.sum()
    differ = run.assignment != _brute_nearest(src_feats, cent)
    assert not (differ & ~src_ties).any()
    voted = np.nonzero(run.scores.scores)[0]
    major = np.asarray(run.scores.extra["majority_class"])
    assert set(major[voted].tolist()) <= set(score_data.subset)


def test_lm_and_fm_on_cuda_at_the_default_float16(score_data, surrogate):
    """`dptool score --device cuda` runs the forward pass under float16 autocast by default (--precision auto), while
    the two tests above run it in float32: this is the path users get. Values may move by fp16
    rounding, so only what rounding cannot change is checked: every target image is counted once, every source row
    is assigned a cluster."""
    half = replace(CUDA, precision="auto")
    lm = score("lm", source=score_data.source, target=score_data.target, surrogate=surrogate,
               options=ScoreOptions(inference=half))
    assert lm.scores.scores.shape == (8,) and int(lm.scores.scores.sum()) == 45
    fm = score("fm", source=score_data.source, target=score_data.target, surrogate=surrogate,
               options=ScoreOptions(inference=half, clusters=8, source_sample=16, seed=1))
    assert int(np.asarray(fm.scores.scores).sum()) == 45 and np.isfinite(np.asarray(fm.centroids)).all()
    assert (np.asarray(fm.assignment) >= 0).all() and (np.asarray(fm.assignment) < 8).all()


class _Loud(torch.nn.Module):
    """The mean colour (3 values, the FM feature) into a linear head of weights about 1e6: logits of about 1e5,
    finite in float32 and bfloat16, infinite in float16 (whose largest value is 65504)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(3, 8)
        with torch.no_grad():
            self.fc.weight.mul_(1e6)

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3)))


def test_an_fp16_overflow_is_refused_naming_precision_which_scores_it(tmp_path, score_data, monkeypatch):
    """A surrogate whose logits overflow float16 was refused under the fp16 autocast `score` always ran on CUDA, with
    no way out but --device cpu. The refusal names --precision; fp32 and bf16 score it and are recorded. FM groups
    made in fp16 serve a target scored in fp32 (--centroids-from), which records the groups' precision."""
    mod = types.ModuleType("loud_factory")
    mod.loud = _Loud
    monkeypatch.setitem(sys.modules, "loud_factory", mod)
    base = ["score", "--source", str(score_data.source), "--target", str(score_data.target), "--model-factory",
            "loud_factory:loud", "--res", "16", "--device", "cuda", "--batch-size", "16", "--workers", "1"]
    refused = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "auto.json")])
    assert refused.exit_code == 2, refused.output
    assert ("under float16 autocast on cuda, which overflows above 65504: score with --precision bf16 or fp32"
            in refused.output)
    assert not (tmp_path / "auto.json").exists()
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.json"
        result = CliRunner().invoke(cli, [*base, "--precision", precision, "-o", str(out)])
        assert result.exit_code == 0, result.output
        doc = json.loads(out.read_text())
        assert doc["params"]["precision"] == precision and sum(g["score"] for g in doc["groups"]) == 45
    fm = ["--method", "fm", "--clusters", "8", "--source-sample", "16"]
    result = CliRunner().invoke(cli, [*base, *fm, "-o", str(tmp_path / "fm.json")])  # features are finite in fp16
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "fm.json").read_text())["params"]["precision"] == "fp16"
    for precision, recorded in (("fp32", "fp16"), ("auto", None)):
        out = tmp_path / f"fm_{precision}.json"
        result = CliRunner().invoke(cli, [*base, "--method", "fm", "--centroids-from", str(tmp_path / "fm.json"),
                                          "--precision", precision, "-o", str(out)])
        assert result.exit_code == 0, result.output
        params = json.loads(out.read_text())["params"]
        assert params.get("centroids_precision") == recorded
