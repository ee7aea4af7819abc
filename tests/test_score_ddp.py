"""`score` under torchrun: two gloo processes on the CPU score shards and give the one-process result.

One torchrun job runs LM and FM (k-means on a sample, so that the gather to rank 0, the broadcast of the
centroids and the streamed assignment of the unsampled rows all run). Shards are uneven (45 target images,
192 source images of which 128 are sampled) and batches are small, so ranks see different batch counts.
The expected values are the plain torch / NumPy references that tests/test_score.py shows a one-process run
equals (LM counts and joint histogram, k-means centroids from the same sampled features, brute-force
assignment and votes), computed here without FFCV so the test does not pay for a third set of loaders.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import score_reference
from test_score import _brute_nearest

from dptool.scores import load_assignment, read_scores
from dptool.scoring import ScoreOptions, kmeans
from dptool.scoring.fm import sample_rows

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba #167

OPTIONS = {"batch_size": 8, "workers": 1, "clusters": 8, "source_sample": 16, "seed": 1}

DRIVER = """
import sys
from dptool.distributed import distributed_session, world_size
from test_score_ddp import options
from dptool.scoring import score_files

out, source, target, model = sys.argv[1:5]
with distributed_session():
    assert world_size() == 2
    for method in ("lm", "fm"):
        score_files(f"{out}/{method}.json", method=method, source=source, target=target,
                    surrogate={"model": model}, options=options(), device="cpu")
"""


def options() -> ScoreOptions:
    """The options of both runs: small batches (several per rank), k-means on 16 of 24 images per class."""
    from dptool.features import InferenceOptions

    o = dict(OPTIONS)
    return ScoreOptions(inference=InferenceOptions(batch_size=o.pop("batch_size"), workers=o.pop("workers")), **o)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same(a, b) -> None:
    assert np.array_equal(a.scores, b.scores) and np.array_equal(a.ranks, b.ranks)
    np.testing.assert_allclose(a.tiebreak, b.tiebreak, rtol=1e-9, atol=1e-9)
    assert a.source == b.source and a.target == b.target and a.tie_break == b.tie_break


def test_two_gloo_processes_equal_one(score_data, tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(driver), str(out), str(score_data.source),
           str(score_data.target), str(score_data.checkpoint)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    # references, computed while the two ranks run
    logits, tgt_feats, tgt_labels = score_reference(score_data, score_data.target)
    _, src_feats, src_labels = score_reference(score_data, score_data.source)
    o = options()
    sampled = sample_rows(src_labels, 8, o.source_sample, o.seed)
    centroids = kmeans(src_feats[sampled], o.clusters, niter=o.kmeans_iters, seed=o.seed)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["fm.assign.npy", "fm.json", "lm.json"]  # rank 0 alone wrote

    lm = read_scores(out / "lm.json")
    pred = logits.argmax(dim=1).numpy()
    assert np.array_equal(lm.scores, np.bincount(pred, minlength=8)) and lm.params["world_size"] == 2
    np.testing.assert_allclose(lm.tiebreak, torch.softmax(logits, 1).sum(0).double().numpy(), rtol=1e-4, atol=1e-5)
    joint = np.zeros((8, 3), np.int64)
    np.add.at(joint, (pred, tgt_labels), 1)
    got = {int(k): v for k, v in lm.extra["joint_histogram"]["counts"].items()}
    assert got == {c: joint[c].tolist() for c in range(8) if joint[c].any()}

    fm = read_scores(out / "fm.json")
    assignment = load_assignment(out / "fm.json", fm)
    assert np.array_equal(assignment, _brute_nearest(src_feats, centroids))
    assert np.array_equal(fm.scores, np.bincount(_brute_nearest(tgt_feats, centroids), minlength=8))
    assert int(fm.scores.sum()) == 45 and fm.params["sampled_images"] == 128 and fm.params["world_size"] == 2
    assert fm.extra["cluster_sizes"] == np.bincount(assignment, minlength=8).tolist()
